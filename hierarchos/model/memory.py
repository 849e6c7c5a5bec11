"""Titans-style long-term memory: slot keys and values, top-k reads, surprise-gated chunk writes.

Reads are per token: top-k slots by q.K, softmax over the k scores, weighted values.
Writes happen at global chunk boundaries (every `ltm_chunk` tokens): the surprise
g = d/dV sum_t ||read(q_t) - W_v e_t||^2 is accumulated token by token (closed form,
no autograd), then momentum and forgetting update the slots whose surprise norm exceeds
`ltm_write_threshold`. Tokens of chunk c read the memory as it stood at the end of
chunk c-1; the accumulators live in the state, so one call over T tokens equals T calls
over one token (`step`: one token per row at per-row positions, the write masked on the
device). Per-slot metadata (write time, count, source) are buffers that chat commits into;
reads can be filtered by source and time. A slot whose source is
`DORMANT_SOURCE` (added by `hierarchos.model.grow.grow_slots`) is never read until allocated.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..ops.compile_settings import before_compiling

# slot_source of a slot grown into the memory but not allocated yet: reads skip it, so growing
# the memory leaves the function unchanged and no new tensor is needed (old files load as they are)
DORMANT_SOURCE = -2


class LongTermMemory(nn.Module):
    def __init__(self, dim: int, slots: int, key_dim: int, val_dim: int, topk: int,
                 chunk: int, write_threshold: float):
        super().__init__()
        self.slots, self.key_dim, self.val_dim, self.topk = slots, key_dim, val_dim, topk
        self.chunk, self.write_threshold = chunk, write_threshold
        self.keys = nn.Parameter(torch.randn(slots, key_dim) / key_dim ** 0.5)
        self.values = nn.Parameter(torch.randn(slots, val_dim) * 0.02)
        self.query = nn.Linear(dim, key_dim, bias=False)
        self.target = nn.Linear(dim, val_dim, bias=False)
        # data-dependent momentum (eta), step (theta) and forgetting (alpha) per chunk
        self.write_gates = nn.Linear(dim, 3)
        with torch.no_grad():
            self.write_gates.weight.mul_(0.1)
            self.write_gates.bias.copy_(torch.tensor([2.0, -2.0, -4.0]))
        # metadata: unix time of the last write, number of writes, interned source id (-1: none,
        # DORMANT_SOURCE: not allocated yet)
        self.register_buffer("slot_time", torch.zeros(slots, dtype=torch.float64))
        self.register_buffer("slot_count", torch.zeros(slots, dtype=torch.int64))
        self.register_buffer("slot_source", torch.full((slots,), -1, dtype=torch.int64))
        self.source_names: list[str] = []
        self._segment_call = None  # the compiled `_segment` (compile_segments), None: eager
        # hold only a call's inputs for the backward and make its chunks again there (`recompute_chunks`)
        self.recompute = False

    # ---- state ---------------------------------------------------------------
    def init_state(self, batch_size: int, dim: int, device=None, dtype=torch.float32) -> dict:
        z = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        return {
            # what writes changed, relative to the learned values: reads use values + delta, so the
            # learned values get a gradient in every window, also after the state was detached
            "delta": z(batch_size, self.slots, self.val_dim),
            "momentum": z(batch_size, self.slots, self.val_dim),
            "surprise": z(batch_size, self.slots, self.val_dim),   # accumulated g of the open chunk
            "input_sum": z(batch_size, dim),                        # sum of e over the open chunk
            "writes": z(batch_size, self.slots),                    # writes per slot since init
        }

    # ---- reading ---------------------------------------------------------------
    def slot_mask(self, sources: list[str] | None = None, since: float | None = None) -> torch.Tensor | None:
        """Bool (slots,) of slots a filtered read may use, or None for all."""
        if sources is None and since is None:
            return None
        mask = torch.ones(self.slots, dtype=torch.bool, device=self.keys.device)
        if sources is not None:
            ids = [self.source_names.index(s) for s in sources if s in self.source_names]
            mask &= torch.isin(self.slot_source, torch.tensor(ids, dtype=torch.int64, device=mask.device))
        if since is not None:
            mask &= self.slot_time >= since
        return mask

    def address(self, q: torch.Tensor, mask: torch.Tensor | None = None):
        """Top-k slots of queries q (B, T, Dk): (attn (B, T, k), idx (B, T, k)). Independent of the values,
        so a whole sequence is addressed at once even though values change at chunk boundaries."""
        scores = q @ self.keys.to(q.dtype).t()  # (B, T, S)
        scores = scores.masked_fill(self.slot_source == DORMANT_SOURCE, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        top_scores, idx = scores.topk(self.topk, dim=-1)
        attn = torch.softmax(top_scores, dim=-1)
        if mask is not None:
            attn = torch.nan_to_num(attn)  # fewer allowed slots than k
        return attn, idx

    def gather(self, attn: torch.Tensor, idx: torch.Tensor, values: torch.Tensor,
               delta: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum of the addressed slots' values (B, S, Dv) -> (B, T, Dv). With `delta`, the values
        are `values + delta` (values may then be the learned (1, S, Dv)), added on the k picked slots
        only: the same sums, element by element, as adding the whole tables first."""
        B, T, K = idx.shape
        at = idx.reshape(B, T * K, 1).expand(B, T * K, self.val_dim)
        picked = values.expand(B, -1, -1).gather(1, at)
        if delta is not None:
            picked = picked + delta.gather(1, at)
        return (attn[..., None] * picked.view(B, T, K, -1)).sum(-2)

    def read(self, q: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None):
        """q: (B, T, Dk), values: (B, S, Dv) -> (read (B, T, Dv), attn (B, T, k), idx (B, T, k))."""
        attn, idx = self.address(q, mask)
        return self.gather(attn, idx, values), attn, idx

    # ---- forward over a sequence -------------------------------------------------
    STATE_KEYS = ("delta", "momentum", "surprise", "input_sum", "writes")

    def forward(self, e: torch.Tensor, state: dict, pos0: int):
        """e: (B, T, D) memory inputs at global positions pos0.. -> (reads (B, T, Dv), new state).

        With `recompute` (`recompute_chunks`) a call that closes a chunk under autograd holds only
        its inputs for the backward and runs again there (torch's non-reentrant checkpoint): the tables
        each chunk's reads and write save (B x slots x val_dim floats a table, ~3 a chunk) are made
        again instead of held. The same values and gradients."""
        if self.recompute and torch.is_grad_enabled() and e.shape[1] + pos0 % self.chunk >= self.chunk:
            from torch.utils.checkpoint import checkpoint

            keys = self.STATE_KEYS
            reads, *parts = checkpoint(self._forward_parts, e, pos0, *(state[k] for k in keys), use_reentrant=False)
            return reads, dict(zip(keys, parts))
        return self._forward(e, state, pos0)

    def recompute_chunks(self, on: bool = True) -> None:
        """Whether `forward` under autograd makes its chunks again in the backward instead of holding what
        they save (`compile_blocks(memory_budget=F)` turns it on for F < 1, as `train --activation-budget`)."""
        self.recompute = bool(on)

    def _forward_parts(self, e, pos0, *parts):
        reads, state = self._forward(e, dict(zip(self.STATE_KEYS, parts)), pos0)
        return (reads, *(state[k] for k in self.STATE_KEYS))

    def _forward(self, e: torch.Tensor, state: dict, pos0: int):
        T = e.shape[1]
        learned = self.values.to(e.dtype).unsqueeze(0)
        # the whole table (learned + delta) is formed only once a chunk's write needs it: until then reads
        # add the two on the slots they pick, and a call that writes nothing returns its delta as it came
        # (a token's step at batch 1 then touches k slots, not all S x Dv values, twice)
        delta, values = state["delta"], None
        momentum, surprise, input_sum, writes = state["momentum"], state["surprise"], state["input_sum"], state["writes"]
        attn_all, idx_all = self.address(self.query(e))
        # segments end at global chunk boundaries; split (not slice in the loop) so that the
        # backward is one concatenation instead of a full-size zero-filled gradient per chunk
        first = min(T, self.chunk - pos0 % self.chunk)
        if first == T:  # one segment (a generated token's step): no split to pay for
            segments = [(attn_all, idx_all, self.target(e), e)]
        else:
            sizes = [first] + [self.chunk] * ((T - first) // self.chunk)
            if sum(sizes) < T:
                sizes.append(T - sum(sizes))
            segments = zip(attn_all.split(sizes, 1), idx_all.split(sizes, 1), self.target(e).split(sizes, 1),
                           e.split(sizes, 1))
        reads = []
        filled = pos0 % self.chunk  # tokens already in the open chunk
        segment = self._segment_call or self._segment
        for attn, idx, target, e_seg in segments:  # one iteration per memory chunk
            filled += attn.shape[1]
            closes = filled == self.chunk
            read, values, momentum, surprise, input_sum, writes = segment(
                attn, idx, target, e_seg, learned, delta, values, momentum, surprise, input_sum, writes, closes)
            reads.append(read)
            if closes:
                filled = 0
        new_state = {"delta": delta if values is None else values - learned, "momentum": momentum,
                     "surprise": surprise, "input_sum": input_sum, "writes": writes}
        return torch.cat(reads, dim=1), new_state

    def _segment(self, attn, idx, target, e_seg, learned, delta, values, momentum, surprise, input_sum, writes,
                 closes: bool):
        """One memory chunk's part of `forward`: its tokens' reads (from learned + delta on the slots they
        pick while `values` is None, else from `values`), their surprise accumulated, and the write when
        the chunk `closes`. Returns (reads, values, momentum, surprise, input_sum, writes): `values` stays
        None until a write forms the whole table. A function of tensors only, so that `compile_segments`
        can fuse it (the top-k addressing, done before for the whole call, stays eager)."""
        B = attn.shape[0]
        read = self.gather(attn, idx, learned, delta) if values is None else self.gather(attn, idx, values)
        # closed-form dl/dV of sum_t ||read_t - target_t||^2, scattered to the slots read
        err = 2.0 * (read - target)                                   # (B, t, Dv)
        contrib = (attn[..., None] * err[:, :, None, :]).reshape(B, -1, self.val_dim)
        surprise = surprise.scatter_add(1, idx.reshape(B, -1, 1).expand_as(contrib), contrib)
        input_sum = input_sum + e_seg.sum(1)
        if closes:  # chunk complete: write
            if values is None:
                values = learned + delta
            values, momentum, written = self._write(values, momentum, surprise, input_sum / self.chunk)
            writes = writes + written.to(writes.dtype)
            surprise, input_sum = torch.zeros_like(surprise), torch.zeros_like(input_sum)
        return read, values, momentum, surprise, input_sum, writes

    def compile_segments(self, backend: str = "inductor") -> bool:
        """torch.compile `_segment` (each chunk's gathers, surprise scatter and write fused into a few
        kernels, forward and backward); `uncompile_segments` undoes it. Returns whether it compiled:
        inductor only where the memory lives on CUDA (its values the eager ones up to rounding: a GPU
        test), never on the CPU, where torch 2.13's inductor gave this function wrong gradients (up to
        ~3x the eager ones for the chunk's attention weights, forward values equal; a reduction needs
        `_write`'s `unbind` of gates whose weights take gradients; other backends trace correctly there:
        tested)."""
        if backend == "inductor" and self.keys.device.type != "cuda":
            return False
        before_compiling()
        self._segment_call = torch.compile(self._segment, backend=backend, dynamic=None)
        return True

    def uncompile_segments(self) -> None:
        self._segment_call = None

    def step(self, e: torch.Tensor, state: dict, row_pos: torch.Tensor, write_rows: bool = True):
        """`forward` for one token per row at per-row global positions row_pos (B,), without host
        reads: the chunk-boundary write is computed for every row and kept (`torch.where`) where
        row_pos + 1 closes a chunk. The same operations as `forward` on T = 1, so the same values.
        `write_rows=False`: the caller knows that no row closes a chunk ((row_pos + 1) % chunk != 0
        everywhere, as the host knows the positions): the write, which every row would discard, is left
        out (same values, ~15 fewer whole-table operations a token).
        e: (B, 1, D) -> (reads (B, 1, Dv), new state)."""
        learned = self.values.to(e.dtype).unsqueeze(0)
        attn, idx = self.address(self.query(e))
        # as `forward` reads (learned + delta on the picked slots) and accumulates; the write is decided below
        read, _, _, surprise, input_sum, _ = self._segment(attn, idx, self.target(e), e, learned, state["delta"], None,
                                                           state["momentum"], state["surprise"], state["input_sum"],
                                                           state["writes"], False)
        if not write_rows:
            return read, {"delta": state["delta"], "momentum": state["momentum"], "surprise": surprise,
                          "input_sum": input_sum, "writes": state["writes"]}
        closes = torch.remainder(row_pos + 1, self.chunk) == 0                      # (B,) chunk complete
        values = learned + state["delta"]  # every row's write is computed (no host read decides it)
        written_values, momentum, written = self._write(values, state["momentum"], surprise, input_sum / self.chunk)
        at = closes[:, None, None]
        new_state = {"delta": torch.where(at, written_values - learned, state["delta"]),  # as `forward` keeps it
                     "momentum": torch.where(at, momentum, state["momentum"]),
                     "surprise": torch.where(at, torch.zeros_like(surprise), surprise),
                     "input_sum": torch.where(closes[:, None], torch.zeros_like(input_sum), input_sum),
                     "writes": state["writes"] + (written & closes[:, None]).to(state["writes"].dtype)}
        return read, new_state

    def _write(self, values, momentum, surprise, chunk_mean):
        eta, theta, alpha = torch.sigmoid(self.write_gates(chunk_mean)).to(values.dtype).unbind(-1)  # (B,)
        written = surprise.norm(dim=-1) > self.write_threshold                                      # (B, S)
        new_momentum = eta[:, None, None] * momentum - theta[:, None, None] * surprise
        new_values = (1.0 - alpha[:, None, None]) * values + new_momentum
        keep = written[..., None]
        return torch.where(keep, new_values, values), torch.where(keep, new_momentum, momentum), written

    # ---- metadata --------------------------------------------------------------------
    @torch.no_grad()
    def commit(self, state: dict, source: str, now: float | None = None, row: int = 0) -> int:
        """Copy one batch row's written values into the learned memory and stamp metadata.

        Returns the number of slots written. Used by chat to make what it learned persistent.
        """
        written = state["writes"][row] > 0
        count = int(written.sum())
        if count == 0:
            return 0
        if source not in self.source_names:
            self.source_names.append(source)
        self.values.data[written] += state["delta"][row][written].to(self.values.dtype)
        self.slot_time[written] = time.time() if now is None else now
        self.slot_count[written] += state["writes"][row][written].to(torch.int64)
        self.slot_source[written] = self.source_names.index(source)
        return count

    def query_slots(self, e: torch.Tensor, sources=None, since=None):
        """Slots a query embedding (B, T, D) reads, with attention weights: for chat's /memory."""
        q = self.query(e)
        _, attn, idx = self.read(q, self.values.unsqueeze(0).expand(e.shape[0], -1, -1),
                                 self.slot_mask(sources, since))
        return attn, idx
