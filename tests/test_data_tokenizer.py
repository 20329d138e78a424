import json

import pytest

from nanoseek.data.tokenizer_train import (
    BOS,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from nanoseek.errors import NanoseekError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text, emoji 🙂 and 中文字符 are bytes too.",
] * 20

SAMPLES = [
    "Hello world!",
    "  leading spaces and trailing  ",
    "numbers 1234567 and 3.14159",
    "tabs\tand\nnewlines\n\n\nend",
    "emoji 🙂🚀, accents éàü, CJK 中文, never seen: ʕ•ᴥ•ʔ",
    "<think>reasoning</think> The answer is 4.",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(CORPUS, vocab_size=400), out)
    return out


def test_files_written(tok_dir):
    assert {p.name for p in tok_dir.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == BOS and config["eos_token"] == "<|im_end|>" and config["add_bos_token"] is True
    assert config["chat_template"] == CHAT_TEMPLATE
    gen = json.loads((tok_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [3, 1]  # <|im_end|> and <|end_of_text|> both stop generation


def test_vocab_size_respected(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert 256 + len(SPECIAL_TOKENS) < len(tok) <= 400


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok_dir, text):
    tok = load_tokenizer(tok_dir)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_bos_added_only_with_special_tokens(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.encode("hi")[0] == tok.bos_token_id == 0
    assert tok.encode("hi", add_special_tokens=False)[0] != tok.bos_token_id


def test_special_tokens_are_single_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.encode(special, add_special_tokens=False) == [i]
        assert tok.encode(f"x{special}y", add_special_tokens=False).count(i) == 1
    assert (tok.bos_token_id, tok.end_of_text_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 3, 6)


def test_think_tags_survive_skip_special_tokens(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = tok.encode("<|im_start|><think>a</think>b<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>b"


def test_digits_split_in_groups_of_three(tok_dir):
    tok = load_tokenizer(tok_dir)
    pieces = [tok.decode([i]) for i in tok.encode("1234567", add_special_tokens=False)]
    assert all(len(p) <= 3 for p in pieces)


def test_loads_with_tokenizers_library(tok_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok = load_tokenizer(tok_dir)
    for text in SAMPLES:
        assert raw.encode(text).ids == tok.encode(text)


def test_vocab_too_small():
    with pytest.raises(NanoseekError, match="vocab size must be at least"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(NanoseekError, match="no such tokenizer file"):
        load_tokenizer(tmp_path)


# --- transformers as the reference -------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>2+2=4</think>4"},
]


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_transformers_encodes_identically(tok_dir, hf):
    tok = load_tokenizer(tok_dir)
    for text in SAMPLES + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert hf.encode(text) == tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
        assert hf.decode(hf.encode(text, add_special_tokens=False)) == text


def test_transformers_special_ids(hf):
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 3, 6)
    assert hf.convert_tokens_to_ids("<think>") == 4


def test_transformers_chat_template_matches(tok_dir, hf):
    tok = load_tokenizer(tok_dir)
    for gen in (False, True):
        ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        theirs = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
    assert ours == (
        "<|begin_of_text|><|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>2+2=4</think>4<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
