"""The chunk-parallel WKV-7 backward, written out in plain PyTorch (float64-capable): the derivation that
the Triton kernels of `wkv_chunk_grad_triton.py` follow, and their reference.

The sequential backward (`wkv_triton.wkv7_manual_backward`) walks the adjoint recurrence token by token
through the whole sequence. Here the sequence is cut into chunks of C tokens. With S_0 the state entering
a chunk, every quantity inside it follows from S_0 and the chunk's inputs by small matrix products (the
factorisation `wkv.wkv7_chunked` documents, stacked over the chunk's tokens as rows):

    (I - L_ab) U = A_dec S_0^T + L_ak V                  U's rows u_t = S_{t-1} a_t
    O   = R_dec S_0^T + M_rb U + M_rk V
    S_C = S_0 diag(g) + U^T B_end + V^T K_end

with cl the inclusive cumulative sum of log_w inside the chunk, A_dec = a e^(cl - log_w), R_dec = r e^cl,
B_inv = b e^-cl, K_inv = k e^-cl, B_end = b e^(cl_C - cl), K_end = k e^(cl_C - cl), g = e^(cl_C),
L_xy = strict_tril(X_dec Y_inv^T), M_xy = tril(X_dec Y_inv^T). Writing U = W S_0^T + U_v V
(W = (I - L_ab)^-1 A_dec) and O = P S_0^T + Q V (P = R_dec + M_rb W), the adjoint of S_0 is

    dS_0 = dS_C diag(g) + (dS_C B_end^T) W + dO^T P                                          (1)

a linear map of the adjoint dS_C at the chunk's end: a reverse scan over chunks, three small products a
chunk, in which every value channel (row of S) is independent. Once every chunk has its S_0 (from the
forward) and its dS_C (from that scan), the input gradients of all chunks follow at once:

    dU   = M_rb^T dO + B_end dS_C^T,          dRHS = (I - L_ab)^-T dU
    dL_ab = strict(dRHS U^T),  dL_ak = strict(dRHS V^T),  dM_rb = tril(dO U^T),  dM_rk = tril(dO V^T)
    dA_dec = dRHS S_0 + dL_ab B_inv + dL_ak K_inv,     dR_dec = dO S_0 + dM_rb B_inv + dM_rk K_inv
    dB_inv = dL_ab^T A_dec + dM_rb^T R_dec,             dK_inv = dL_ak^T A_dec + dM_rk^T R_dec
    dB_end = U dS_C,  dK_end = V dS_C,  dg = sum_i S_0[i, :] * dS_C[i, :]
    dV   = M_rk^T dO + L_ak^T dRHS + K_end dS_C^T

then elementwise: dr = dR_dec e^cl, da = dA_dec e^(cl - log_w), db = dB_inv e^-cl + dB_end e^(cl_C - cl),
dk likewise, and log_w through the cumulative sums:

    dcl  = dR_dec R_dec - dB_inv B_inv - dK_inv K_inv - dB_end B_end - dK_end K_end   (per token, channel)
    dclx = dA_dec A_dec                                (A_dec uses cl_{t-1} = cl_t - log_w_t)
    dlog_w_s = sum_{t >= s} (dcl_t + dclx_t) - dclx_s + sum_t (dB_end B_end + dK_end K_end)_t + dg g
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .wkv_inputs import prepare


def chunk_view(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, T, H, N) -> (B, H, n_chunks, C, N), T padded with zeros (frozen tokens) to whole chunks."""
    batch, seq_len, heads, size = x.shape
    n_chunks = -(-seq_len // chunk)
    x = F.pad(x, (0, 0, 0, 0, 0, n_chunks * chunk - seq_len))
    return x.view(batch, n_chunks, chunk, heads, size).permute(0, 3, 1, 2, 4)


def token_view(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The inverse of `chunk_view`: (B, H, n_chunks, C, N) -> (B, T, H, N), the padding dropped."""
    batch, heads, n_chunks, chunk, size = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(batch, n_chunks * chunk, heads, size)[:, :seq_len]


def chunk_factors(r, log_w, k, a, b):
    """Every state-free quantity of each chunk, from inputs in chunk view (B, H, n_chunks, C, N): a dict of
    the decayed inputs, the four triangular matrices, (I - L_ab)^-1, W, P and g."""
    chunk = r.shape[-2]
    cl = log_w.cumsum(dim=-2)
    cl_end = cl[..., -1:, :]
    f = dict(cl=cl, a_dec=a * torch.exp(cl - log_w), r_dec=r * torch.exp(cl), b_inv=b * torch.exp(-cl),
             k_inv=k * torch.exp(-cl), b_end=b * torch.exp(cl_end - cl), k_end=k * torch.exp(cl_end - cl),
             g=torch.exp(cl_end[..., 0, :]))
    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    f["l_ab"] = torch.tril(f["a_dec"] @ tr(f["b_inv"]), diagonal=-1)
    f["l_ak"] = torch.tril(f["a_dec"] @ tr(f["k_inv"]), diagonal=-1)
    f["m_rb"] = torch.tril(f["r_dec"] @ tr(f["b_inv"]))
    f["m_rk"] = torch.tril(f["r_dec"] @ tr(f["k_inv"]))
    eye = torch.eye(chunk, dtype=r.dtype, device=r.device)
    f["inv"] = torch.linalg.solve_triangular(eye - f["l_ab"], eye.expand_as(f["l_ab"]), upper=False,
                                             unitriangular=True)
    f["w"] = f["inv"] @ f["a_dec"]
    f["p"] = f["r_dec"] + f["m_rb"] @ f["w"]
    return f


def chunk_start_states(r, log_w, k, v, a, b, state, chunk):
    """The state entering every chunk (B, H, n_chunks, N, N), by the token-by-token scan."""
    decay = torch.exp(log_w)
    starts, s = [], state
    for t in range(r.shape[1]):
        if t % chunk == 0:
            starts.append(s)
        u = torch.einsum("bhij,bhj->bhi", s, a[:, t])
        s = s * decay[:, t, :, None, :] + u[..., None] * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
    return torch.stack(starts, dim=2)


def reverse_scan(f, d_o, d_final):
    """Equation (1) over the chunks in reverse: (the adjoint at every chunk's end (B, H, n_chunks, N, N),
    the adjoint of the initial state)."""
    ends, ds = [], d_final
    for c in reversed(range(d_o.shape[2])):
        ends.append(ds)
        ds = (ds * f["g"][:, :, c, None, :] + (ds @ f["b_end"][:, :, c].transpose(-1, -2)) @ f["w"][:, :, c]
              + d_o[:, :, c].transpose(-1, -2) @ f["p"][:, :, c])
    return torch.stack(ends[::-1], dim=2), ds


def chunk_input_grads(f, v, log_w, starts, ends, d_o):
    """The six input gradients of every chunk at once (chunk view), from each chunk's start state, its
    end adjoint and dO: the module docstring's formulas."""
    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    u = f["inv"] @ (f["a_dec"] @ tr(starts) + f["l_ak"] @ v)
    d_rhs = tr(f["inv"]) @ (tr(f["m_rb"]) @ d_o + f["b_end"] @ tr(ends))
    d_l_ab = torch.tril(d_rhs @ tr(u), diagonal=-1)
    d_l_ak = torch.tril(d_rhs @ tr(v), diagonal=-1)
    d_m_rb = torch.tril(d_o @ tr(u))
    d_m_rk = torch.tril(d_o @ tr(v))
    d_a_dec = d_rhs @ starts + d_l_ab @ f["b_inv"] + d_l_ak @ f["k_inv"]
    d_r_dec = d_o @ starts + d_m_rb @ f["b_inv"] + d_m_rk @ f["k_inv"]
    d_b_inv = tr(d_l_ab) @ f["a_dec"] + tr(d_m_rb) @ f["r_dec"]
    d_k_inv = tr(d_l_ak) @ f["a_dec"] + tr(d_m_rk) @ f["r_dec"]
    d_b_end, d_k_end = u @ ends, v @ ends
    d_g = (starts * ends).sum(dim=-2)
    dv = tr(f["m_rk"]) @ d_o + tr(f["l_ak"]) @ d_rhs + f["k_end"] @ tr(ends)
    cl = f["cl"]
    dr = d_r_dec * torch.exp(cl)
    da = d_a_dec * torch.exp(cl - log_w)
    db = d_b_inv * torch.exp(-cl) + d_b_end * torch.exp(cl[..., -1:, :] - cl)
    dk = d_k_inv * torch.exp(-cl) + d_k_end * torch.exp(cl[..., -1:, :] - cl)
    end_terms = d_b_end * f["b_end"] + d_k_end * f["k_end"]
    d_cl = d_r_dec * f["r_dec"] - d_b_inv * f["b_inv"] - d_k_inv * f["k_inv"] - end_terms
    d_clx = d_a_dec * f["a_dec"]
    d_cl_end = end_terms.sum(dim=-2, keepdim=True) + (d_g * f["g"])[..., None, :]
    d_log_w = (d_cl + d_clx).flip(-2).cumsum(-2).flip(-2) - d_clx + d_cl_end
    return dr, d_log_w, dk, dv, da, db


def wkv7_chunk_manual_backward(r, log_w, k, v, a, b, state, d_o, d_state, chunk=16):
    """The chunk-parallel backward in plain PyTorch: inputs (B, T, H, N), state (B, H, N, N), d_o the
    gradient of o and d_state that of the final state (None: zeros). Returns (dr, dlog_w, dk, dv, da, db,
    d_initial_state) in the compute dtype (float64 for float64 inputs)."""
    r, log_w, k, v, a, b, state = prepare(r, log_w, k, v, a, b, state)
    seq_len = r.shape[1]
    d_o = torch.zeros_like(r) if d_o is None else d_o.to(r.dtype)
    d_state = torch.zeros_like(state) if d_state is None else d_state.to(r.dtype)
    starts = chunk_start_states(r, log_w, k, v, a, b, state, chunk)
    rc, lwc, kc, vc, ac, bc, doc = (chunk_view(x, chunk) for x in (r, log_w, k, v, a, b, d_o))
    f = chunk_factors(rc, lwc, kc, ac, bc)
    ends, d_initial = reverse_scan(f, doc, d_state)
    grads = chunk_input_grads(f, vc, lwc, starts, ends, doc)
    return (*(token_view(g, seq_len) for g in grads), d_initial)
