"""Quantized checkpoints: config.json with a `quantization_config`, tensors in safetensors.

FP8 is DeepSeek-V3's own format, so DeepSeek's published checkpoints, ours and transformers
share it:
    <module>.weight            float8_e4m3fn [N, K]
    <module>.weight_scale_inv  float32 [ceil(N/128), ceil(K/128)]
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}
INT8 (nanoseek's own; transformers has no loader for it):
    <module>.weight            int8 [N, K]
    <module>.weight_scale      float32 [N, 1]        (weight ~= int8 * scale, per output channel)
    "quantization_config": {"quant_method": "nanoseek", "scheme": "int8" | "int8-dynamic", ...}
INT4 (nanoseek's own; ggml's Q4_1 grid, nanoseek/quant/int4.py):
    <module>.weight            uint8 [N, K/2]        (two 4-bit weights per byte, column 2i low)
    <module>.weight_scale      float32 [N, K/32]
    <module>.weight_min        float32 [N, K/32]     (weight ~= q * scale + min, per group of 32)
    "quantization_config": {"quant_method": "nanoseek", "scheme": "int4", ...}
    Embeddings and lm_head, and any projection whose K is not a multiple of 32, are INT8 in the
    same checkpoint (as a Q4_1 GGUF keeps token_embd in Q8_0).
Everything else (norms, router, biases, unquantized embeddings) is stored in the compute dtype.
Which modules are quantized is read off the tensors (an int8/fp8 weight with its scale), so
embeddings quantized or not need no extra config field.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.checkpoint.fp8 import BLOCK
from nanoseek.checkpoint.hf import PRECISIONS, atomic_write, build_model, hf_name, our_name, safetensors_files, standalone
from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.quant import int4
from nanoseek.quant.convert import QuantizedTransformer, as_quantized, dynamic_activations
from nanoseek.quant.layers import Fp8Embedding, Fp8Linear, Int4Linear, Int8Embedding, Int8Linear

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
INT8_WEIGHTS = {"type": "int", "num_bits": 8, "symmetric": True, "strategy": "channel"}
INT4_WEIGHTS = {"type": "int", "num_bits": 4, "symmetric": False, "strategy": "group", "group_size": int4.GROUP}
INT8_TOKENS = {"type": "int", "num_bits": 8, "symmetric": True, "strategy": "token", "dynamic": True}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def quantization_config(scheme: str) -> dict:
    if scheme == "fp8":
        return dict(FP8_CONFIG)
    return {"quant_method": "nanoseek", "scheme": scheme, "weights": INT4_WEIGHTS if scheme == "int4" else INT8_WEIGHTS,
            "input_activations": INT8_TOKENS if scheme == "int8-dynamic" else None}


def scheme_of(qc: dict, source: str) -> str:
    """A config.json `quantization_config` -> one of SCHEMES, or a NanoseekError naming the field."""
    if not isinstance(qc, dict):
        raise NanoseekError(f"{source}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method == "fp8":
        for key in ("fmt", "activation_scheme", "weight_block_size"):
            if key in qc and qc[key] != FP8_CONFIG[key]:
                raise NanoseekError(f"{source}: quantization_config.{key}={qc[key]!r} is not supported "
                                    f"(have: {FP8_CONFIG[key]!r})")
        return "fp8"
    if method == "nanoseek":
        scheme = qc.get("scheme")
        if scheme not in ("int8", "int8-dynamic", "int4"):
            raise NanoseekError(f"{source}: quantization_config.scheme={scheme!r} is not supported "
                                "(have: int8, int8-dynamic, int4)")
        group = (qc.get("weights") or {}).get("group_size", int4.GROUP)
        if scheme == "int4" and group != int4.GROUP:
            raise NanoseekError(f"{source}: quantization_config.weights.group_size={group!r} is not supported "
                                f"(have: {int4.GROUP})")
        return scheme
    raise NanoseekError(f"{source}: quantization_config.quant_method={method!r} is not supported (have: fp8, nanoseek)")


def scale_suffix(scheme: str) -> str:
    return "_scale_inv" if scheme == "fp8" else "_scale"


# ---- save ---------------------------------------------------------------------------------

def save_quantized(model: QuantizedTransformer, path, tokenizer=None):
    path = Path(path)
    cfg = model.config
    sd = {}
    for key, t in model.state_dict().items():
        if cfg.tie_embeddings and key.startswith("lm_head."):
            continue
        if key.endswith(".qweight"):
            key = key.removesuffix(".qweight") + ".weight"
        sd[hf_name(key)] = standalone(t)
    hf = cfg.to_hf()
    hf["torch_dtype"] = hf["dtype"] = DTYPE_NAMES.get(model.dtype, "float32")
    hf["quantization_config"] = quantization_config(model.quant_scheme)
    atomic_write(path / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf, indent=2)))
    if tokenizer is not None:
        tokenizer.save(path)


# ---- load ---------------------------------------------------------------------------------

def read_tensors(files: list[Path]) -> dict[str, tuple[torch.Tensor, Path]]:
    """Every tensor, copied out of the file mapping safetensors reads through: the int8 kernel
    needs aligned rows (a mapped tensor starts wherever the file put it), and a mapping kept
    alive by a few small tensors would hold every page already read in memory too."""
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    out[name] = (h.get_tensor(name).clone(), f)
        except Exception as e:  # safetensors raises its own types for truncated/corrupt files
            raise NanoseekError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def check_scale(name: str, q: torch.Tensor, s: torch.Tensor, scheme: str, f: Path, lo=None):
    N, K = q.shape
    if lo is not None:  # int4: nibbles [N, K/2], scale and min [N, K/32]
        if q.dtype != torch.uint8:
            raise NanoseekError(f"{f}: tensor {name} is {q.dtype}, but an int4 weight (it has {name}_min) is uint8")
        want = (N, 2 * K // int4.GROUP)
        for t, suffix in ((s, "_scale"), (lo, "_min")):
            if tuple(t.shape) != want or (2 * K) % int4.GROUP:
                raise NanoseekError(f"{f}: {name}{suffix} has shape {tuple(t.shape)}, expected {want}")
        return
    if scheme == "int4":  # its int8 fallback projections
        scheme = "int8"
    want_dtype = torch.float8_e4m3fn if scheme == "fp8" else torch.int8
    if q.dtype != want_dtype:
        raise NanoseekError(f"{f}: tensor {name} is {q.dtype}, but quantization_config says {scheme} ({want_dtype})")
    want = (-(-N // BLOCK), -(-K // BLOCK)) if scheme == "fp8" else (N, 1)
    if tuple(s.shape) != want and not (scheme != "fp8" and tuple(s.shape) == (N,)):
        raise NanoseekError(f"{f}: {name}{scale_suffix(scheme)} has shape {tuple(s.shape)}, expected {want}")


def make_module(name: str, old, q, s, scheme: str, dtype, f: Path, lo=None):
    if isinstance(old, torch.nn.Embedding):
        if lo is not None:
            raise NanoseekError(f"{f}: {hf_name(name)}.weight is int4, but embeddings are int8 in an int4 checkpoint")
        return Fp8Embedding(q, s, dtype) if scheme == "fp8" else Int8Embedding(q, s, dtype)
    if not isinstance(old, torch.nn.Linear):
        raise NanoseekError(f"{f}: {hf_name(name)}.weight is quantized, but {type(old).__name__} modules cannot be")
    bias = old.bias
    if lo is not None:
        return Int4Linear(q, s, lo, bias, dtype)
    if scheme == "fp8":
        return Fp8Linear(q, s, bias, dtype)
    return Int8Linear(q, s, bias, dynamic=dynamic_activations(scheme, name), dtype=dtype)


def load_quantized(path, cfg: ModelConfig, qconfig: dict, precision: str = "bf16") -> QuantizedTransformer:
    """Build the quantized model a checkpoint describes; `precision` (fp32|bf16) is the compute dtype."""
    path = Path(path)
    source = str(path / "config.json")
    scheme = scheme_of(qconfig, source)
    if precision not in PRECISIONS:
        raise NanoseekError(f"precision {precision!r}: a quantized checkpoint computes in fp32 or bf16")
    dtype = PRECISIONS[precision]
    suffix = scale_suffix(scheme)
    tensors = read_tensors(safetensors_files(path))
    plain, quantized = [], {}
    for name, (t, f) in tensors.items():
        if name.endswith(suffix) and name.removesuffix(suffix) in tensors:
            continue
        if scheme == "int4" and name.endswith("_min") and name.removesuffix("_min") in tensors:
            continue
        if name + suffix in tensors:
            s = tensors[name + suffix][0]
            lo = tensors[name + "_min"][0] if scheme == "int4" and name + "_min" in tensors else None
            check_scale(name, t, s, scheme, f, lo)
            quantized[name] = (t, s, f, lo)
            shape = t.shape if lo is None else (t.shape[0], 2 * t.shape[1])
            t = torch.empty(shape, device="meta")  # shape-checked by build_model, replaced below
        elif t.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn):
            raise NanoseekError(f"{f}: tensor {name} is {t.dtype} but has no {name + suffix}")
        plain.append((name, t, f))
    model = build_model(cfg, plain, precision, source)
    for name, (q, s, f, lo) in quantized.items():
        key = our_name(name, cfg.n_layers)
        if key is None or (cfg.tie_embeddings and key == "lm_head.weight"):
            continue
        module = key.removesuffix(".weight")
        model.set_submodule(module, make_module(module, model.get_submodule(module), q, s, scheme, dtype, f, lo))
    if cfg.tie_embeddings and not isinstance(model.embed_tokens, torch.nn.Embedding):
        emb = model.embed_tokens
        if scheme == "fp8":
            model.lm_head = Fp8Linear(emb.qweight, emb.weight_scale_inv, None, dtype)
        else:
            model.lm_head = Int8Linear(emb.qweight, emb.weight_scale, None, dynamic=False, dtype=dtype)
    return as_quantized(model, scheme)
