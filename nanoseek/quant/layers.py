"""Quantized drop-ins for nn.Linear and nn.Embedding.

Each module stores exactly what its checkpoint stores (`qweight` is written as `weight`):
    Int8Linear / Int8Embedding   qweight int8 [N, K]          weight_scale fp32 [N, 1]
    Int4Linear                   qweight uint8 [N, K/2]       weight_scale, weight_min fp32 [N, K/32]
    Fp8Linear / Fp8Embedding     qweight float8_e4m3fn [N, K] weight_scale_inv fp32 [ceil(N/128), ceil(K/128)]
and offers `.weight`, the dequantised matrix in the compute dtype, for code that reads the
matrix itself (MLA's absorbed decode path reads kv_b_proj.weight; error reports).
Biases stay float in the compute dtype. A tied lm_head shares its embedding's tensors.
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.quant import fp8, int4, int8


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b. dynamic=True: x is quantised per token too (int8 x int8 -> int32)."""

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 dynamic: bool = False, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.dynamic, self.dtype = dynamic, dtype
        self.register_buffer("qweight", int8.aligned(qweight))  # the CPU int8 kernel needs aligned rows
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    @classmethod
    def from_float(cls, weight, bias=None, dynamic=False, dtype=torch.bfloat16):
        return cls(*int8.quantize_rows(weight), bias, dynamic, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return int8.dequantize_rows(self.qweight, self.weight_scale, self.dtype)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        mm = int8.dynamic_mm if self.dynamic else int8.weight_only_mm
        y = mm(x2, self.qweight, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, {'int8 x int8 dynamic' if self.dynamic else 'int8 weight-only'}"


class Int8Embedding(nn.Module):
    """Rows of an int8 table with one scale per row (the same layout a tied lm_head multiplies by)."""

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.dtype = dtype
        self.register_buffer("qweight", int8.aligned(qweight))  # aligned once, so a tied lm_head can share it
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1))

    @property
    def weight(self) -> torch.Tensor:
        return int8.dequantize_rows(self.qweight, self.weight_scale, self.dtype)

    def forward(self, ids):
        return (self.qweight[ids].float() * self.weight_scale[ids]).to(self.dtype)


class Int4Linear(nn.Module):
    """y = x @ w^T + b, w in 4-bit groups (nanoseek/quant/int4.py). The CPU kernel's own packed
    copy of the weight is made on the first call that can use it and kept beside the portable
    nibbles (not saved; 0.5 byte/weight more memory, none more read per token)."""

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, weight_min: torch.Tensor,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.dtype = dtype
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("weight_scale", weight_scale.float().contiguous())
        self.register_buffer("weight_min", weight_min.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self._kernel = None  # (source ptr, dtype, kernel tensors)

    @classmethod
    def from_float(cls, weight, bias=None, dtype=torch.bfloat16):
        q, scale, lo = int4.quantize_groups(weight)
        return cls(int4.pack_nibbles(q), scale, lo, bias, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return int4.dequantize_packed(self.qweight, self.weight_scale, self.weight_min, self.dtype)

    def kernel(self, x: torch.Tensor):
        """The CPU kernel's weight for x's dtype, or None where it cannot run."""
        if x.device.type != "cpu" or x.shape[0] > int4.KERNEL_MAX_M or not int4.kernel_usable(
                self.out_features, self.in_features, self.in_features // self.weight_scale.shape[1]):
            return None
        k = self._kernel
        if k is None or k[0] != self.qweight.data_ptr() or k[1] != x.dtype:  # rebuilt if the weight was replaced
            k = self._kernel = (self.qweight.data_ptr(), x.dtype,
                                int4.kernel_weight(self.qweight, self.weight_scale, self.weight_min, x.dtype))
        return k[2]

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        y = int4.weight_only_mm(x2, self.qweight, self.weight_scale, self.weight_min, self.kernel(x2))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, int4 weight-only, groups of {int4.GROUP}"


class Fp8Linear(nn.Module):
    """y = x @ w^T + b with w in DeepSeek's 128x128-block FP8 format.

    CUDA: FP8 tensor cores (nanoseek/quant/fp8.py). Elsewhere: the blocks are dequantised once
    into a compute-dtype copy kept beside the FP8 bytes (not saved): on CPU, converting FP8 on
    every call costs ~30x the matmul, so this copy is the only fast option; it costs
    2 bytes/weight of memory on top of the 1 byte/weight of FP8.
    """

    def __init__(self, qweight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale_inv", weight_scale_inv.float())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self._dequantized = None

    @classmethod
    def from_float(cls, weight, bias=None, dtype=torch.bfloat16):
        from nanoseek.checkpoint.fp8 import quantize_fp8_blocks
        return cls(*quantize_fp8_blocks(weight), bias, dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        w = self._dequantized
        if w is None or w.dtype != dtype or w.device != self.qweight.device:
            w = self._dequantized = fp8.dequantize(self.qweight, self.weight_scale_inv, dtype)
        return w

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized(self.dtype)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        y = fp8.gpu_block_mm(x2, self.qweight, self.weight_scale_inv) if x.is_cuda else None
        if y is None:
            y = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, fp8 e4m3 128x128 blocks"


class Fp8Embedding(nn.Module):
    """FP8 table in 128x128 blocks; a lookup dequantises only the rows it gathers."""

    def __init__(self, qweight: torch.Tensor, weight_scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale_inv", weight_scale_inv.float())

    @property
    def weight(self) -> torch.Tensor:
        return fp8.dequantize(self.qweight, self.weight_scale_inv, self.dtype)

    def forward(self, ids):
        b = fp8.BLOCK
        rows = self.qweight[ids].float()                                   # [..., D]
        scales = self.weight_scale_inv[ids // b].repeat_interleave(b, -1)  # [..., ceil(D/b)*b]
        return (rows * scales[..., :self.embedding_dim]).to(self.dtype)


QUANT_LINEARS = (Int8Linear, Int4Linear, Fp8Linear)
QUANT_EMBEDDINGS = (Int8Embedding, Fp8Embedding)
QUANT_MODULES = QUANT_LINEARS + QUANT_EMBEDDINGS
