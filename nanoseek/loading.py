"""`nanoseek.load`: any supported model source -> (Transformer, Tokenizer)."""

import os
from pathlib import Path

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.hardware import auto_precision, warn_slow_bf16
from nanoseek.checkpoint.hf import build_model, load_hf, PRECISIONS
from nanoseek.checkpoint.hub import resolve
from nanoseek.quant.convert import SCHEMES

# every precision load() takes: the float dtypes, then the quantization schemes (for CLI choices)
LOAD_PRECISIONS = (*PRECISIONS, *SCHEMES)


def add_precision_argument(p, what: str = "weights"):
    """--precision for every command that loads a model: one set of choices, one default (bf16
    where this CPU runs bf16 matmuls at speed, else fp32: nanoseek/hardware.py)."""
    default = auto_precision()
    p.add_argument("--precision", default=default, choices=("auto", *LOAD_PRECISIONS),
                   help=f"{what}: fp32, bf16, or quantized on load: int8, int8-dynamic, int4, fp8; auto: bf16 "
                        f"where the CPU has bf16 matmul units, else fp32 (default: auto, here {default})")


def resolve_precision(precision: str) -> str:
    """'auto' -> what this machine computes best ('bf16' or 'fp32'); any other name unchanged."""
    return auto_precision() if precision == "auto" else precision


def load(path_or_repo_id: str | os.PathLike | None = None, precision: str = "fp32", adapter=None):
    """Load a model and its tokenizer.

    path_or_repo_id: a GGUF file, an HF-format directory (config.json + safetensors), a
    Hugging Face repo id (downloaded when a network allows), or None for the embedded
    default (SmolLM2-135M-Instruct). precision: fp32 | bf16 | auto (bf16 where the CPU runs
    it at speed, else fp32), or a quantization scheme
    (int8 | int8-dynamic | int4 | fp8: quantized on load, computing in bf16; int8 and int4
    include the embeddings and lm_head). A checkpoint whose
    config.json has a quantization_config loads quantized whatever the precision.
    adapter: a LoRA adapter dir (PEFT format), merged into the weights in fp32 before the
    cast / quantization, so the fine-tune serves at the base model's speed.
    """
    from nanoseek.quant import quantize_model
    precision = resolve_precision(precision)
    if precision not in LOAD_PRECISIONS:
        raise NanoseekError(f"precision {precision!r} is not supported (have: auto, {', '.join(LOAD_PRECISIONS)})")
    if precision == "bf16":
        warn_slow_bf16("precision bf16", "precision fp32 (or int4 for batch-1 decode) is faster here")
    scheme, precision = (precision, "fp32") if precision in SCHEMES else (None, precision)
    final_precision, precision = precision, ("fp32" if adapter is not None else precision)
    path = resolve(path_or_repo_id)
    if path.is_file():
        if path.suffix != ".gguf":
            raise NanoseekError(f"{path}: expected a .gguf file or a checkpoint directory")
        from nanoseek.checkpoint.gguf import read_gguf
        hf_config, tensors, tokenizer = read_gguf(path)
        cfg = ModelConfig.from_hf(hf_config, source=str(path))
        model = build_model(cfg, ((name, t, path) for name, t in tensors.items()), precision, str(path))
    else:
        model = load_hf(path, precision)
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            from nanoseek.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_dir(path)
    if adapter is not None:
        from nanoseek.train.lora import cast_model, load_adapter
        model = cast_model(load_adapter(model, adapter, merge=True), final_precision)
    if scheme is not None:
        # int8 takes the embeddings and lm_head too: a tied lm_head is 20% of SmolLM2's weights
        # and, left in bf16, a fifth of each decode step; quantized it costs +0.4% perplexity
        # (docs/BENCHMARKS.md). fp8 computes from a bf16 copy on CPU, so there it would only lose.
        model = quantize_model(model, scheme, quantize_embeddings=scheme != "fp8")
    if tokenizer is not None and not model.config.eos_token_id:
        model.config.eos_token_id = list(tokenizer.eos_token_ids)
    return model, tokenizer
