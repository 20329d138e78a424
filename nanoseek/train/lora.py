"""LoRA: low-rank adapters on any nn.Linear (attention, MLPs, MoE experts, lm_head).

    y = W x + (alpha / r) * B A dropout(x),   A: [r, in] (Kaiming-uniform), B: [out, r] (zeros)

so training starts exactly at the base model. Only A and B train. The base weight keeps its
name (`q_proj.weight`), so the model still saves as a normal checkpoint, and adapters are
written in PEFT's format:

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.<HF module name>.lora_A.weight / lora_B.weight

which `peft.PeftModel.from_pretrained(transformers_model, dir)` loads, and which we load back
(ours or PEFT-trained) to serve merged: W <- W + (alpha / r) B A.
MoE experts are adapted per expert (`model.layers.3.mlp.experts.7.up_proj`), the names of
DeepSeek-V3's safetensors; transformers' fused-expert modules do not take those keys.
"""

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.checkpoint.hf import atomic_write, hf_name, our_name
from nanoseek.errors import NanoseekError

PEFT_PREFIX = "base_model.model."


def hf_module(name: str) -> str:
    """Our module name -> transformers' (`layers.0.self_attn.q_proj` -> `model.layers.0...`)."""
    return name if name == "lm_head" else hf_name(name)


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight, same name) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared, not copied
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        out = super().forward(x)
        a, b = self.lora_A.weight, self.lora_B.weight
        return out + (self.lora_dropout(x).to(a.dtype) @ a.T @ b.T).to(out.dtype) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def matches(name: str, targets) -> bool:
    """PEFT's rule on the HF module name: a regex string must match it whole; a list entry
    must equal it or be its last dotted component(s)."""
    full = hf_module(name)
    if isinstance(targets, str):
        return re.fullmatch(targets, full) is not None
    return any(full == t or full.endswith("." + t) for t in targets)


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=("q_proj", "v_proj")) -> list[str]:
    """Freeze the model and wrap every matching nn.Linear; returns the wrapped module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = targets if isinstance(targets, str) else list(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
             and ".lora_" not in n and matches(n, targets)]
    if not names:
        raise NanoseekError(f"lora.targets {targets!r} match no linear layer of this model")
    if model.config.tie_embeddings and "lm_head" in names:
        raise NanoseekError("lora.targets: lm_head is tied to the embeddings here; leave it out")
    for n in names:
        base = model.get_submodule(n)
        lora = LoRALinear(base, r, alpha, dropout)
        lora.lora_A.weight.data = lora.lora_A.weight.data.to(torch.float32)
        lora.lora_B.weight.data = lora.lora_B.weight.data.to(torch.float32)
        _replace(model, n, lora)
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}
    return names


def lora_modules(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop the adapters (in place)."""
    for n, m in lora_modules(model).items():
        _replace(model, n, m.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def trainable_fraction(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    return trainable, base


def adapter_state(model) -> dict[str, torch.Tensor]:
    """PEFT key names -> tensors."""
    sd = {}
    for n, m in lora_modules(model).items():
        sd[f"{PEFT_PREFIX}{hf_module(n)}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().cpu()
        sd[f"{PEFT_PREFIX}{hf_module(n)}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().cpu()
    return sd


def save_adapter(model, out_dir, base_model: str | None = None):
    """adapter_config.json + adapter_model.safetensors, as PEFT writes them."""
    out = Path(out_dir)
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise NanoseekError("save_adapter: the model has no LoRA adapters")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg["r"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
        "target_modules": cfg["targets"], "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    sd = adapter_state(model)
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def read_adapter_config(adapter_dir) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise NanoseekError(f"{path}: not found (an adapter dir holds adapter_config.json + adapter_model.safetensors)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{path}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise NanoseekError(f"{path}: field peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise NanoseekError(f"{path}: missing field {key!r}")
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise NanoseekError(f"{path}: DoRA and per-module rank/alpha patterns are not supported")
    return cfg


def load_adapter(model, adapter_dir, merge: bool = True):
    """Attach a PEFT-format LoRA adapter to `model` (and fold it in when merge=True)."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise NanoseekError(f"{weights}: not found")
    apply_lora(model, cfg["r"], cfg["lora_alpha"], 0.0, cfg["target_modules"])
    if cfg.get("use_rslora"):
        for m in lora_modules(model).values():
            m.scaling = cfg["lora_alpha"] / math.sqrt(cfg["r"])
    expected = lora_modules(model)
    n_layers = model.config.n_layers
    loaded = set()
    for key, t in load_file(str(weights)).items():
        name = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        module, _, part = name.rpartition(".lora_")
        ours = our_name(module, n_layers)
        if ours not in expected or part not in ("A.weight", "B.weight"):
            raise NanoseekError(f"{weights}: tensor {key} matches no adapted module of this model")
        target = getattr(expected[ours], "lora_" + part.split(".")[0]).weight
        if tuple(t.shape) != tuple(target.shape):
            raise NanoseekError(f"{weights}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(t)
        loaded.add((ours, part))
    missing = [n for n in expected if (n, "A.weight") not in loaded or (n, "B.weight") not in loaded]
    if missing:
        raise NanoseekError(f"{weights}: no weights for {len(missing)} adapted module(s), e.g. {hf_module(missing[0])}")
    if merge:
        merge_lora(model)
    return model


def cast_model(model, precision: str):
    """fp32 -> `precision` weights; the routers' balancing bias stays fp32 (as loading does)."""
    from nanoseek.checkpoint.hf import PRECISIONS
    if precision not in PRECISIONS:
        raise NanoseekError(f"precision {precision!r}: an adapter merges into {' or '.join(PRECISIONS)} weights")
    bias = {n: b.clone() for n, b in model.named_buffers() if "e_score_correction_bias" in n}
    model.to(PRECISIONS[precision])
    for n, b in bias.items():
        model.get_buffer(n).data = b
    return model


def load_with_adapter(path_or_repo_id=None, precision: str = "fp32", adapter=None):
    """nanoseek.load(path, precision, adapter=DIR): the base with a LoRA adapter folded in."""
    from nanoseek.loading import load
    return load(path_or_repo_id, precision, adapter=adapter)
