"""INT4 arithmetic: asymmetric 4-bit weights in groups of 32 along K (GGUF's Q4_1 grid).

Each group of GROUP consecutive weights of a row has a scale and a minimum (fp32):
    scale = (max - min) / 15,   q = round((w - min) / scale)   in [0, 15]
    w ~= q * scale + min
This is exactly ggml's Q4_1 (d = scale, m = min), so a Q4_1 GGUF re-quantized from its own
dequantized values gets its grid back. 0.5 byte per weight plus 8 bytes of scale/min per 32
weights: 0.75 byte/weight on disk (fp32 scales), half of int8's bytes read per decode token.

Checkpoint layout (portable, what `Int4Linear` stores): qweight uint8 [N, K/2], the weight at
column 2i in the low nibble of byte i and column 2i+1 in the high one; weight_scale and
weight_min fp32 [N, K/GROUP].

Kernel: torch's CPU `_weight_int4pack_mm_for_cpu` computes x @ w^T from its own packed layout
(made by `_convert_weight_to_int4pack_for_cpu`) with w = (q - 8) * s + z, so z = min + 8 * scale.
Measured here (bench/decode_parts.py, 2 threads, 3072x576, µs): M=1 kernel 36 | dequantise +
bf16 GEMM 1700-7000 (noisy) | bf16 weights 77; M=32 372 | ~2700 | 192; M=128 1814 | ~2000 |
568; M=256 3056 | ~2500 | 1058. The kernel's time grows linearly with M (a GEMV loop): it is
the fast path for batch-1 decode, and beats dequantising up to ~128 rows; above KERNEL_MAX_M rows (prefill chunks) the weights are
dequantised into the activation dtype and multiplied there (fp32 for bf16 activations on a CPU
whose bf16 matmuls are slow: hardware.matmul_dtype). At every M > ~16 bf16 weights are
faster: int4 trades batch throughput for batch-1 speed and size.
"""

import torch
import torch.nn.functional as F

from nanoseek import hardware

GROUP = 32
QMAX = 15
KERNEL_MAX_M = 64  # rows up to which the int4 kernel runs (it beats dequantise + GEMM up to ~128)
KERNEL_N_MULTIPLE = 16  # the CPU packing wants N divisible by 16


def quantize_groups(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [N, K] -> (q uint8 [N, K] in 0..15, scale fp32 [N, K/group], min fp32 [N, K/group])."""
    N, K = w.shape
    if K % group:
        raise ValueError(f"int4: K={K} is not a multiple of the group size {group}")
    wg = w.float().view(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / QMAX).clamp(min=1e-12)
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, QMAX).to(torch.uint8)
    return q.view(N, K), scale, lo


def dequantize(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """q uint8 [..., K] (unpacked, 0..15), scale/min [..., K/group] -> float [..., K]."""
    group = q.shape[-1] // scale.shape[-1]
    wg = q.float().view(*q.shape[:-1], -1, group) * scale[..., None].float() + lo[..., None].float()
    return wg.view(q.shape).to(dtype)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype=torch.float32):
    """The checkpoint layout (nibbles uint8 [..., K/2], scale/min) -> float [..., K]. A 2-D CPU
    weight goes through the compiled loop's one-pass form where it is built (the same values,
    exactly; ~8x faster: prefill above KERNEL_MAX_M rows dequantises every weight every step)."""
    if packed.dim() == 2 and packed.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and \
            (2 * packed.shape[1] // max(scale.shape[-1], 1)) % 8 == 0:
        from nanoseek.engine import native  # imported here: the engine imports this module
        mod = native.module()
        if mod is not None:
            return mod.dequantize_int4(packed, scale, lo, dtype)
    return dequantize(unpack_nibbles(packed), scale, lo, dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] in 0..15 -> uint8 [..., K/2]: column 2i low nibble, 2i+1 high."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 [..., K]."""
    return torch.stack([p & 0xF, p >> 4], -1).flatten(-2)


def kernel_usable(N: int, K: int, group: int) -> bool:
    return N % KERNEL_N_MULTIPLE == 0 and K % group == 0 and group in (32, 64, 128, 256)


def kernel_weight(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype):
    """Portable (qweight, scale, min) -> the CPU kernel's (packed weight, scales_and_zeros [K/g, N, 2])."""
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(packed).to(torch.int32), 2)
    zeros = lo.float() + (QMAX + 1) // 2 * scale.float()
    return w, torch.stack([scale.float(), zeros], -1).transpose(0, 1).contiguous().to(dtype)


def weight_only_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                   kernel=None) -> torch.Tensor:
    """x [M, K] (float) @ w^T -> [M, N] in x.dtype. kernel: kernel_weight(...) for x.dtype, or
    None (then this dequantises)."""
    M = x.shape[0]
    if kernel is not None and M <= KERNEL_MAX_M:
        group = x.shape[1] // scale.shape[1]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), kernel[0], group, kernel[1])
    dt = hardware.matmul_dtype(x.dtype, x.device)  # bf16 on a CPU without bf16 matmul units: fp32
    return F.linear(x.to(dt), dequantize_packed(packed, scale, lo, dt)).to(x.dtype)
