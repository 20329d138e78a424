"""Building blocks shared by every architecture: RMSNorm, rotary embeddings, SwiGLU MLP."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


# Rows normalised at a time at inference on a CPU: F.rms_norm there is several passes, each with a fresh
# fp32 temporary, so a long prefill's [T, dim] norm costs ~5x more in one piece (page faults,
# cache misses) than in slices of 256 rows (32K x 576: 256 -> 54 ms, one thread). Same result.
NORM_ROWS = 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        # normalise in fp32 (bf16 loses too much in the mean of squares), scale in the input dtype;
        # F.rms_norm is one fused kernel instead of five ops (it matters at batch-1 decode)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def forward(self, x):
        D = x.shape[-1]
        if x.numel() <= NORM_ROWS * D or torch.is_grad_enabled() or not x.is_contiguous() or x.device.type != "cpu":
            return self._norm(x)
        out = x.new_empty(x.shape, dtype=torch.promote_types(self.weight.dtype, x.dtype))
        rows, out_rows = x.view(-1, D), out.view(-1, D)
        for a in range(0, rows.shape[0], NORM_ROWS):
            torch.mul(self.weight, F.rms_norm(rows[a:a + NORM_ROWS].float(), (D,), eps=self.eps).to(x.dtype),
                      out=out_rows[a:a + NORM_ROWS])
        return out


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)
        self.packed = None  # gate/up as one matmul, set for inference by nanoseek/model/packing.py

    def forward(self, x):
        if self.packed is not None and self.packed.valid((self.gate_proj, self.up_proj)):
            gate, up = self.packed(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- rotary position embeddings -----------------------------------------------------------

def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] and the factor cos/sin are multiplied by.

    Plain RoPE, linear interpolation, Llama-3's smooth band scaling, and YaRN (NTK-by-parts
    ramp between interpolated and extrapolated frequencies, plus an attention temperature).
    """
    dim, base, s = cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling or {}
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    kind = s.get("type")
    if kind is None:
        return inv_freq, 1.0
    factor = s["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old_len = s["original_max_position_embeddings"]
        lo, hi = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    old_len = s.get("original_max_position_embeddings") or cfg.max_seq_len
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the dim whose wavelength makes `rotations` turns over old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency (interpolated)
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    attn_factor = s.get("attention_factor")
    if attn_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn_factor = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if (m and m_all) else _yarn_mscale(factor)
    return inv_freq, float(attn_factor)


def softmax_scale(cfg: ModelConfig, qk_head_dim: int) -> float:
    """1/sqrt(d), times YaRN's mscale^2 when the config asks for it (DeepSeek's mscale_all_dim)."""
    scale = qk_head_dim ** -0.5
    s = cfg.rope_scaling or {}
    if s.get("type") == "yarn" and s.get("mscale_all_dim"):
        scale *= _yarn_mscale(s["factor"], s["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by position; grown on demand, never saved in checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.cos = self.sin = None

    def _build(self, length: int, device):
        inv_freq, attn_factor = rope_frequencies(self.cfg)
        t = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.cos = (freqs.cos() * attn_factor).to(device)
        self.sin = (freqs.sin() * attn_factor).to(device)

    def forward(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1 if positions.numel() else 1
        if self.cos is None or self.cos.shape[0] < need or self.cos.device != positions.device:
            self._build(max(need, self.cfg.max_seq_len, 64), positions.device)
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, T, H, D] by position. cos/sin are [B, T, D/2].

    Half-split (Llama) pairs dim i with i + D/2; interleaved (DeepSeek) pairs 2i with 2i+1.
    The interleaved output is written in half-split order; q and k get the same order, so
    their dot products (all attention ever uses) are unchanged.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
