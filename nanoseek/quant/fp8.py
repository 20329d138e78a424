"""FP8 matmuls on DeepSeek-V3's block format: e4m3 weights, one fp32 scale per 128x128 block.

    w[n, k] = q[n, k] * scale_inv[n // 128, k // 128]      (nanoseek/checkpoint/fp8.py has the codec)

GPU (CUDA, PyTorch's blockwise scaled_mm): activations are quantised like DeepSeek-V3's
act_quant, per token and per 128-channel group, and both operands go to the FP8 tensor cores.
That path is checked once against the dequantised reference on first use and abandoned (with a
warning) if it raises or disagrees; it could not be run on the CPU machine it was written on.

CPU: there is no FP8 matmul to use, and converting e4m3 to bf16 is itself the bottleneck:
eager `.to(bfloat16)` is scalar code, ~4 ms per million weights here, ~30x the bf16 GEMV that
would consume them (a 1536x576 projection: 4.3 ms to convert vs 0.14 ms to multiply). Dequantising
on every call would make decode 20-30x slower than bf16, so on CPU each FP8 layer dequantises its
blocks once, on first use, and keeps that copy in the compute dtype (see Fp8Linear).
"""

import warnings

import torch
import torch.nn.functional as F

from nanoseek.checkpoint.fp8 import BLOCK, dequantize_fp8_blocks

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448

_gpu_path_ok: bool | None = None  # None: not tried yet


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_fp8_blocks(q, scale_inv).to(dtype)


def quantize_groups(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] (K % group == 0) -> (fp8 [M, K], fp32 scales [M, K // group]), per token and group."""
    M, K = x.shape
    g = x.float().view(M, K // group, group)
    s = g.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    return (g / s.unsqueeze(-1)).to(FP8).view(M, K), s


def _scaled_mm_blocks(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    xq, sx = quantize_groups(x)
    # cuBLAS wants the 1x128 activation scales outer-dim-major (column-major [M, K/128])
    sx = sx.t().contiguous().t()
    return F.scaled_mm(xq, q.t(), sx, F.ScalingType.BlockWise1x128, scale_inv, F.ScalingType.BlockWise128x128,
                       output_dtype=x.dtype)


def _gpu_usable(x: torch.Tensor, q: torch.Tensor) -> bool:
    return (x.is_cuda and _gpu_path_ok is not False and hasattr(F, "scaled_mm")
            and x.shape[1] % BLOCK == 0 and q.shape[0] % BLOCK == 0)


def gpu_block_mm(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] @ dequant(q)^T on FP8 tensor cores, or None when that path is unavailable."""
    global _gpu_path_ok
    if not _gpu_usable(x, q):
        return None
    if _gpu_path_ok:
        return _scaled_mm_blocks(x, q, scale_inv)
    ref = F.linear(x, dequantize(q, scale_inv, x.dtype))
    try:
        out = _scaled_mm_blocks(x, q, scale_inv)
        # activation quantisation adds ~2^-4 relative error per element; a layout mistake is O(1)
        err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()
        _gpu_path_ok = err < 0.1
        reason = f"relative error {err:.3f} vs the dequantised reference"
    except (RuntimeError, TypeError, ValueError) as e:
        _gpu_path_ok, reason = False, f"{type(e).__name__}: {e}"
    if not _gpu_path_ok:
        warnings.warn(f"FP8 scaled_mm unusable ({reason}); FP8 layers will dequantise instead")
    return out if _gpu_path_ok else ref
