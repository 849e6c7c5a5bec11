"""Count the operators one training step dispatches (forward, backward, clipping, optimizer), by
phase and by operator: on a GPU each is about one kernel launch, so this is the CPU-side measure of
how launch-bound a step is. Counts depend on the layer counts, the reasoning config and the window
length, not on the widths, so the 125m layer layout runs here with small widths in seconds.
The recurrence counts as one operator per call with --fused-wkv (the Triton kernel on CUDA is
one launch forward, two backward) instead of the CPU's chunked PyTorch form.

    python bench/count_ops.py --configs 1,1,0 2,2,2 --seq-lens 1024 8192 --amp --fused-wkv --json out.json
    python bench/count_ops.py --configs 1,1,0 --seq-lens 512 --amp --fused-wkv --by-module   # whose operators
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import hierarchos.model.rwkv as rwkv  # noqa: E402
from hierarchos.config import DEFAULT_WIRING, TIME_MIX_WIRINGS, ModelConfig  # noqa: E402
from hierarchos.model import HierarchosLM  # noqa: E402
from hierarchos.model.losses import lm_loss  # noqa: E402
from hierarchos.train.schedule import build_optimizer  # noqa: E402

# metadata-only operators: no kernel on a GPU
VIEWS = {"view", "_unsafe_view", "reshape", "expand", "transpose", "t", "permute", "unsqueeze", "squeeze",
         "select", "slice", "unbind", "split", "split_with_sizes", "alias", "as_strided", "detach", "empty",
         "empty_like", "empty_strided", "chunk", "narrow", "view_as", "lift_fresh", "_reshape_alias"}


class _Count(TorchDispatchMode):
    def __init__(self, where=None):
        super().__init__()
        self.ops = collections.Counter()
        self.where, self.by_module = where, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in VIEWS:
            self.ops[name] += 1
            if self.where is not None:
                self.by_module[self.where()] += 1
        return func(*args, **(kwargs or {}))


def _module_tracker(model):
    """Forward hooks keeping a stack of the module classes a forward is inside; returns a callable
    naming the innermost class (or the outermost module's, for the glue between them)."""
    stack = []
    for module in model.modules():
        label = type(module).__name__
        module.register_forward_pre_hook(lambda m, a, label=label: stack.append(label))
        module.register_forward_hook(lambda m, a, o: stack.pop() and None)  # None: the output stays
    return lambda: stack[-1] if stack else "(outside the model: the loss)"


class _OneOpWkv(torch.autograd.Function):
    """Stands in for the fused kernel: one operator forward, one backward, shapes as the real one."""

    @staticmethod
    def forward(ctx, r, log_w, k, v, a, b, state):
        return r.clone(), state.clone()

    @staticmethod
    def backward(ctx, d_out, d_state):
        return d_out, d_out, d_out, d_out, d_out, d_out, d_state


def count_step(triple, T, amp: bool, batch: int = 2, wiring: str = DEFAULT_WIRING, by_module: bool = False) -> dict:
    cfg = ModelConfig(vocab_size=512, context_dim=64, h_hidden=64, l_hidden=64, h_layers=4, l_layers=4,
                      head_size=16, h_cycles=triple[0], max_h_steps=triple[1], max_l_steps=triple[2],
                      h_halt_thresh=1.0, **TIME_MIX_WIRINGS[wiring]).validate()  # every pass runs, as in bench_train
    torch.manual_seed(0)
    model = HierarchosLM(cfg)
    optimizer = build_optimizer(model, 1e-4, 0.01)
    x = torch.randint(0, 512, (batch, T))
    phases: dict[str, collections.Counter] = {}
    where = _module_tracker(model) if by_module else None
    modules: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def phase(name, counting):
        if not counting:
            yield
            return
        with _Count(where if name == "forward" else None) as counter:
            yield
        phases[name] = counter.ops
        modules.update(counter.by_module)

    for counting in (False, True):  # the first step allocates optimizer state
        with phase("forward", counting), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = lm_loss(model(x), x, cfg.z_loss_weight)
        with phase("backward", counting):
            loss.backward()
        with phase("clip", counting):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with phase("optimizer", counting):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    totals = {name: sum(ops.values()) for name, ops in phases.items()}
    merged = sum(phases.values(), collections.Counter())
    row = dict(config=",".join(map(str, triple)), wiring=wiring, T=T, amp=amp, per_phase=totals,
               total=sum(totals.values()), top=merged.most_common(12))
    if by_module:  # forward operators by the innermost module class they ran in
        row["forward_by_module"] = modules.most_common()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["1,1,0", "2,2,2", "2,5,5"])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024])
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (its casts are operators too)")
    ap.add_argument("--fused-wkv", action="store_true", help="count the recurrence as one operator per call")
    ap.add_argument("--wirings", nargs="+", choices=TIME_MIX_WIRINGS, default=[DEFAULT_WIRING],
                    help="RWKV-7 time-mix wirings, one row each")
    ap.add_argument("--by-module", action="store_true",
                    help="also the forward's operators by the innermost module class they ran in")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.fused_wkv:
        rwkv._wkv7_opaque = lambda r, w, k, v, a, b, state=None, chunk_size=16: _OneOpWkv.apply(r, w, k, v, a, b,
                                                                                                 state)
    rows = []
    print("| config | wiring | T | forward | backward | clip | optimizer | total | top operators |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for c in args.configs:
        for T in args.seq_lens:
            for wiring in args.wirings:
                row = count_step(tuple(int(v) for v in c.split(",")), T, args.amp, wiring=wiring,
                                 by_module=args.by_module)
                rows.append(row)
                p = row["per_phase"]
                top = ", ".join(f"{name} {n}" for name, n in row["top"][:6])
                print(f"| {row['config']} | {wiring} | {T} | {p['forward']:,} | {p['backward']:,} | {p['clip']:,} | "
                      f"{p['optimizer']:,} | {row['total']:,} | {top} |", flush=True)
                if args.by_module:
                    print("  forward by module: " + ", ".join(f"{m} {n}" for m, n in row["forward_by_module"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
