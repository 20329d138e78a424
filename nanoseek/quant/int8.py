"""INT8 arithmetic: symmetric per-row weights, dynamic per-token activations, two matmuls.

Weights (both int8 schemes):
    scale[n] = amax_k |w[n, k]| / 127,   q[n, k] = round(w[n, k] / scale[n])   in [-127, 127]
    w ~= q * scale                       (scale kept in fp32, shape [N, 1])
-128 is never used: the grid is symmetric, so 0 and -w are exact.

Activations (int8-dynamic only), recomputed for every call, one scale per token (row):
    sx[m] = amax_k |x[m, k]| / 127,      xq = round(x / sx)
    x @ w^T ~= (xq @ q^T) * sx * scale^T    (xq @ q^T accumulates exactly in int32)
Per-token scales make a token's result independent of the other tokens in the batch.

Kernels, measured on this CPU (Xeon with AVX-512 VNNI + AMX, torch 2.13, 1 thread, a 1536x576
projection; bench/quant.py has the whole-model numbers):
    M = 1    bf16 F.linear ~140us | _weight_int8pack_mm ~45us | _int_mm + act. quant ~105us
    M = 16   bf16 ~150us          | _weight_int8pack_mm ~340us| dequantise + bf16 F.linear ~340us
    M = 512  bf16 ~750us          | _weight_int8pack_mm ~21ms | dequantise + F.linear ~1.1ms | _int_mm path ~2.2ms
_weight_int8pack_mm is a GEMV loop (time grows linearly with M): 3x faster than bf16 at M=1 on
a cached matrix (~1.5x on the whole model, whose weights stream from DRAM), hopeless for prefill. So weight-only uses it below PACK_MAX_M rows and otherwise converts q to
the activation dtype (exact: |q| <= 127) and applies the scale to the output instead.
"""

import torch
import torch.nn.functional as F

from nanoseek import hardware

QMAX = 127
PACK_MAX_M = 8     # rows up to which _weight_int8pack_mm beats dequantise+GEMM (crossover ~16)
PACK_K_MULTIPLE = 16  # _weight_int8pack_mm steps K by 16 (K=40: garbage, K=33: segfault)
# ... and uses aligned vector loads: x rows on 32 bytes, weight rows on 16 bytes. Tensors read
# from safetensors can start at any 8-byte offset, so misaligned inputs are copied first.
ALIGN = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself if contiguous and ALIGN-byte aligned, else a fresh (aligned) copy."""
    t = t.contiguous()
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], fp32 scale [N, 1]) with w ~= q * scale."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / QMAX
    q = (w / scale).round().clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [M, K] -> (int8 [M, K], fp32 scale [M, 1]), one scale per row (token)."""
    x = x.float()
    # abs().amax, not vector_norm(ord=inf): the same numbers, 3-7x faster on this CPU
    sx = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(QMAX)
    return (x / sx).round_().to(torch.int8), sx


def weight_only_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_x=None) -> torch.Tensor:
    """x [M, K] (float) @ (q * scale)^T -> [M, N] in x.dtype. scale_x: the scale already as a
    flat vector in x.dtype (what the packed kernel takes), for callers that keep one."""
    M, K = x.shape
    if (M <= PACK_MAX_M and K % PACK_K_MULTIPLE == 0 and x.device.type == "cpu"
            and x.dtype == torch.bfloat16):
        if q.data_ptr() % ALIGN == 0:  # Int8Linear aligns its weight once; never copy it per call
            s = scale_x if scale_x is not None and scale_x.dtype == x.dtype else scale.view(-1).to(x.dtype)
            return torch.ops.aten._weight_int8pack_mm(aligned(x), q, s)
    # the per-row scale factors out of the dot product: scale the N outputs, not the N*K weights;
    # in fp32 where bf16 matmuls are slow (hardware.matmul_dtype)
    dt = hardware.matmul_dtype(x.dtype, x.device)
    return (F.linear(x.to(dt), q.to(dt)) * scale.view(-1).to(dt)).to(x.dtype)


def _int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [N, K]^T -> int32 [M, N]."""
    M, K = a.shape
    N = b_t.shape[0]
    # CUDA's _int_mm wants M > 16 and K, N multiples of 8; CPU (oneDNN) takes any shape
    if a.device.type == "cpu" or (M > 16 and K % 8 == 0 and N % 8 == 0):
        return torch._int_mm(a, b_t.t())
    return (a.float() @ b_t.float().t()).round().to(torch.int32)


def dynamic_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantise x per token, multiply in int8 with int32 accumulation, rescale -> [M, N] in x.dtype."""
    xq, sx = quantize_tokens(x)
    acc = _int8_matmul(xq, q)
    return acc.float().mul_(sx).mul_(scale.view(1, -1)).to(x.dtype)  # (converting first: ~1.5x faster than int32 * fp32)
