"""Fixtures shared by several test modules (pytest loads this file before them)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One PyTorch thread for a module of tiny-tensor tests: threads only add synchronisation there,
    and on a busy machine extra threads only wait. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
