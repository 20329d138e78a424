"""Read raw text into normalised Documents.

Supported inputs:
  * plain text: one document per file, or one per paragraph (split on runs of blank lines)
  * JSONL with a text field (`{"text": ...}` per line, field name configurable)
  * chat JSONL (`{"messages": [{"role": ..., "content": ...}, ...]}` per line)

Every document is normalised the same way (see `normalize_text`) so that exact
de-duplication downstream compares like with like. Bad input raises NanoseekError
naming the file and line, because the CLI shows only that message.
"""

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from nanoseek.errors import NanoseekError
from nanoseek.jsonl import iter_jsonl

CHAT_ROLES = ("system", "user", "assistant", "tool")
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class Document:
    text: str  # normalised text; for chat, the message contents joined by blank lines
    source: str  # "path" or "path:line", for error messages and report examples
    messages: list[dict] | None = None  # chat documents keep their structure for templating


# -----------------------------------------------------------------------------
# Normalisation

# C0/C1 control characters except \t and \n, plus BOM, zero-width space and lone
# surrogates (JSON can encode those, and they later crash UTF-8 encoding).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\u200b\ud800-\udfff]")
# Unicode spaces that look like " " but would otherwise become distinct tokens.
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INNER_SPACES = re.compile(r"(?<=\S) {2,}")  # keeps leading indentation (code, poems)
_TRAILING_SPACES = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, unified newlines, no control chars, tidy spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
    text = _CONTROL.sub("", text)
    text = _ODD_SPACES.sub(" ", text)
    text = _INNER_SPACES.sub(" ", text)
    text = _TRAILING_SPACES.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


# -----------------------------------------------------------------------------
# Readers


def _check_file(path: Path) -> None:
    if not path.exists():
        raise NanoseekError(f"{path}: no such file")
    if not path.is_file():
        raise NanoseekError(f"{path}: not a regular file")


def _decode_line(path: Path, lineno: int, raw: bytes) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanoseekError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return line.lstrip("\ufeff") if lineno == 1 else line


def read_text_file(path: str | Path, split_blank_lines: bool = False) -> Iterator[Document]:
    """One document per file, or (split_blank_lines) one per paragraph; empty ones are skipped."""
    path = Path(path)
    _check_file(path)
    paragraph: list[str] = []
    start = 1
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(path, lineno, raw)
            if split_blank_lines and not line.strip():
                yield from _make_doc("".join(paragraph), f"{path}:{start}")
                paragraph, start = [], lineno + 1
                continue
            paragraph.append(line)
    source = f"{path}:{start}" if split_blank_lines else str(path)
    yield from _make_doc("".join(paragraph), source)


def _make_doc(text: str, source: str) -> Iterator[Document]:
    text = normalize_text(text)
    if text:
        yield Document(text=text, source=source)


def read_jsonl(path: str | Path, field: str = "text") -> Iterator[Document]:
    """One document per JSONL line, taken from `field` (must be a string)."""
    path = Path(path)
    for lineno, obj in iter_jsonl(path):
        if field not in obj:
            keys = ", ".join(sorted(obj)) or "none"
            raise NanoseekError(f"{path}:{lineno}: missing field {field!r} (fields present: {keys})")
        value = obj[field]
        if not isinstance(value, str):
            raise NanoseekError(f"{path}:{lineno}: field {field!r} must be a string, got {type(value).__name__}")
        yield from _make_doc(value, f"{path}:{lineno}")


def parse_messages(messages, where: str) -> list[dict]:
    """Validate a chat `messages` list and return it with normalised contents."""
    if not isinstance(messages, list) or not messages:
        raise NanoseekError(f"{where}: 'messages' must be a non-empty list")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise NanoseekError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in CHAT_ROLES:
            expected = ", ".join(CHAT_ROLES)
            raise NanoseekError(f"{where}: messages[{i}] has unknown role {role!r} (expected one of {expected})")
        if not isinstance(content, str):
            raise NanoseekError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
        clean.append({"role": role, "content": normalize_text(content)})
    return clean


def read_chat_jsonl(path: str | Path) -> Iterator[Document]:
    """One conversation per JSONL line; Document.text joins the contents (for dedup and filters)."""
    path = Path(path)
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" not in obj:
            raise NanoseekError(f"{where}: missing field 'messages'")
        messages = parse_messages(obj["messages"], where)
        text = "\n\n".join(m["content"] for m in messages if m["content"])
        yield Document(text=text, source=where, messages=messages)


def detect_format(path: str | Path) -> str:
    """'text', 'jsonl' or 'chat': by suffix, and for JSONL by whether the first record has 'messages'."""
    path = Path(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return "text"
    for _, obj in iter_jsonl(path):
        return "chat" if "messages" in obj else "jsonl"
    return "jsonl"  # empty file: nothing to read either way


def read_documents(
    paths: Iterable[str | Path],
    fmt: str = "auto",
    field: str = "text",
    split_blank_lines: bool = False,
) -> Iterator[Document]:
    """Documents from many files; fmt is 'auto', 'text', 'jsonl' or 'chat'."""
    if fmt not in ("auto", "text", "jsonl", "chat"):
        raise NanoseekError(f"unknown input format {fmt!r} (expected auto, text, jsonl or chat)")
    for path in paths:
        kind = detect_format(path) if fmt == "auto" else fmt
        if kind == "text":
            yield from read_text_file(path, split_blank_lines=split_blank_lines)
        elif kind == "jsonl":
            yield from read_jsonl(path, field=field)
        else:
            yield from read_chat_jsonl(path)
