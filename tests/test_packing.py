"""Packed q/k/v and gate/up projections: same numbers, same tensors, and safe when the model changes."""

import copy

import pytest
import torch

from nanoseek.checkpoint.hf import load_hf
from nanoseek.model.packing import pack_projections
from nanoseek.quant import quantize_model
from tests.tiny_models import VOCAB, make_deepseek_v3, make_llama, make_qwen2

MAKERS = {"llama": make_llama, "qwen2": make_qwen2, "deepseek_v3": make_deepseek_v3}


@pytest.fixture(scope="module", params=list(MAKERS))
def source(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    MAKERS[request.param](path)
    return request.param, path


def ids(n=11, seed=0):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def storages(model):
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


@torch.no_grad()
def test_packed_model_computes_the_same_with_the_same_tensors(source):
    name, path = source
    plain, packed = load_hf(path).eval(), load_hf(path).eval()
    keys = list(packed.state_dict())
    n_params = packed.num_params()
    count = pack_projections(packed)
    layers = packed.config.n_layers
    gqa = name != "deepseek_v3"
    assert count >= (2 * layers if gqa else layers)  # q/k/v per GQA layer, gate/up per MLP (experts too)
    assert list(packed.state_dict()) == keys and packed.num_params() == n_params
    # every q/k/v weight now lives in one stacked tensor: fewer storages, no extra bytes
    assert len(storages(packed)) < len(storages(plain))
    if gqa:
        attn = packed.layers[0].self_attn
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    x = ids()
    assert (packed(x) - plain(x)).abs().max() < 1e-5
    assert pack_projections(packed) == 0  # idempotent


@torch.no_grad()
def test_in_place_updates_reach_the_packed_matmul_and_swaps_fall_back(tmp_path):
    make_llama(tmp_path / "m")
    plain, packed = load_hf(tmp_path / "m").eval(), load_hf(tmp_path / "m").eval()
    pack_projections(packed)
    x = ids()
    for m in (plain, packed):  # an optimizer step is an in-place update of the same Parameter
        m.layers[1].self_attn.k_proj.weight.add_(0.05)
        m.layers[0].mlp.up_proj.weight.mul_(1.5)
    assert (packed(x) - plain(x)).abs().max() < 1e-5
    # a swapped module (LoRA wrapping, quantization) or a recast tensor: the plain modules run
    fresh = torch.nn.Linear(plain.config.dim, plain.config.n_kv_heads * plain.config.head_dim, bias=False)
    for m in (plain, packed):
        m.layers[0].self_attn.v_proj = copy.deepcopy(fresh)
    assert not packed.layers[0].self_attn.packed.valid(
        (packed.layers[0].self_attn.q_proj, packed.layers[0].self_attn.k_proj, packed.layers[0].self_attn.v_proj))
    assert (packed(x) - plain(x)).abs().max() < 1e-5
    packed.double()
    plain.double()
    assert (packed(x) - plain(x)).abs().max() < 1e-9


@torch.no_grad()
def test_packed_model_saves_and_reloads(tmp_path):
    make_qwen2(tmp_path / "m")
    model = load_hf(tmp_path / "m").eval()
    pack_projections(model)
    model.save(tmp_path / "saved")  # views of the stacked tensors are written as their own tensors
    again = load_hf(tmp_path / "saved").eval()
    x = ids()
    assert torch.equal(again(x), model(x)) or (again(x) - model(x)).abs().max() < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@torch.no_grad()
def test_quantized_projections_pack_exactly(tmp_path, scheme):
    make_llama(tmp_path / "m")
    plain = quantize_model(load_hf(tmp_path / "m"), scheme, dtype=torch.float32).eval()
    packed = copy.deepcopy(plain)
    assert pack_projections(packed) > 0
    x = ids()
    assert (packed(x) - plain(x)).abs().max() < 1e-5
    # bf16, one token: int4's CPU kernel runs, on the packed q/k/v and gate/up too
    plain = quantize_model(load_hf(tmp_path / "m"), scheme).eval()
    packed = copy.deepcopy(plain)
    pack_projections(packed)
    one = torch.tensor([[3]])
    assert (packed(one) - plain(one)).abs().max() < 0.02 * plain(one).abs().max()
    if scheme == "int4":
        assert packed.layers[0].mlp.packed.quant._kernel is not None and plain.layers[0].mlp.up_proj._kernel is not None
    packed.save(tmp_path / "q")  # the quantized checkpoint too
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_training_after_packing_reaches_the_parameters(tmp_path):
    make_llama(tmp_path / "m")
    model = load_hf(tmp_path / "m")
    pack_projections(model)
    model(ids()).logsumexp(-1).mean().backward()  # autograd on: the plain modules run
    for p in (model.layers[0].self_attn.q_proj.weight, model.layers[1].mlp.gate_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
