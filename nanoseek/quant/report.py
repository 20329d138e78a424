"""Per-layer quantization error: how far each dequantised matrix is from the original.

    rel_error = ||W - dequant(quant(W))||_F / ||W||_F

For reference, the expected values from the formats alone (Gaussian-like weights):
INT8 per channel ~0.5-1% (the step is amax/127, and amax sits at ~3-4 sigma); FP8 e4m3 ~2-3%
(3 mantissa bits: relative rounding error up to 2^-4 per element, independent of the scale).
A layer far above its format's typical value has outliers worth a look.
"""

import torch

from nanoseek.quant.convert import float_weight
from nanoseek.quant.layers import QUANT_MODULES


@torch.no_grad()
def weight_errors(original, quantized) -> list[tuple[str, tuple[int, int], float]]:
    """(module name, weight shape, relative Frobenius error) for every quantized module."""
    rows, seen = [], set()
    for name, module in quantized.named_modules():
        if not isinstance(module, QUANT_MODULES) or id(module.qweight) in seen:
            continue  # a tied lm_head is the embedding table again
        seen.add(id(module.qweight))
        w = original.get_submodule(name).weight.float()
        err = (float_weight(module) - w).norm() / w.norm().clamp(min=1e-30)
        rows.append((name, tuple(w.shape), err.item()))
    return rows


def format_report(rows, scheme: str) -> str:
    if not rows:
        return f"{scheme}: no quantized layers"
    width = max(len(n) for n, _, _ in rows)
    lines = [f"{'layer':<{width}}  {'shape':>13}  rel. error ({scheme})"]
    for name, shape, err in rows:
        lines.append(f"{name:<{width}}  {str(shape[0]) + 'x' + str(shape[1]):>13}  {err:.3%}")
    errs = torch.tensor([e for _, _, e in rows])
    worst = rows[int(errs.argmax())][0]
    lines.append(f"{len(rows)} layers: mean {errs.mean():.3%}, median {errs.median():.3%}, max {errs.max():.3%} ({worst})")
    return "\n".join(lines)
