"""The training config: one dataclass per section, read from TOML or YAML, overridden from the CLI.

    [run]      out_dir, seed, steps budget for saving/logging, threads, device, bf16 autocast
    [model]    a preset to train from scratch, or init_from = checkpoint to fine-tune
    [data]     pretraining shards (nanoseek data prepare) or SFT chat/problem JSONL
    [optim]    AdamW (+ Muon for the 2-D matrices inside the blocks), clipping
    [schedule] steps, warmup, decay
    [moe]      aux-loss-free bias update speed, sequence-wise aux loss weight
    [eval]     eval loss / samples every N steps
    [lora]     LoRA adapters instead of full fine-tuning

Overrides are `section.key=value` strings (values parsed as TOML, bare words as strings).
The resolved config (to_dict) is what every checkpoint and log stores.
"""

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.errors import NanoseekError


@dataclass
class RunSection:
    out_dir: str = "runs/train"
    seed: int = 0
    save_every: int = 100          # steps between checkpoints (and one at the end)
    log_every: int = 1
    threads: int = 0               # torch threads; 0 keeps torch's default
    device: str = "cpu"            # cpu | cuda | auto
    bf16: bool = True              # bf16 autocast for the matmuls; master weights stay fp32
    dist: str = "ddp"              # ddp | fsdp (only used under torchrun with >1 process)
    progress: bool = True          # tqdm bar
    plot: bool = True              # PNG of the curves, refreshed at every eval and at the end
    max_minutes: float = 0.0       # stop (and save) after this wall time; 0 = no limit


@dataclass
class ModelSection:
    preset: str = "moe-16x2"       # nanoseek/presets/<preset>.json, trained from scratch
    init_from: str = ""            # checkpoint dir / GGUF / "default": fine-tune these weights instead
    overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {n_layers = 2}
    init_std: float = 0.02


@dataclass
class DataSection:
    mode: str = "pretrain"         # pretrain | sft
    shards: str = ""               # pretrain: shard directory
    eval_shards: str = ""          # pretrain: held-out shards for the eval loss
    train_file: str = ""           # sft: chat JSONL ({"messages": [...]}) or problems JSONL ({question, answer})
    eval_file: str = ""            # sft: held-out conversations for the eval loss
    tokenizer: str = ""            # tokenizer dir; default: the shards' tokenizer or init_from's
    seq_len: int = 256
    batch_size: int = 8            # rows per micro-batch per process
    grad_accum: int = 1            # micro-batches per optimizer step
    buffer_size: int = 64          # packing buffer (documents)


@dataclass
class OptimSection:
    lr: float = 3e-3               # AdamW: embeddings, head, norms, routers (and matrices when muon=false)
    embed_lr: float = 0.0          # 0: same as lr
    muon: bool = True              # Muon for the 2-D weight matrices inside the blocks
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0         # 0 disables clipping


@dataclass
class ScheduleSection:
    steps: int = 1000
    warmup_steps: int = 20
    decay: str = "linear"          # linear | cosine | none
    decay_frac: float = 0.3        # the last decay_frac of the steps decay (nanochat's warmdown); 1.0 = all
    min_lr_frac: float = 0.0


@dataclass
class MoESection:
    bias_update_speed: float = 1e-3   # DeepSeek-V3's u: bias += u * sign(mean_load - load) per step
    seq_aux_loss: float = 0.0         # alpha of the sequence-wise balance loss (V3 uses 1e-4); 0 = off


@dataclass
class EvalSection:
    every: int = 100               # steps between evals; 0 = only at the end
    batches: int = 4               # eval batches per eval
    samples: list = field(default_factory=list)  # prompts to sample at each eval (greedy)
    sample_tokens: int = 48


@dataclass
class LoRASection:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # module-name suffixes (as PEFT's target_modules list) or one regex string over the full name
    targets: list | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
    merge: bool = False            # also write the merged full model at the end


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    moe: MoESection = field(default_factory=MoESection)
    eval: EvalSection = field(default_factory=EvalSection)
    lora: LoRASection = field(default_factory=LoRASection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "config"):
        checks = [
            (self.data.mode in ("pretrain", "sft"), "data.mode", f"must be pretrain or sft, got {self.data.mode!r}"),
            (self.data.mode != "pretrain" or self.data.shards, "data.shards", "pretraining needs a shard directory"),
            (self.data.mode != "sft" or self.data.train_file, "data.train_file", "SFT needs a JSONL file"),
            (self.data.seq_len > 0, "data.seq_len", "must be positive"),
            (self.data.batch_size > 0, "data.batch_size", "must be positive"),
            (self.data.grad_accum > 0, "data.grad_accum", "must be positive"),
            (self.schedule.steps > 0, "schedule.steps", "must be positive"),
            (self.schedule.decay in ("linear", "cosine", "none"), "schedule.decay", f"must be linear, cosine or none, got {self.schedule.decay!r}"),
            (0 <= self.schedule.decay_frac <= 1, "schedule.decay_frac", "must be in [0, 1]"),
            (self.run.device in ("cpu", "cuda", "auto"), "run.device", f"must be cpu, cuda or auto, got {self.run.device!r}"),
            (self.run.dist in ("ddp", "fsdp"), "run.dist", f"must be ddp or fsdp, got {self.run.dist!r}"),
            (self.lora.r > 0, "lora.r", "must be positive"),
            (0 <= self.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
            (self.optim.lr > 0, "optim.lr", "must be positive"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise NanoseekError(f"{source}: field {name}: {msg}")
        return self


def read_config_file(path) -> dict:
    """A TOML (.toml) or YAML (.yaml/.yml) file -> nested dict."""
    path = Path(path)
    if not path.is_file():
        raise NanoseekError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise NanoseekError(f"{path}: expected a mapping at the top level")
            return data
        if path.suffix == ".json":
            return json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise NanoseekError(f"{path}: cannot parse ({e})") from None
    except Exception as e:
        if type(e).__module__.startswith("yaml"):
            raise NanoseekError(f"{path}: cannot parse YAML ({str(e).splitlines()[0]})") from None
        raise
    raise NanoseekError(f"{path}: config files must be .toml, .yaml/.yml or .json")


def parse_value(text: str):
    """TOML value syntax (1e-3, true, [1, 2], {a = 1}, "s"); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[str, object]:
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        raise NanoseekError(f"--set {item!r}: expected section.key=value")
    return key.strip(), parse_value(value.strip())


def _merge(cfg: TrainConfig, data: dict, source: str):
    for section, values in data.items():
        if section not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise NanoseekError(f"{source}: unknown section {section!r}")
        if not isinstance(values, dict):
            raise NanoseekError(f"{source}: section {section!r} must be a table")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value, source)


def _set(cfg: TrainConfig, dotted: str, value, source: str):
    parts = dotted.split(".")
    section_name, key, rest = parts[0], parts[1] if len(parts) > 1 else None, parts[2:]
    section = getattr(cfg, section_name, None)
    if key is None or section is None or not dataclasses.is_dataclass(section):
        raise NanoseekError(f"{source}: unknown field {dotted!r} (expected section.key)")
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise NanoseekError(f"{source}: unknown field {section_name}.{key} (have: {', '.join(fields)})")
    current = getattr(section, key)
    if rest:  # model.overrides.n_layers=2
        if not isinstance(current, dict):
            raise NanoseekError(f"{source}: field {section_name}.{key} is not a table")
        current[".".join(rest)] = value
        return
    setattr(section, key, _coerce(current, value, f"{source}: field {dotted}"))


def _coerce(current, value, where: str):
    """Check the new value against the default's type (ints are accepted for floats)."""
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise NanoseekError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(current, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(current, int) and isinstance(value, float)):
            raise NanoseekError(f"{where}: expected {type(current).__name__}, got {value!r}")
        return type(current)(value)
    if isinstance(current, str) and not isinstance(value, str):
        raise NanoseekError(f"{where}: expected a string, got {value!r}")
    if isinstance(current, dict) and not isinstance(value, dict):
        raise NanoseekError(f"{where}: expected a table, got {value!r}")
    if isinstance(current, list) and not isinstance(value, (list, str)):
        raise NanoseekError(f"{where}: expected a list, got {value!r}")
    return value


def load_config(path=None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Defaults <- base dict <- config file <- `section.key=value` overrides, then validated."""
    cfg = TrainConfig()
    if base:
        _merge(cfg, base, "config")
    source = str(path) if path else "config"
    if path:
        _merge(cfg, read_config_file(path), str(path))
    for item in overrides:
        key, value = parse_override(item)
        _set(cfg, key, value, f"--set {key}")
    return cfg.validate(source)


def config_from_dict(d: dict) -> TrainConfig:
    cfg = TrainConfig()
    _merge(cfg, d, "saved config")
    return cfg


def dump_toml(d: dict) -> str:
    """The resolved config as TOML (flat sections; tables inline), for people to read and rerun."""
    lines = []
    for section, values in d.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k) if '.' in k else k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        return '""'
    raise TypeError(f"cannot write {v!r} as TOML")
