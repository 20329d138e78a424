"""DeepSeek's block-FP8 weights: float8_e4m3fn values with one fp32 scale per 128x128 block.

The checkpoint stores `weight` (fp8) and `weight_scale_inv` [ceil(M/128), ceil(N/128)]; the real
weight is weight * scale_inv, block by block (edge blocks may be partial).
"""

import torch

BLOCK = 128


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """fp8 [M, N] and scales [ceil(M/b), ceil(N/b)] -> fp32 [M, N]."""
    M, N = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]
    return weight.float() * scale


def quantize_fp8_blocks(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32/bf16 [M, N] -> (fp8 [M, N], scale_inv [ceil(M/b), ceil(N/b)]), amax-scaled per block."""
    M, N = weight.shape
    mb, nb = -(-M // block), -(-N // block)
    padded = torch.zeros(mb * block, nb * block, dtype=torch.float32)
    padded[:M, :N] = weight.float()
    blocks = padded.view(mb, block, nb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(mb * block, nb * block)[:M, :N].contiguous(), scale_inv
