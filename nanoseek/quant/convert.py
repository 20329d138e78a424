"""Turn a Transformer into a quantized one, in place.

What gets quantized: every projection (attention q/k/v/o and MLA's low-rank pieces including
kv_b_proj, dense MLPs, every routed and shared MoE expert). What stays float, in the compute
dtype: norms, biases, the MoE router (`mlp.gate`, not an nn.Linear: its top-k choices flip on
tiny errors), and, unless asked, the embeddings and lm_head (for a tied-embedding model such as
SmolLM2 they are 20% of the weights, so asking is what halves the size).
"""

import torch
from torch import nn

from nanoseek.errors import NanoseekError
from nanoseek.model.transformer import Transformer
from nanoseek.quant import fp8, int4, int8
from nanoseek.quant.layers import (QUANT_EMBEDDINGS, QUANT_LINEARS, QUANT_MODULES, Fp8Embedding, Fp8Linear,
                                   Int4Linear, Int8Embedding, Int8Linear)

SCHEMES = ("int8", "int8-dynamic", "int4", "fp8")


class QuantizedTransformer(Transformer):
    """A Transformer some of whose modules are quantized; `quant_scheme` says how.

    dtype and device come from the final norm: the embedding table may be int8, and its
    dequantised `.weight` is far too costly to build on every engine step just to read a dtype.
    """

    quant_scheme: str

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def save(self, path, tokenizer=None):
        from nanoseek.quant.checkpoint import save_quantized
        save_quantized(self, path, tokenizer)


def check_scheme(scheme: str, what: str = "scheme") -> str:
    if scheme not in SCHEMES:
        raise NanoseekError(f"{what} {scheme!r} is not a quantization scheme (have: {', '.join(SCHEMES)})")
    return scheme


def dynamic_activations(scheme: str, name: str) -> bool:
    """int8-dynamic quantizes the inputs of every projection but lm_head's: the logits feed
    sampling directly, and at decode the weight-only kernel is the faster one anyway."""
    return scheme == "int8-dynamic" and name != "lm_head"


def linear_class(name: str, scheme: str, in_features: int) -> type:
    """The module a projection becomes under `scheme`. int4 keeps lm_head in int8, as the
    embeddings (the logits feed sampling; a Q4_1 GGUF keeps its output matrix in 8 bits too),
    and so any K that int4's groups cannot tile."""
    if scheme == "fp8":
        return Fp8Linear
    if scheme == "int4" and name != "lm_head" and in_features % int4.GROUP == 0:
        return Int4Linear
    return Int8Linear


def quantized_linear(name: str, scheme: str, weight, bias, dtype) -> nn.Module:
    cls = linear_class(name, scheme, weight.shape[1])
    if cls is Int8Linear:
        return Int8Linear.from_float(weight, bias, dynamic=dynamic_activations(scheme, name), dtype=dtype)
    return cls.from_float(weight, bias, dtype)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 matrix of a float or quantized module (not its compute-dtype `.weight`: no extra rounding)."""
    if isinstance(module, (Int8Linear, Int8Embedding)):
        return int8.dequantize_rows(module.qweight, module.weight_scale)
    if isinstance(module, Int4Linear):
        return int4.dequantize_packed(module.qweight, module.weight_scale, module.weight_min)
    if isinstance(module, (Fp8Linear, Fp8Embedding)):
        return fp8.dequantize(module.qweight, module.weight_scale_inv, torch.float32)
    return module.weight.float()


def targets(model: Transformer, quantize_embeddings: bool) -> list[str]:
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear,) + QUANT_LINEARS) and n != "lm_head"]
    head = model.get_submodule("lm_head")
    if quantize_embeddings or isinstance(model.embed_tokens, QUANT_EMBEDDINGS):
        names.append("embed_tokens")
    if quantize_embeddings or isinstance(head, QUANT_LINEARS):
        names.append("lm_head")
    return names


def cast_float_state(model: Transformer, dtype: torch.dtype):
    """Everything not quantized goes to the compute dtype (the balancing bias stays fp32, as in build_model)."""
    for module in model.modules():
        if isinstance(module, QUANT_MODULES):
            if getattr(module, "bias", None) is not None:
                module.bias.data = module.bias.data.to(dtype)
            module.dtype = dtype
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and name != "e_score_correction_bias":
                setattr(module, name, b.to(dtype))


def as_quantized(model: Transformer, scheme: str) -> "QuantizedTransformer":
    model.__class__ = QuantizedTransformer
    model.quant_scheme = scheme
    return model


@torch.no_grad()
def quantize_model(model: Transformer, scheme: str, quantize_embeddings: bool = False,
                   dtype: torch.dtype = torch.bfloat16) -> QuantizedTransformer:
    """Quantize `model` in place (quantize from fp32 weights for the least error) and return it.

    A model that is already quantized is converted: modules in another scheme are dequantised
    and quantized again; modules already in `scheme` are kept as they are.
    """
    check_scheme(scheme)
    cfg = model.config
    for name in targets(model, quantize_embeddings):
        old = model.get_submodule(name)
        kind = ((Fp8Embedding if scheme == "fp8" else Int8Embedding) if name == "embed_tokens"
                else linear_class(name, scheme, old.in_features))
        if isinstance(old, kind):
            if isinstance(old, Int8Linear):  # same weights: only the activation path differs
                old.dynamic = dynamic_activations(scheme, name)
            continue
        if name == "lm_head" and cfg.tie_embeddings:
            continue  # made from embed_tokens below
        if name == "embed_tokens":
            table = float_weight(old)
            if scheme == "fp8":
                new = Fp8Linear.from_float(table, dtype=dtype)
                emb = Fp8Embedding(new.qweight, new.weight_scale_inv, dtype)
            else:
                new = Int8Linear.from_float(table, dtype=dtype)
                emb = Int8Embedding(new.qweight, new.weight_scale, dtype)
            model.embed_tokens = emb
            if cfg.tie_embeddings:
                model.lm_head = new  # one table serves both: rows for lookup, rows as output channels
            continue
        model.set_submodule(name, quantized_linear(name, scheme, float_weight(old), old.bias, dtype))
    cast_float_state(model, dtype)
    return as_quantized(model, scheme)
