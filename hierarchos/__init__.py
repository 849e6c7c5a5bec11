"""hierarchos: hybrid recurrent language model (RWKV cells, HRM manager/worker, Titans memory, ROSA)."""

__version__ = "0.1.0"
