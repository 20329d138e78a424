"""nanoseek/hardware.py: whether bf16 runs at speed here, and what follows from it (the prepacked
weights' check, the peak FLOP/s a run's MFU divides by, training's autocast)."""

import torch

from nanoseek import hardware
from nanoseek.train import metrics


def test_bf16_fast_is_what_onednn_can_do_here():
    """bf16_fast() says True exactly where oneDNN takes a bf16 weight into its blocked layout (the
    kernels ATen's bf16 matmul uses); on an AVX2-only CPU the reorder raises."""
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    try:
        torch.ops.mkldnn._reorder_linear_weight(w)
        reorders = True
    except RuntimeError:
        reorders = False
    assert hardware.bf16_fast("cpu") == reorders
    assert hardware.auto_precision("cpu") == ("bf16" if reorders else "fp32")


def test_peak_measurement_shrinks_where_matmuls_are_slow(monkeypatch):
    """The 2048^3 matmul would take ~17 s a run on a CPU without fast bf16: the probe's rate picks a
    smaller n that fits the budget."""
    sizes = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: sizes.append(shape) or real(*shape, **kw))
    rate = metrics.measure_peak_flops(torch.float32, n=2048, repeats=1, budget_s=1e-6)
    assert rate > 0 and sizes[-1] == (256, 256)  # the floor: any real CPU misses a 1 µs budget
    sizes.clear()
    metrics.measure_peak_flops(torch.float32, n=256, repeats=1, budget_s=1e6)
    assert sizes[-1] == (256, 256)  # never grown past what was asked


def test_peak_cache_keeps_bf16_and_fp32_apart(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path))
    asked = []
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda dtype, device="cpu": asked.append(dtype) or
                        (2.0 if dtype == torch.bfloat16 else 1.0))
    assert metrics.peak_flops(bf16=True) == 2.0 and metrics.peak_flops(bf16=False) == 1.0
    assert metrics.peak_flops(bf16=True) == 2.0 and asked == [torch.bfloat16, torch.float32]  # cached
