"""nanoseek.tokenizer against transformers as the reference.

The real SmolLM2 GGUF (byte-level BPE, ChatML template) is compared with
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`; tiny GGUFs written on the fly cover the
SentencePiece path and the error paths.
"""

import json
import os
from collections.abc import Mapping

import pytest

from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import StreamDecoder, Tokenizer, render_chat_template
from tests.fixtures import CHATML, smollm2_gguf_path, write_tiny_gguf

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "1234567890 3.14159 -42 1e10 0x1F",
    "日本語のテキスト、中文，한국어",
    "emoji 🤗🚀 and a family 👨‍👩‍👧 ok",
    "naïve café résumé Ω K ß",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a<|im_end|>b <|im_start|> c<|endoftext|>",
    "don't I'll we've THEY'RE",
    "    def f(x):\n        return x**2  # square\n",
    "\u00a0non-breaking\u200bzero-width",
    "مرحبا بالعالم",
    "$$$ %%% ^^^ ~~~ ```",
    "x" * 40 + " " * 9 + "y",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2? Answer with one number — please 🙏"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="session")
def smollm_path():
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def tok(smollm_path):
    return Tokenizer.from_gguf(smollm_path)


@pytest.fixture(scope="session")
def ref(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm_path),
                                                      gguf_file=os.path.basename(smollm_path))


def ref_chat_ids(ref, messages, **kwargs):
    ids = ref.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


# ---- the real model ------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, ref, text):
    assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok, ref, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_single_ids(tok):
    for token in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]:
        assert tok.encode(token) == [tok.token_to_id(token)]
    assert tok.id_to_token(1) == "<|im_start|>"
    assert tok.token_to_id("not a token at all") is None


def test_metadata(tok, ref):
    assert tok.vocab_size == len(ref) == 49152
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    assert tok.add_bos_token is False  # tokenizer.ggml.add_bos_token = false in this file
    # <|im_end|> is the declared EOS; <|endoftext|> also ends a turn (as in llama.cpp)
    assert tok.eos_token_ids == [2, 0]
    assert tok.chat_template == ref.chat_template


def test_chat_template_matches_transformers(tok, ref):
    assert tok.apply_chat_template(CONVERSATION) == ref_chat_ids(ref, CONVERSATION, add_generation_prompt=True)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    # no system message: this template inserts its default one
    user_only = CONVERSATION[1:2]
    assert tok.apply_chat_template(user_only, add_generation_prompt=False) == ref_chat_ids(ref, user_only)


def test_stream_decoder_never_splits_characters(tok):
    text = "Ünïcödé 日本語 🤗🚀👨‍👩‍👧 done<|im_end|>"
    ids = tok.encode(text)
    # byte-level BPE cuts these characters into several tokens, so some deltas must be held back
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    stream = StreamDecoder(tok)
    deltas = [stream.put(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.flush() == text
    stream = StreamDecoder(tok, skip_special_tokens=True)
    assert "".join(stream.put(i) for i in ids) + stream.flush() == text.replace("<|im_end|>", "")


def test_save_round_trips_and_transformers_loads_it(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text) == hf(text)["input_ids"]
    assert again.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION) == ref_chat_ids(
        hf, CONVERSATION, add_generation_prompt=True)
    for name in ["vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "eos_token_ids", "chat_template",
                 "add_bos_token"]:
        assert getattr(again, name) == getattr(tok, name), name


# ---- tiny GGUFs: SentencePiece, byte-level, directory layouts --------------------------------

SPM_TEXTS = ["hello world", " hello  world ", "the world is", "héllo wörld 🤗", "<s>hello</s> the", "\n\nhe\tll",
             "", "zzz qqq", "a<unk>b", "hello<s>world"]


@pytest.mark.parametrize("kind,pre", [("llama", None), ("gpt2", "default"), ("gpt2", "llama-bpe"), ("gpt2", "qwen2")])
def test_tiny_gguf_matches_transformers(tmp_path, kind, pre):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"{kind}.gguf"
    write_tiny_gguf(str(path), tokenizer=kind, tokenizer_pre=pre)
    tok = Tokenizer.from_gguf(str(path))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert tok.vocab_size == len(ref)
    assert tok.add_bos_token is (kind == "llama")  # llama.cpp's default for sentencepiece vocabularies
    for text in SPM_TEXTS + TEXTS + ["<think>hello</think>", "<|im_start|>x<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


PRE_TOKENIZER_SPLITS = {
    # llama.cpp's names -> how "Hi  World 12345 日本語かな 한국어 don't!!" is cut into words
    "smollm": ["Hi", " ", " World", " ", "1", "2", "3", "4", "5", " 日本語かな", " 한국어", " don", "'t", "!!"],
    "llama-bpe": ["Hi", " ", " World", " ", "123", "45", " 日本語かな", " 한국어", " don", "'t", "!!"],
    "qwen2": ["Hi", " ", " World", " ", "1", "2", "3", "4", "5", " 日本語かな", " 한국어", " don", "'t", "!!"],
    "deepseek-llm": ["Hi", " ", " World", " ", "12345", " ", "日本語かな", " ", "한국어", " don", "'", "t", "!!"],
    "deepseek-v3": ["Hi", " ", " World", " ", "123", "45", " ", "日本語かな", " 한국어", " don", "'t", "!!"],
}


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZER_SPLITS))
def test_pre_tokenizer_regexes(pre):
    from nanoseek.tokenizer import byte_alphabet, byte_level_backend
    from tests.fixtures import gpt2_vocab
    backend = byte_level_backend(*gpt2_vocab(), pre)
    unspell = {c: b for b, c in byte_alphabet().items()}
    words = [bytes(unspell[c] for c in w).decode() for w, _ in
             backend.pre_tokenizer.pre_tokenize_str("Hi  World 12345 日本語かな 한국어 don't!!")]
    assert words == PRE_TOKENIZER_SPLITS[pre]


def test_sentencepiece_byte_fallback_and_streaming(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(str(path), tokenizer="llama")
    tok = Tokenizer.from_gguf(str(path))
    text = "héllo wörld 🤗 the end"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 1
    assert tok.token_to_id("<0xF0>") in ids  # the emoji is spelled in byte tokens
    assert tok.decode(ids, skip_special_tokens=True) == text
    stream = StreamDecoder(tok, skip_special_tokens=True)
    deltas = [stream.put(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.flush() == text


def test_stream_decoder_flushes_invalid_bytes(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(str(path), tokenizer="llama")
    tok = Tokenizer.from_gguf(str(path))
    stream = StreamDecoder(tok)
    assert stream.put(tok.token_to_id("<0xF0>")) == ""  # first byte of a 4-byte character: held
    assert stream.flush() == "\ufffd"


def test_from_dir_reads_hf_layout_variants(tok, tmp_path):
    tok.save(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["bos_token"] = {"content": "<|im_start|>", "lstrip": False, "special": True}
    config["eos_token"] = {"content": "<|im_end|>", "special": True}
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATML}]
    config["add_bos_token"] = True
    config_path.write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    again = Tokenizer.from_dir(tmp_path)
    assert (again.bos_token_id, again.eos_token_id) == (1, 2)
    assert again.chat_template == CHATML
    assert again.encode("hi") == [1] + tok.encode("hi", add_special_tokens=False)
    assert again.encode("hi", add_special_tokens=False) == tok.encode("hi", add_special_tokens=False)
    assert again.eos_token_ids == [2, 3, 0]
    # the newer layout: chat_template.jinja next to the config wins
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x"


def test_chat_template_environment():
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{% for m in messages %}{{ bos_token }}{{ m | tojson }}"
        "{% if loop.index == 1 %}{% break %}{% endif %}{% endfor %}"
        "{{ strftime_now('%Y') | length }}{{ extra }}"
    )
    out = render_chat_template(template, [{"role": "user", "content": "<a & b>", "name": None}, {"role": "x"}],
                               bos_token="<s>", extra="!")
    assert out == '<s>{"role": "user", "content": "<a & b>"}4!'  # plain JSON, None fields dropped
    with pytest.raises(NanoseekError, match="first message must be from the user"):
        render_chat_template(template, [{"role": "system", "content": "x"}])


# ---- bad input -----------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(NanoseekError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ this is not json")
    with pytest.raises(NanoseekError, match="tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value)


def test_corrupt_tokenizer_config(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(NanoseekError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_gguf_without_tokenizer(tmp_path):
    path = tmp_path / "notok.gguf"
    write_tiny_gguf(str(path), tokenizer=None)
    with pytest.raises(NanoseekError, match=r"notok\.gguf: field tokenizer\.ggml\.model is missing"):
        Tokenizer.from_gguf(str(path))


def test_gguf_unknown_tokenizer_model(tmp_path):
    path = tmp_path / "bert.gguf"
    write_tiny_gguf(str(path), tokenizer="bert")
    with pytest.raises(NanoseekError, match=r"bert\.gguf: field tokenizer\.ggml\.model is 'bert'"):
        Tokenizer.from_gguf(str(path))


def test_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(NanoseekError, match=r"junk\.gguf"):
        Tokenizer.from_gguf(str(path))


def test_empty_messages(tok):
    with pytest.raises(NanoseekError, match="empty"):
        tok.apply_chat_template([])


def test_no_chat_template(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(str(path), tokenizer="llama")
    with pytest.raises(NanoseekError, match=r"spm\.gguf: the tokenizer has no chat template"):
        Tokenizer.from_gguf(str(path)).apply_chat_template([{"role": "user", "content": "hi"}])
