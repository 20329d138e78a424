"""Train a byte-level BPE tokenizer with chat special tokens, saved in Hugging Face layout.

The output directory loads both with `tokenizers.Tokenizer.from_file(dir/"tokenizer.json")`
and with `transformers.AutoTokenizer.from_pretrained(dir)`, and both encode identically:
the BOS token is added by the tokenizer.json post-processor itself, so no library-specific
"add_bos_token" logic is needed to agree.

Special tokens take the first ids, in SPECIAL_TOKENS order, so they are the same for
every vocab size. `<think>`/`</think>` are added tokens (always one id each) but not
"special": decode(skip_special_tokens=True) keeps the reasoning tags, which format
rewards and readers need (DeepSeek-R1 and Qwen3 do the same).
"""

import hashlib
import json
from pathlib import Path
from typing import Iterable

from nanoseek.errors import NanoseekError

BOS = "<|begin_of_text|>"
EOT = "<|end_of_text|>"  # end of a pretraining document
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a chat turn; the chat EOS
THINK = "<think>"
END_THINK = "</think>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOT, IM_START, IM_END, THINK, END_THINK, PAD]
NOT_SPECIAL = {THINK, END_THINK}  # single ids, but kept when decoding with skip_special_tokens

# Llama-3 style split: like GPT-2's but case-insensitive contractions and numbers in
# groups of at most 3 digits, so "12345" never becomes one opaque token (better arithmetic).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML: <|im_start|>{role}\n{content}<|im_end|>\n per message, BOS first.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte + the special tokens


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False):
    """Train byte-level BPE on an iterable of strings; returns a `tokenizers.Tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise NanoseekError(
            f"vocab size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown tokens ever
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B:1",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return _unmark_think_tokens(tok)


def _unmark_think_tokens(tok):
    """The trainer registers all its tokens as special; flip <think>/</think> to plain added tokens."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in NOT_SPECIAL:
            added["special"] = False
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_config() -> dict:
    """tokenizer_config.json contents: what transformers needs beyond tokenizer.json."""
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": t not in NOT_SPECIAL}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": IM_END,  # chat generation stops at the end of the assistant turn
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": [EOT, IM_START],
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config() -> dict:
    """generation_config.json: both end tokens stop generation (HF reads a list here)."""
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    return {"bos_token_id": ids[BOS], "eos_token_id": [ids[IM_END], ids[EOT]], "pad_token_id": ids[PAD]}


def save_tokenizer(tok, out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise ValueError(f"special token {t} has id {tok.token_to_id(t)}, expected {i}")
    tok.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    _write_json(out_dir / "generation_config.json", generation_config())
    return out_dir


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class ChatTokenizer:
    """Thin wrapper over a saved tokenizer: the interface the shard and SFT code expect.

    Any object with encode(text, add_special_tokens=...) -> list[int], bos_token_id and
    eos_token_id works there too (e.g. a transformers tokenizer); this one adds batch
    encoding on the Rust side and the chat template without needing transformers.
    """

    def __init__(self, tok, chat_template: str = CHAT_TEMPLATE):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token_id = self._id(BOS)
        self.eos_token_id = self._id(IM_END)
        self.end_of_text_id = self._id(EOT)
        self.pad_token_id = self._id(PAD)
        self.fingerprint = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise NanoseekError(f"tokenizer has no {token} token; train it with `nanoseek data train-tokenizer`")
        return i

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        # tokenizers encodes a batch on all cores (TOKENIZERS_PARALLELISM permitting)
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render messages to text with the jinja chat template (the same one transformers uses)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=BOS, eos_token=IM_END)


def load_tokenizer(path: str | Path) -> ChatTokenizer:
    """Load a tokenizer directory (or a tokenizer.json file) saved by save_tokenizer."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise NanoseekError(f"{file}: no such tokenizer file (expected a directory with tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise NanoseekError(f"{file}: cannot load tokenizer ({e})") from None
    template = CHAT_TEMPLATE
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") or CHAT_TEMPLATE
        except json.JSONDecodeError as e:
            raise NanoseekError(f"{config}: malformed JSON ({e.msg} at line {e.lineno})") from None
    return ChatTokenizer(tok, chat_template=template)
