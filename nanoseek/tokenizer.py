"""Text <-> token ids, and chat messages -> prompt ids.

One `Tokenizer` class wraps a Hugging Face `tokenizers.Tokenizer` (the Rust backend) and adds the
few things a model needs around it: which ids are BOS/EOS/PAD, the end-of-turn ids generation
stops on, and the chat template. It is built from one of two sources:

    tok = Tokenizer.from_dir("SmolLM2-135M-Instruct/")    # tokenizer.json + tokenizer_config.json
    tok = Tokenizer.from_gguf("model.gguf")               # llama.cpp's tokenizer.ggml.* metadata

A GGUF has no tokenizer.json, so from_gguf rebuilds the backend the way transformers' GGUF loader
and llama.cpp do: byte-level BPE ("gpt2") with the pre-tokenizer regexes named by
tokenizer.ggml.pre, or SentencePiece-style BPE ("llama") with byte fallback and a ▁ metaspace.
`save(dir)` writes the Hugging Face files, so a GGUF tokenizer can be handed to transformers.
"""

import functools
import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from nanoseek.errors import NanoseekError

# llama.cpp's token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Special tokens that end a turn even when they are not the declared EOS: a chat model trained on
# <|im_end|> may still emit <|endoftext|>. Same list llama.cpp uses to find its end-of-generation ids.
END_OF_TURN_TOKENS = {
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>", "<end_of_utterance>",
}

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer regexes for byte-level BPE, keyed by tokenizer.ggml.pre. A vocabulary only
# reproduces its training-time ids if text is cut into words the same way, so each entry is the
# Split sequence from llama.cpp's llama-vocab.cpp (which mirrors the model's tokenizer.json).

_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek LLM (7B/67B): cased letters of the alphabetic scripts, written as code points because
# several of them (Ohm sign, Kelvin sign, Greek oxia forms) would be folded by an editor's NFC.
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
    "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
    "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec"
    "\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
    "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787"
    "\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM = [
    "[\r\n]",
    r"\s?[" + _DEEPSEEK_LLM_LETTERS + "]+",
    r"\s?[!-/:-~" + "\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002" + "]+",
    r"\s+$",
    _CJK_HANGUL,
    r"\p{N}+",
]
_DEEPSEEK_CODER = ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"]
# DeepSeek V3 / R1: digits in threes, kana and CJK ideographs kept apart, then a GPT-4-like split.
_DEEPSEEK_V3 = [
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
# _GPT2: GPT-2's own regex, which the ByteLevel pre-tokenizer applies itself. _DIGITS_THEN_GPT2
# first splits off every digit (starcoder/smollm vocabularies have no multi-digit tokens).
# Unknown names fall back to _GPT2, as in transformers' GGUF converter.
_GPT2 = None
_DIGITS_THEN_GPT2 = "digits+gpt2"

PRE_TOKENIZERS = {
    "default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2, "mpt": _GPT2, "olmo": _GPT2, "jais": _GPT2,
    "trillion": _GPT2, "granite-docling": _GPT2,
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2, "codeshell": _DIGITS_THEN_GPT2, "exaone": _DIGITS_THEN_GPT2,
    "minerva-7b": _DIGITS_THEN_GPT2,
    "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "llama-bpe": [_LLAMA3], "falcon3": [_LLAMA3],
    "falcon-h1": [_LLAMA3], "pixtral": [_LLAMA3], "dbrx": [_LLAMA3], "smaug-bpe": [_LLAMA3],
    "lfm2": [_LLAMA3], "midm-2.0": [_LLAMA3],
    "qwen2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2], "stablelm2": [_QWEN2], "megrez": [_QWEN2],
    "hunyuan": [_QWEN2],
    "tekken": [_TEKKEN],
    "gpt-4o": [_GPT4O], "llama4": [_GPT4O], "minimax-m2": [_GPT4O],
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": _DEEPSEEK_CODER,
    "deepseek-v3": _DEEPSEEK_V3,
}


class Tokenizer:
    """A `tokenizers` backend plus special-token ids and a chat template.

    BOS/EOS insertion lives in the backend's post-processor, so `encode` and the saved
    tokenizer.json agree with transformers. Pass add_bos_token/add_eos_token to (re)build that
    post-processor; leave them None to keep the backend's own.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: tuple[int, ...] | list[int] = (),
        source: str = "tokenizer",
    ):
        self.backend = backend
        self.source = source  # file name for error messages
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        # transformers marks the named tokens special (matched whole in text, dropped by
        # skip_special_tokens); do the same so both agree on ids.
        named = [t for t in (bos_token, eos_token, unk_token, pad_token) if t is not None]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named])
        if add_bos_token is not None or add_eos_token is not None:
            set_post_processor(backend, self.bos_token_id if add_bos_token else None,
                               self.eos_token_id if add_eos_token else None)
        self.add_bos_token, self.add_eos_token = _probe_added_specials(backend, self.bos_token_id, self.eos_token_id)
        self._extra_eos_token_ids = [int(i) for i in extra_eos_token_ids]

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        """A Hugging Face model/tokenizer directory (tokenizer.json, tokenizer_config.json, ...)."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise NanoseekError(f"{tok_file}: file not found (a tokenizer directory needs tokenizer.json)")
        try:
            backend = Backend.from_file(tok_file)
        except Exception as e:
            raise NanoseekError(f"{tok_file}: not a valid tokenizer.json ({_first_line(e)})") from None

        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        legacy_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        tokens = {n: _token_content(config.get(n, legacy_map.get(n))) for n in names}

        chat_template = _pick_chat_template(config.get("chat_template"), os.path.join(path, "tokenizer_config.json"))
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):  # newer layout: the template lives in its own file and wins
            with open(jinja_file, encoding="utf-8") as f:
                chat_template = f.read()

        # Generation may stop on more ids than the tokenizer's one EOS (Llama 3: <|eot_id|> too).
        extra_eos = []
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(os.path.join(path, name)).get("eos_token_id")
            extra_eos += eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []

        return cls(
            backend, **tokens,
            add_bos_token=config.get("add_bos_token"), add_eos_token=config.get("add_eos_token"),
            chat_template=chat_template, extra_eos_token_ids=extra_eos, source=tok_file,
        )

    @classmethod
    def from_gguf(cls, reader_or_path) -> "Tokenizer":
        """The tokenizer described by a GGUF file's tokenizer.ggml.* metadata."""
        from nanoseek.checkpoint.gguf import gguf_field, open_gguf  # lazy: that module imports this one

        reader, name = open_gguf(reader_or_path)
        meta = functools.partial(gguf_field, reader)
        model, tokens = meta("tokenizer.ggml.model"), meta("tokenizer.ggml.tokens")
        for key, value in (("tokenizer.ggml.model", model), ("tokenizer.ggml.tokens", tokens)):
            if value is None:
                raise NanoseekError(f"{name}: field {key} is missing (the GGUF has no tokenizer metadata)")
        token_types = meta("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        merges = meta("tokenizer.ggml.merges")

        if model == "gpt2":
            backend = byte_level_backend(tokens, token_types, merges, meta("tokenizer.ggml.pre"))
            default_add_bos = False
        elif model == "llama":
            scores = meta("tokenizer.ggml.scores")
            if merges is None and scores is None:
                raise NanoseekError(f"{name}: field tokenizer.ggml.scores is missing (needed without merges)")
            add_space_prefix = meta("tokenizer.ggml.add_space_prefix")
            backend = sentencepiece_backend(tokens, token_types, merges, scores,
                                            add_space_prefix=True if add_space_prefix is None else add_space_prefix)
            default_add_bos = True  # llama.cpp adds BOS to a sentencepiece vocab that does not say otherwise
        else:
            raise NanoseekError(f"{name}: field tokenizer.ggml.model is {model!r}, which is not supported "
                                f"(supported: gpt2, llama)")

        def token_at(key):
            token_id = meta(key)
            if token_id is None:
                return None
            if not 0 <= token_id < len(tokens):
                raise NanoseekError(f"{name}: field {key} = {token_id} is outside the vocabulary of {len(tokens)}")
            return tokens[token_id]

        add_bos, add_eos = meta("tokenizer.ggml.add_bos_token"), meta("tokenizer.ggml.add_eos_token")
        extra_eos = [meta(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
        return cls(
            backend,
            bos_token=token_at("tokenizer.ggml.bos_token_id"),
            eos_token=token_at("tokenizer.ggml.eos_token_id"),
            pad_token=token_at("tokenizer.ggml.padding_token_id"),
            unk_token=token_at("tokenizer.ggml.unknown_token_id"),
            add_bos_token=default_add_bos if add_bos is None else bool(add_bos),
            add_eos_token=bool(add_eos),
            chat_template=meta("tokenizer.chat_template"),
            extra_eos_token_ids=[i for i in extra_eos if i is not None and 0 <= i < len(tokens)],
            source=name,
        )

    # ---- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS are added only if the source asks for them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included (what an embedding table needs)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token is not None else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token is not None else None

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.unk_token) if self.unk_token is not None else None

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: EOS first, then declared end-of-turn ids, then any special
        token spelled like a known end-of-turn marker (<|im_end|>, <|eot_id|>, <|endoftext|>, ...)."""
        ids = [self.eos_token_id] + self._extra_eos_token_ids
        ids += [i for i, t in sorted(self.backend.get_added_tokens_decoder().items())
                if t.special and t.content in END_OF_TURN_TOKENS]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # ---- chat --------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **template_kwargs,
    ) -> list[int] | str:
        """Render `messages` with the chat template (as transformers does) and, by default, encode
        the result without adding BOS/EOS: the template writes whatever special tokens it wants."""
        if self.chat_template is None:
            raise NanoseekError(f"{self.source}: the tokenizer has no chat template")
        if not messages:
            raise NanoseekError("chat messages: the list is empty (need at least one message)")
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                    "unk_token": self.unk_token, "pad_token": self.pad_token}
        specials = {k: v for k, v in specials.items() if v is not None}
        variables = {**specials, **template_kwargs}  # caller's kwargs win, as in transformers
        text = render_chat_template(self.chat_template, messages, add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- save --------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write tokenizer.json + tokenizer_config.json; transformers.AutoTokenizer can load the dir."""
        os.makedirs(path, exist_ok=True)
        self.backend.save(os.path.join(path, "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


class StreamDecoder:
    """Turns ids arriving one at a time into text deltas, for streaming.

    One token can be half a character (byte-level BPE splits UTF-8; SentencePiece has byte
    fallback), and decoding a single token loses the leading space SentencePiece strips from the
    first piece. So we re-decode a short window of recent ids and emit only what grew, holding back
    while the text ends in U+FFFD (an incomplete UTF-8 sequence).

        stream = StreamDecoder(tok)
        for i in ids: print(stream.put(i), end="")
        print(stream.flush())
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: already-emitted ids kept for context
        self.read_offset = 0  # ids before this have been emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while a character is still partial)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truly invalid byte sequence, as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix_text):]


# ---------------------------------------------------------------------------------------------
# Backends built from GGUF metadata


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: byte-level vocabularies spell tokens with it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in spelling]
    spelling.update({b: chr(256 + n) for n, b in enumerate(others)})  # the rest go to U+0100..U+0143
    return spelling


def byte_level_backend(tokens: list[str], token_types: list[int], merges: list[str] | None, pre: str | None) -> Backend:
    """Byte-level BPE (GPT-2, Llama 3, Qwen2, DeepSeek V3, SmolLM, ...)."""
    spell = byte_alphabet()
    alphabet = set(spell.values())
    vocab = {}
    for i, (token, token_type) in enumerate(zip(tokens, token_types)):
        # A few converters store a plain token in raw UTF-8; the BPE model needs it byte-spelled.
        # Control/user-defined tokens stay raw: they are matched whole in the text, never merged.
        if token_type not in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spell[b] for b in token.encode("utf-8"))
        vocab[token] = i
    pairs = [tuple(m.split(" ", 1)) for m in (merges or [])]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZERS.get(pre, _GPT2)  # an unknown name gets GPT-2's regex, as transformers does
    if split is _GPT2:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in split]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(backend, tokens, token_types, vocab)
    return backend


def sentencepiece_backend(tokens: list[str], token_types: list[int], merges: list[str] | None,
                          scores: list[float] | None, add_space_prefix: bool = True) -> Backend:
    """SentencePiece-style BPE (Llama 1/2, Mistral): ▁ for spaces, <0xNN> byte fallback."""
    vocab = {token: i for i, token in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk = next((t for t, tt in zip(tokens, token_types) if tt == TOKEN_UNKNOWN), None)
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    # "first": only the start of the text gets the ▁ prefix, not text after a special token.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_gguf_added_tokens(backend, tokens, token_types, vocab)
    return backend


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two known
    tokens, best score first (the order SentencePiece would merge them). Same order as
    transformers' generate_merges, so both tokenizers agree on ties."""
    merges = []
    for token, score in scores.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_gguf_added_tokens(backend: Backend, tokens, token_types, vocab) -> None:
    """CONTROL tokens become special tokens and USER_DEFINED ones plain added tokens, so both are
    matched whole in the text (<|im_start|> is one id, not seven) like llama.cpp does."""
    control = [AddedToken(t, special=True, normalized=False)
               for t, tt in zip(tokens, token_types) if tt == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, tt in zip(tokens, token_types) if tt == TOKEN_USER_DEFINED and t in vocab]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def set_post_processor(backend: Backend, bos_id: int | None, eos_id: int | None) -> None:
    """Make encode(add_special_tokens=True) add BOS and/or EOS (None: don't)."""
    bos = backend.id_to_token(bos_id) if bos_id is not None else None
    eos = backend.id_to_token(eos_id) if eos_id is not None else None
    single = " ".join([f"{bos}:0"] * (bos is not None) + ["$A:0"] + [f"{eos}:0"] * (eos is not None))
    pair = single + " " + " ".join([f"{bos}:1"] * (bos is not None) + ["$B:1"] + [f"{eos}:1"] * (eos is not None))
    specials = [(bos, bos_id)] * (bos is not None) + [(eos, eos_id)] * (eos is not None and eos != bos)
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _probe_added_specials(backend: Backend, bos_id, eos_id) -> tuple[bool, bool]:
    """Whether encode(add_special_tokens=True) adds BOS / EOS, read off the backend's behaviour."""
    ids = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    added = len(ids) - len(plain)
    add_bos = added > 0 and bos_id is not None and ids[0] == bos_id and ids[1:1 + len(plain)] == plain
    add_eos = added > 0 and eos_id is not None and ids[-1] == eos_id and ids[-1 - len(plain):-1] == plain
    return bool(add_bos), bool(add_eos)


# ---------------------------------------------------------------------------------------------
# Chat templates: rendered the way transformers renders them, so prompts match token for token.


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &, '); templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    # Templates ship with downloaded models: treat them as untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise NanoseekError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """The prompt text for `messages`. kwargs (bos_token, tools, enable_thinking, ...) become template
    variables. A None field is dropped, as transformers does (`content: None` would render 'None')."""
    if not messages:
        raise NanoseekError("chat messages: the list is empty (need at least one message)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise NanoseekError(f"chat messages[{i}]: expected a dict with role and content, got {type(m).__name__}")
    messages = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
    variables = {"tools": None, "documents": None, **kwargs,
                 "messages": messages, "add_generation_prompt": add_generation_prompt}
    try:
        return compile_chat_template(template).render(**variables)
    except jinja2.exceptions.TemplateError as e:  # raise_exception(...) in the template: bad input
        raise NanoseekError(f"chat template: {_first_line(e)}") from None


# ---------------------------------------------------------------------------------------------
# Small helpers


def _alias_reasoning(message: dict) -> dict:
    """Templates read a message's reasoning as reasoning_content (DeepSeek R1, Qwen3) or thinking
    (gpt-oss); callers use either name or "reasoning". Fill both, as transformers does."""
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _read_json(path: str) -> dict:
    """A JSON object from `path`, {} if the file is absent."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoseekError(f"{path}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise NanoseekError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value) -> str | None:
    """tokenizer_config.json writes a special token as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(value, path: str) -> str | None:
    """chat_template is a string, or a list of {name, template}: take "default", else the first."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, dict) and "template" in t for t in value):
        named = {t.get("name"): t["template"] for t in value}
        return named.get("default", value[0]["template"])
    raise NanoseekError(f"{path}: field chat_template must be a string or a list of {{name, template}}")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
