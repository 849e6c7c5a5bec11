"""Importance matrix from a calibration text, and the importance-weighted block quantizers (numpy, offline).

`collect_importance` runs the full-precision model over a text and records, for every nn.Linear, the
mean square of each input channel (llama.cpp's imatrix): with it, sum_j imp[j] * (w_ij - q_ij)^2 is
the expected squared error a row's rounding adds to that Linear's output (channels treated as
independent). `quantize_weighted` picks each block's scale (and Q2_K's group scales and mins) to
make that weighted error small, and keeps a block's plain (`formats.quantize`) encoding wherever the
plain one is at least as good, so its weighted error is never larger block by block. The blocks
are the standard ones: the kernel, ggml and `gguf`'s dequantizer read them unchanged; only the
choice of scales and codes differs. Q8_0 is quantized plainly (its rounding error is already tiny).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import formats

# trial inverse scales around the plain one: nmax + TRIAL_STEP * k for k in -TRIALS..TRIALS
TRIALS, TRIAL_STEP = 9, 0.1
WEIGHTED_QTYPES = ("Q4_0", "INT4", "Q2_K")


@torch.no_grad()
def collect_importance(model, token_ids: list[int], *, chunk_size: int = 512,
                       names: set[str] | None = None) -> dict[str, np.ndarray]:
    """'<module>.weight' -> float64 (in_features,) mean of x^2 per input channel over every row each
    nn.Linear saw while the model read `token_ids` as one document (state carried across chunks)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(key: str):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[key] = sums.get(key, 0.0) + (x * x).sum(0).cpu().numpy()
            counts[key] = counts.get(key, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, nn.Linear) and (names is None or key in names):
            hooks.append(module.register_forward_pre_hook(hook_for(key)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.tensor(token_ids, dtype=torch.long, device=device).reshape(1, -1)
        state = model.init_state(1, device=device)
        for piece in ids.split(chunk_size, dim=1):
            state = model(piece, state).state
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return {key: sums[key] / counts[key] for key in sums}


# ---- weighted error of candidate encodings -----------------------------------------------------------

def _weighted_error(blocks: np.ndarray, decoded: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, b) blocks, their decoded values, per-element weights -> (n,) float64 weighted squared error."""
    diff = blocks.astype(np.float64) - decoded.astype(np.float64)
    return (weights * diff * diff).sum(axis=1)


def _symmetric_search(blocks: np.ndarray, weights: np.ndarray, qtype: str) -> np.ndarray:
    """Q4_0 / INT4: per block, trial scales around the plain one, each refit by weighted least squares
    for its codes and rounded to the stored precision; the best by weighted error, plain included."""
    f32 = np.float32
    lo, hi = (-8, 7) if qtype == "Q4_0" else (-7, 7)
    nmax = 8 if qtype == "Q4_0" else 7
    signed_max = formats.signed_absmax(blocks) if qtype == "Q4_0" else np.abs(blocks).max(axis=1)
    plain = formats.quantize_blocks(blocks, qtype)
    best_raw = plain
    best_err = _weighted_error(blocks, formats.dequantize_blocks(plain, qtype), weights)
    for k in range(-TRIALS, TRIALS + 1):
        # Q4_0 maps its signed extreme to -nmax (as ggml), INT4 its magnitude to +nmax
        denom = -(nmax + TRIAL_STEP * k) if qtype == "Q4_0" else (nmax + TRIAL_STEP * k)
        with np.errstate(divide="ignore", invalid="ignore"):
            trial_d = signed_max / f32(denom)
            codes = np.clip(np.rint(blocks / trial_d[:, None]), lo, hi)
            codes = np.where(np.isfinite(codes), codes, 0)
            sum_xl = (weights * blocks * codes).sum(axis=1)
            sum_ll = (weights * codes * codes).sum(axis=1)
            d = np.where(sum_ll > 0, sum_xl / sum_ll, 0.0)
        d = d.astype(np.float16).astype(f32) if qtype == "Q4_0" else d.astype(f32)  # as stored
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.where(d[:, None] != 0, np.clip(np.rint(blocks / d[:, None]), lo, hi), 0)
        raw = formats.encode_symmetric(d, codes.astype(np.int16), qtype)
        err = _weighted_error(blocks, formats.dequantize_blocks(raw, qtype), weights)
        better = err < best_err
        best_raw = np.where(better[:, None], raw, best_raw)
        best_err = np.where(better, err, best_err)
    return best_raw


def _q2_k_weighted(blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Q2_K: ggml's group (scale, min) search with the importance in place of |x| as the element
    weights; then, per super-block, whichever of that and the plain encoding has the smaller error."""
    plain = formats.quantize_blocks(blocks, "Q2_K")
    # ggml's reference weighs by |x|; scaled by importance it favours the channels that matter
    search_weights = (weights * np.abs(blocks)).astype(np.float32)
    search_weights = search_weights / np.maximum(search_weights.max(axis=1, keepdims=True), 1e-30)
    trial = formats.quantize_q2_k_weighted(blocks, search_weights.astype(np.float32))
    plain_err = _weighted_error(blocks, formats.dequantize_blocks(plain, "Q2_K"), weights)
    trial_err = _weighted_error(blocks, formats.dequantize_blocks(trial, "Q2_K"), weights)
    return np.where((trial_err < plain_err)[:, None], trial, plain)


def floored_importance(importance: np.ndarray) -> np.ndarray:
    """The element weights `quantize_weighted` minimises by: the importance, floored at 1e-3 of its mean,
    so that a channel never seen (all zero) still counts a little and its weights are not left to
    chance (float64)."""
    importance = np.asarray(importance, dtype=np.float64)
    return np.maximum(importance, max(float(importance.mean()) * 1e-3, 1e-12))


def quantize_weighted(w: np.ndarray, qtype: str, importance: np.ndarray) -> np.ndarray:
    """float32 (rows, cols) -> uint8 (rows, row_bytes) in the standard `qtype` blocks, scales chosen to
    minimise sum_j f[j] * (w_ij - q_ij)^2 with f = `floored_importance(importance)` (never worse per
    block than `formats.quantize` under that weighting)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_weighted expects a 2-D matrix, got shape {w.shape}")
    rows, cols = w.shape
    formats.check_cols(qtype, rows, cols)
    importance = np.asarray(importance, dtype=np.float64).reshape(-1)
    if importance.shape != (cols,) or not np.all(np.isfinite(importance)) or importance.min() < 0:
        raise ValueError(f"importance must be {cols} finite values >= 0, got shape {importance.shape}")
    if qtype not in WEIGHTED_QTYPES:
        return formats.quantize(w, qtype)
    size = formats.block_size(qtype)
    weights = np.broadcast_to(floored_importance(importance), (rows, cols)).reshape(-1, size)
    blocks = w.reshape(-1, size)
    if qtype == "Q2_K":
        raw = _q2_k_weighted(blocks, weights)
    else:
        raw = _symmetric_search(blocks, weights, qtype)
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, formats.row_bytes(qtype, cols))
