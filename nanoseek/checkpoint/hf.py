"""Hugging Face checkpoints: config.json + *.safetensors (sharded or not), in and out.

Reading maps HF tensor names to ours (drop the `model.` prefix), skips what we don't run
(DeepSeek's multi-token-prediction layers past num_hidden_layers, rotary buffers),
dequantises DeepSeek's block-FP8 weights, and checks every shape against the config, so a
mismatch names the tensor, the file and the config instead of failing deep in a matmul.
"""

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.checkpoint.fp8 import dequantize_fp8_blocks
from nanoseek.errors import NanoseekError
from nanoseek.model.transformer import Transformer

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def our_name(name: str, n_layers: int) -> str | None:
    """HF tensor name -> our state-dict key, or None for tensors we deliberately skip."""
    if name.endswith("rotary_emb.inv_freq") or name.endswith("_scale_inv"):
        return None
    name = name.removeprefix("model.")
    m = re.match(r"layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= n_layers:  # DeepSeek-V3's MTP module lives in layer 61
        return None
    return name


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise NanoseekError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoseekError(f"{path}: not valid JSON ({e})") from None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [path / n for n in names]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise NanoseekError(f"{index}: lists {missing[0].name}, which is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NanoseekError(f"{path}: no *.safetensors files")
    return files


def iter_safetensors(files: list[Path]):
    """Yield (hf_name, tensor, file), with FP8 blocks already dequantised to fp32."""
    handles, where = {}, {}
    for f in files:
        try:
            handles[f] = safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise NanoseekError(f"{f}: not a readable safetensors file ({e})") from None
        for k in handles[f].keys():
            where[k] = f
    for name, f in where.items():
        if name.endswith("_scale_inv"):
            continue
        try:
            t = handles[f].get_tensor(name)
            if t.dtype == torch.float8_e4m3fn:
                sname = name + "_scale_inv"
                if sname not in where:
                    raise NanoseekError(f"{f}: FP8 tensor {name} has no {sname}")
                t = dequantize_fp8_blocks(t, handles[where[sname]].get_tensor(sname))
        except NanoseekError:
            raise
        except Exception as e:
            raise NanoseekError(f"{f}: cannot read tensor {name} ({e})") from None
        yield name, t, f


def build_model(cfg: ModelConfig, tensors, precision: str = "fp32", source: str = "") -> Transformer:
    """Instantiate a Transformer from (hf_name, tensor, file) triples without random init."""
    if precision not in PRECISIONS:
        raise NanoseekError(f"precision {precision!r} is not supported here (have: {', '.join(PRECISIONS)})")
    dtype = PRECISIONS[precision]
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    sd = {}
    for name, t, f in tensors:
        key = our_name(name, cfg.n_layers)
        if key is None:
            continue
        if cfg.tie_embeddings and key == "lm_head.weight":
            continue
        if key not in expected:
            raise NanoseekError(f"{f}: unexpected tensor {name} for a {cfg.arch} model (config: {source})")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise NanoseekError(f"{f}: tensor {name} has shape {tuple(t.shape)} but {source} implies "
                                f"{tuple(expected[key].shape)}")
        # the balancing bias stays fp32: its updates are far below bf16's resolution
        sd[key] = t.to(torch.float32 if key.endswith("e_score_correction_bias") else dtype)
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise NanoseekError(f"{source}: checkpoint is missing {len(missing)} tensor(s), e.g. {hf_name(missing[0])}")
    model.load_state_dict(sd, assign=True, strict=True) if not cfg.tie_embeddings else \
        model.load_state_dict(sd, assign=True, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def load_hf(path, precision: str = "fp32") -> Transformer:
    path = Path(path)
    cfg_path = path / "config.json"
    hf = read_json(cfg_path)
    cfg = ModelConfig.from_hf(hf, source=str(cfg_path))
    if hf.get("quantization_config"):  # stays quantized; precision is the compute dtype
        from nanoseek.quant.checkpoint import load_quantized
        return load_quantized(path, cfg, hf["quantization_config"], precision)
    return build_model(cfg, iter_safetensors(safetensors_files(path)), precision, str(cfg_path))


def atomic_write(path: Path, write):
    """Write via a temp file in the same directory, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def standalone(t: torch.Tensor) -> torch.Tensor:
    """t as a tensor that owns its storage: safetensors refuses views of a larger one (which
    packed inference projections make of q/k/v and gate/up, nanoseek/model/packing.py)."""
    t = t.detach()
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t.contiguous()


def save_hf(model: Transformer, path, tokenizer=None):
    path = Path(path)
    cfg = model.config
    sd = {}
    for k, v in model.state_dict().items():
        if cfg.tie_embeddings and k == "lm_head.weight":
            continue
        sd[hf_name(k)] = standalone(v)
    hf = cfg.to_hf()
    hf["torch_dtype"] = hf["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(model.dtype, "float32")
    atomic_write(path / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf, indent=2)))
    if tokenizer is not None:
        tokenizer.save(path)
