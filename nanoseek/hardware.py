"""What this machine's arithmetic units do well: whether bf16 matmuls run at speed here.

A CPU computes bf16 matmuls fast only where oneDNN has bf16 kernels for it: AVX-512 (with or
without its BF16 extension), AMX, or AVX-NE-CONVERT. That is the same test ATen makes before it
hands a bf16 matmul to oneDNN; elsewhere (an AVX2-only CPU: many laptops, some cloud VMs) the
matmul falls back to a scalar loop, measured here (AVX2 AMD EPYC) at ~1 GFLOP/s for a square bf16
matmul and ~10 for an nn.Linear shape, against ~72-180 for fp32 on 2 threads. On such a CPU bf16
costs 7-50x in speed for nothing, so what nanoseek picks by default ("auto" precision, training's
bf16 autocast) is fp32 there, and an explicit bf16 says why it is slow.
"""

import functools
import sys

import torch


@functools.cache
def _cpu_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_fast(device="cpu") -> bool:
    """Do bf16 matmuls run at (at least) fp32 speed on this device?"""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16()
    return True  # other accelerators (mps, xpu): bf16 is theirs to run


def matmul_dtype(dtype: torch.dtype, device="cpu") -> torch.dtype:
    """The dtype to multiply `dtype` activations in: fp32 for bf16 where bf16 matmuls are slow
    (a bf16 product is exact in fp32, so only where the result rounds to bf16 can it differ),
    else `dtype` itself. Quantized weights dequantise into it above their kernels' rows."""
    return torch.float32 if dtype == torch.bfloat16 and not bf16_fast(device) else dtype


def auto_precision(device="cpu") -> str:
    """'bf16' where it runs fast, else 'fp32': the default float precision for this machine."""
    return "bf16" if bf16_fast(device) else "fp32"


_SLOW_BF16 = ("this CPU has no bf16 matmul units (oneDNN needs AVX-512, AMX or AVX-NE-CONVERT; "
             "torch's {cap} fallback runs bf16 matmuls ~7x slower than fp32)")

_warned: set = set()


def warn_slow_bf16(what: str, advice: str, device="cpu"):
    """One line on stderr, once per `what`, when bf16 was asked for on a device that runs it slowly."""
    if bf16_fast(device) or what in _warned:
        return
    _warned.add(what)
    why = (_SLOW_BF16.format(cap=torch.backends.cpu.get_cpu_capability()) if torch.device(device).type == "cpu"
           else "this GPU has no bf16 support")
    print(f"nanoseek: warning: {what}: {why}; {advice}", file=sys.stderr)
