"""Model pieces: RWKV blocks, memory, ROSA hints, the manager/worker reasoner, and their assembly."""

from .lm import HierarchosLM, ModelOutput
from .state import HierarchosState

__all__ = ["HierarchosLM", "ModelOutput", "HierarchosState"]
