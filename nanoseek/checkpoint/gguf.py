"""GGUF (llama.cpp) checkpoints in: config, float32 weights and tokenizer, all in Hugging Face form.

    config, state_dict, tokenizer = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

`config` is a config.json-style dict and `state_dict` uses HF tensor names and layouts, so the
result feeds the same path as a safetensors checkpoint. Three things differ from HF in a GGUF:

  * names: blk.{i}.attn_q.weight instead of model.layers.{i}.self_attn.q_proj.weight;
  * shapes: GGUF lists dimensions fastest-first, so they come out reversed;
  * llama q/k rows: llama.cpp's converter interleaves each head's rotary halves (it rotates
    adjacent pairs, HF rotates halves). We undo that permutation, exactly as transformers does.

Quantised tensors are dequantised to float32 per tensor with gguf-py's numpy kernels.
"""

import os

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import Tokenizer

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)

# GGUF architecture -> (HF class, HF model_type, whether q/k rows are llama.cpp-permuted)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}

TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama 3.1's long-context rope factors: HF recomputes them from config, so the tensor is dropped.
SKIPPED_TENSORS = {"rope_freqs.weight"}


def read_gguf(path) -> tuple[dict, dict[str, torch.Tensor], Tokenizer]:
    """(HF config dict, HF-named float32 state dict, Tokenizer) from a GGUF file."""
    reader, name = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch is None:
        raise NanoseekError(f"{name}: field general.architecture is missing")
    if arch not in ARCHITECTURES:
        raise NanoseekError(f"{name}: field general.architecture is {arch!r}, which is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
    check_tensor_types(reader, name)  # fail before spending seconds dequantising the rest
    tokenizer = Tokenizer.from_gguf(reader)
    config = hf_config(reader, name, arch, tokenizer)

    tensors = [t for t in reader.tensors if t.name not in SKIPPED_TENSORS]
    hf_names = [hf_tensor_name(t.name, arch, name) for t in tensors]  # again: fail before the slow part
    permuted = ARCHITECTURES[arch][2]
    state = {}
    for tensor, hf in zip(tensors, hf_names):
        weight = dequantize_tensor(tensor, name)
        if permuted and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            n_heads = config["num_attention_heads"] if ".attn_q." in tensor.name else config["num_key_value_heads"]
            weight = unpermute_rows(weight, n_heads)
        state[hf] = torch.from_numpy(weight)

    check_complete(state, config, name)
    return config, state, tokenizer


def open_gguf(reader_or_path) -> tuple[GGUFReader, str]:
    """(reader, file name for messages); any parse failure becomes a NanoseekError naming the file."""
    if isinstance(reader_or_path, GGUFReader):
        return reader_or_path, str(getattr(reader_or_path.data, "filename", None) or "<gguf>")
    name = str(reader_or_path)
    if not os.path.isfile(name):
        raise NanoseekError(f"{name}: file not found")
    try:
        reader = GGUFReader(name)
    except Exception as e:  # gguf-py raises ValueError/struct.error/IndexError/... on a bad file
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanoseekError(f"{name}: not a readable GGUF file, truncated or corrupt ({message})") from None
    # A file cut inside the tensor data can still parse: the last views just come up short.
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise NanoseekError(f"{name}: truncated or corrupt (tensor {tensor.name} has {tensor.data.nbytes} "
                                f"of its {tensor.n_bytes} bytes)")
    return reader, name


def gguf_field(reader: GGUFReader, key: str):
    """A metadata value as a Python scalar/str/list, or None if the key is absent."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def check_tensor_types(reader: GGUFReader, name: str) -> None:
    supported = ", ".join(t.name for t in SUPPORTED_TYPES)
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise NanoseekError(f"{name}: tensor {tensor.name} has unsupported type "
                                f"{tensor.tensor_type.name} (supported: {supported})")


def hf_config(reader: GGUFReader, name: str, arch: str, tokenizer: Tokenizer) -> dict:
    """The config.json a Hugging Face checkpoint of this model would have."""
    def field(key, default=None, required=False):
        value = gguf_field(reader, f"{arch}.{key}")
        if value is None and required:
            raise NanoseekError(f"{name}: field {arch}.{key} is missing")
        return default if value is None else value

    hidden = field("embedding_length", required=True)
    n_heads = field("attention.head_count", required=True)
    n_kv_heads = field("attention.head_count_kv", n_heads)
    if isinstance(n_heads, list) or isinstance(n_kv_heads, list):  # per-layer head counts (OpenELM-like)
        raise NanoseekError(f"{name}: field {arch}.attention.head_count varies per layer, which is not supported")
    # key_length is the head size when given; llama's converter writes it as rope.dimension_count.
    head_dim = field("attention.key_length") or (field("rope.dimension_count") if arch == "llama" else None)
    tensor_names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise NanoseekError(f"{name}: tensor token_embd.weight is missing")
    hf_class, model_type, _ = ARCHITECTURES[arch]

    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": int(embed.shape[-1]),  # GGUF order: (hidden, vocab)
        "hidden_size": hidden,
        "intermediate_size": field("feed_forward_length", required=True),
        "num_hidden_layers": field("block_count", required=True),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim or hidden // n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": float32_value(field("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float32_value(field("rope.freq_base", 10000.0)),
        "max_position_embeddings": field("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = False
    if arch == "qwen2":
        config["use_sliding_window"] = False

    scaling = field("rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(field("rope.scaling.factor", 1.0))}
        original = field("rope.scaling.original_context_length")
        if original is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def float32_value(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.999999747e-06. Give the short decimal
    the model author wrote (what config.json has)."""
    return float(str(np.float32(x)))


def hf_tensor_name(gguf_name: str, arch: str, name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 1 and parts[0] in TOP_LEVEL_NAMES:
        return f"{TOP_LEVEL_NAMES[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    raise NanoseekError(f"{name}: tensor {gguf_name} has no Hugging Face counterpart in a {arch} model "
                        f"(not supported)")


def dequantize_tensor(tensor, name: str) -> np.ndarray:
    """float32 array in HF (row-major, slowest-first) shape. One vectorised numpy call per tensor."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        weight = dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:
        raise NanoseekError(f"{name}: tensor {tensor.name} ({tensor.tensor_type.name}) cannot be "
                            f"dequantised ({e})") from None
    weight = weight.astype(np.float32, copy=False)
    if not weight.flags.writeable:  # F32 comes back as a view into the read-only memory map
        weight = weight.copy()
    return weight.reshape(shape)


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation. Its converter wrote, per head, rows in the order
    (dim/2, 2) -> interleaved rotary pairs; HF wants (2, dim/2) -> the two rotary halves."""
    head_half = weight.shape[0] // n_heads // 2
    w = weight.reshape(n_heads, head_half, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2)).reshape(weight.shape)


def check_complete(state: dict, config: dict, name: str) -> None:
    """Every tensor a HF model of this config needs must be there, or loading fails obscurely later."""
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        needed.append("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        needed += [f"model.layers.{i}.{module}.weight" for module in LAYER_NAMES.values()]
    missing = [n for n in needed if n not in state]
    if missing:
        raise NanoseekError(f"{name}: missing {len(missing)} tensor(s), first {missing[0]} "
                            f"(num_hidden_layers={config['num_hidden_layers']})")
