"""The parallel prefill makes no host decisions: time to first token is launches and work, not waits.

Issue 17 asks that the default reasoning config's prefill not wait on the host per pass. Over T > 1
tokens with more than one plan point, the HRM runs every pondering and worker pass under masks (the
early exits that read a mask on the host are the T = 1 / one-plan-point forms), the memory writes
with `torch.where`, and the plan points are indexed by device tensors: no op of the forward needs a
tensor's value on the host. Checked under the sync-free tests' dispatch mode that raises on every
host read, for the default config, Q halting and the minimal config (ROSA hints precomputed: the
automata are host code over host tokens, no device read). The one-plan-point prompt does read the
host (its early exit), so the detector is shown to fire on this very path.
"""

from __future__ import annotations

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.model.rosa import rosa_hints

from test_sync_free_step import HostReadError, NoHostReads

pytestmark = pytest.mark.usefixtures("one_thread")


def prefill(model, length, seed=0):
    tokens = torch.randint(0, model.cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    state = model.init_state(1)
    hints, _ = rosa_hints(tokens, state.rosa, model.cfg.rosa_window, model.cfg.rosa_none_id)
    with torch.no_grad(), NoHostReads():
        return model(tokens, state, rosa_hint_ids=hints)


@pytest.mark.parametrize("overrides", [dict(max_h_steps=3, max_l_steps=3), dict(halting="q"),
                                       dict(h_cycles=1, max_h_steps=1, max_l_steps=0)])
def test_the_parallel_prefill_reads_nothing_on_the_host(overrides):
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(**overrides)).eval()
    out = prefill(model, 40)
    assert out.logits.shape[:2] == (1, 40)


def test_a_one_plan_point_prompt_takes_the_host_early_exit():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(max_h_steps=3, h_halt_thresh=1e-6)).eval()  # every plan point halts at once
    with pytest.raises(HostReadError):
        prefill(model, 2)  # h_stride 2: one plan point, the pondering loop's early exit reads the mask
