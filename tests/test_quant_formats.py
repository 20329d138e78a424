"""INT8, INT4 and FP8 codecs and matmuls: error bounds, odd shapes, kernel paths, batch invariance."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek import hardware
from nanoseek.checkpoint.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from nanoseek.quant import int4, int8
from nanoseek.quant.layers import Fp8Embedding, Fp8Linear, Int4Linear, Int8Embedding, Int8Linear


from tests.fixtures import one_thread  # noqa: E402,F401  (autouse: this module runs on one thread)


def weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0, 0] = 0.3  # an outlier: its row's step is coarse, the other rows must not care
    return w


@pytest.mark.parametrize("shape", [(96, 64), (37, 33), (2, 5)])
def test_int8_rows_error_at_most_half_a_step(shape):
    w = weights(*shape)
    q, s = int8.quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (shape[0], 1) and int(q.abs().max()) <= 127
    err = (int8.dequantize_rows(q, s) - w).abs()
    assert (err <= s / 2 + 1e-7).all()  # symmetric round-to-nearest: at most half a step per element
    assert (int8.dequantize_rows(q, s)[1:] - w[1:]).norm() / w[1:].norm() < 0.01


@pytest.mark.parametrize("shape", [(256, 384), (136, 160), (200, 24), (7, 129)])
def test_fp8_blocks_error_within_e4m3_rounding(shape):
    """128x128 blocks, partial edge blocks included: |err| <= 2^-4 |w| (3 mantissa bits),
    or half the subnormal spacing (2^-10 of the block scale) for tiny values."""
    w = weights(*shape)
    q, s = quantize_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    d = dequantize_fp8_blocks(q, s)
    block_scale = s.repeat_interleave(128, 0)[:shape[0]].repeat_interleave(128, 1)[:, :shape[1]]
    assert ((d - w).abs() <= torch.maximum(w.abs() * 2**-4, block_scale * 2**-10) * 1.0001).all()
    assert (d - w).norm() / w.norm() < 0.04


def test_weight_only_matmul_all_paths_agree():
    """The packed GEMV (small M), the dequantise+GEMM path (large M, odd K, misaligned input)
    and fp32 all compute x @ (q*scale)^T."""
    w = weights(64, 96)
    q, s = int8.quantize_rows(w)
    ref_w = int8.dequantize_rows(q, s)
    for M in (1, 3, 8, 9, 40):
        x = torch.randn(M, 96)
        ref = x @ ref_w.t()
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            out = int8.weight_only_mm(x.to(dtype), q, s)
            assert out.dtype == dtype
            assert (out.float() - ref).abs().max() / ref.abs().max() < tol, (M, dtype)
    # a row view starting 2 bytes into its storage: must be copied to an aligned buffer, not crash
    x = torch.randn(1, 97).bfloat16()[:, 1:]
    assert x.data_ptr() % 64 != 0
    out = int8.weight_only_mm(x, q, s)
    assert (out.float() - x.float() @ ref_w.t()).abs().max() < 2e-2 * (x.float() @ ref_w.t()).abs().max()
    q_odd, s_odd = int8.quantize_rows(weights(16, 40))  # K % 16 != 0: the packed kernel would misread
    x = torch.randn(2, 40).bfloat16()
    ref = x.float() @ int8.dequantize_rows(q_odd, s_odd).t()
    assert (int8.weight_only_mm(x, q_odd, s_odd).float() - ref).abs().max() < 2e-2 * ref.abs().max()


def test_dynamic_matmul_is_exact_integer_arithmetic_and_batch_invariant():
    w = weights(48, 64)
    q, s = int8.quantize_rows(w)
    x = torch.randn(10, 64)
    xq, sx = int8.quantize_tokens(x)
    assert (((xq.float() * sx) - x).abs() <= sx / 2 + 1e-7).all()
    exact = (xq.double() @ q.double().t()) * sx.double() * s.double().t()
    out = int8.dynamic_mm(x, q, s)
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=1e-9)
    # per-token scales: a token's output does not depend on its batch-mates
    assert torch.equal(int8.dynamic_mm(x[3:4], q, s), out[3:4])
    assert (out - x @ w.t()).norm() / (x @ w.t()).norm() < 0.02


def test_modules_expose_dequantised_weight_and_match_float_linear():
    w, b = weights(40, 64), torch.randn(40) * 0.1
    x = torch.randn(2, 5, 64)
    ref = F.linear(x, w, b)
    for m, tol in ((Int8Linear.from_float(w, b, dtype=torch.float32), 0.01),
                   (Int8Linear.from_float(w, b, dynamic=True, dtype=torch.float32), 0.02),
                   (Fp8Linear.from_float(w, b, dtype=torch.float32), 0.05)):
        assert m.weight.shape == w.shape and m.weight.dtype == torch.float32
        assert (m.weight - w).norm() / w.norm() < tol
        y = m(x)
        assert y.shape == ref.shape and (y - ref).norm() / ref.norm() < tol, m
    table = weights(300, 64)
    ids = torch.tensor([[0, 5, 299], [128, 129, 7]])
    lin8 = Int8Linear.from_float(table, dtype=torch.float32)
    linf = Fp8Linear.from_float(table, dtype=torch.float32)
    for emb in (Int8Embedding(lin8.qweight, lin8.weight_scale, torch.float32),
                Fp8Embedding(linf.qweight, linf.weight_scale_inv, torch.float32)):
        # a lookup dequantises exactly the rows of the full dequantised table
        assert torch.equal(emb(ids), emb.weight[ids])
        assert (emb(ids) - table[ids]).abs().max() < 0.02


def test_fp8_activation_groups_and_cpu_fallback():
    """The GPU path's activation quantisation (DeepSeek's act_quant: per token, per 128 channels)
    is exact to e4m3 rounding; on CPU the tensor-core path declines and Fp8Linear dequantises."""
    from nanoseek.quant import fp8
    x = torch.randn(3, 256) * torch.tensor([1.0, 100.0]).repeat_interleave(128)  # groups of very different range
    xq, s = fp8.quantize_groups(x)
    assert xq.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = xq.float().view(3, 2, 128) * s.unsqueeze(-1)
    assert ((back.view(3, 256) - x).abs() <= x.abs() * 2**-4 + s.repeat_interleave(128, 1) * 2**-10).all()
    q, sw = quantize_fp8_blocks(weights(128, 256))
    assert fp8.gpu_block_mm(x, q, sw) is None


@pytest.mark.parametrize("shape", [(96, 64), (40, 32), (3, 160)])
def test_int4_groups_error_at_most_half_a_step_and_the_grid_comes_back(shape):
    """Round to nearest on each group's 16 levels between its min and max; re-quantizing the
    dequantized weights gives the same q, scale and min (a Q4_1 GGUF's grid survives loading)."""
    w = weights(*shape)
    q, scale, lo = int4.quantize_groups(w)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == lo.shape == (shape[0], shape[1] // 32)
    d = int4.dequantize(q, scale, lo)
    step = scale.repeat_interleave(32, 1)
    assert ((d - w).abs() <= step / 2 * 1.0001 + 1e-9).all()
    assert (d[1:] - w[1:]).norm() / w[1:].norm() < 0.12  # 16 levels: ~8% on Gaussian weights
    q2, scale2, lo2 = int4.quantize_groups(d)
    assert torch.equal(q2, q) and torch.allclose(scale2, scale, rtol=1e-5) and torch.allclose(lo2, lo, atol=1e-7)
    p = int4.pack_nibbles(q)
    assert p.shape == (shape[0], shape[1] // 2) and torch.equal(int4.unpack_nibbles(p), q)
    assert torch.equal(p[:, 0] & 0xF, q[:, 0]) and torch.equal(p[:, 0] >> 4, q[:, 1])  # column 2i low, 2i+1 high
    with pytest.raises(ValueError, match="K=40 is not a multiple of the group size 32"):
        int4.quantize_groups(weights(4, 40))


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_dequantised_matmul_runs_in_fp32_where_bf16_matmuls_are_slow(monkeypatch, fmt, fast):
    """Above their kernels' rows, int8 and int4 weights are dequantised and multiplied: in bf16
    where the CPU has bf16 matmul units, in fp32 where it has not (an AVX2-only CPU runs a bf16
    matmul ~10x slower than fp32), returning bf16 either way."""
    monkeypatch.setattr(hardware, "_cpu_bf16", lambda: fast)
    seen, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, *a: seen.append((x.dtype, w.dtype)) or linear(x, w, *a))
    w = weights(64, 96)
    x = torch.randn(80, 96).bfloat16()  # 80 rows: above int8's PACK_MAX_M and int4's KERNEL_MAX_M
    if fmt == "int8":
        q, s = int8.quantize_rows(w)
        ref = x.float() @ int8.dequantize_rows(q, s).t()
        out = int8.weight_only_mm(x, q, s)
    else:
        lin = Int4Linear.from_float(w)
        ref = x.float() @ int4.dequantize(int4.unpack_nibbles(lin.qweight), lin.weight_scale, lin.weight_min).t()
        out = lin(x)
    want = torch.bfloat16 if fast else torch.float32
    assert seen == [(want, want)] and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() / ref.abs().max() < 1e-2


@pytest.mark.parametrize("n", [64, 40])
def test_int4_linear_kernel_and_dequantised_paths_agree(n):
    """The CPU int4 kernel (M <= KERNEL_MAX_M rows, N a multiple of 16) and the dequantise + GEMM
    path (more rows; N = 40 never uses the kernel) both compute x @ w^T in bf16 and fp32."""
    lin = Int4Linear.from_float(weights(n, 96), bias=torch.randn(n))
    ref_w = int4.dequantize(int4.unpack_nibbles(lin.qweight), lin.weight_scale, lin.weight_min)  # fp32
    for M in (1, 4, 5, 40):
        kernel = 2 * M <= int4.KERNEL_MAX_M and n % 16 == 0
        for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 2e-3 if kernel else 1e-5)):
            x = torch.randn(2, M, 96)
            ref = x @ ref_w.t() + lin.bias.float()
            lin.dtype = dtype
            out = lin(x.to(dtype))
            assert out.dtype == dtype and out.shape == (2, M, n)
            assert (out.float() - ref).abs().max() / ref.abs().max() < tol, (M, dtype)
    assert (lin._kernel is not None) == (n % 16 == 0)  # built lazily, only where the kernel runs
    x = torch.randn(1, 96).bfloat16()
    before = lin(x)
    lin.qweight = int4.pack_nibbles(15 - int4.unpack_nibbles(lin.qweight))  # a replaced weight is noticed
    assert not torch.equal(lin(x), before)
