"""The one JSONL reader: every bad line is an error naming the file and the line."""

import gzip
from collections.abc import Iterator
from pathlib import Path

import json

from nanoseek.errors import NanoseekError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    if not path.exists():
        raise NanoseekError(f"{path}: no such file")
    if not path.is_file():
        raise NanoseekError(f"{path}: not a regular file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise NanoseekError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            line = (line.lstrip("\ufeff") if lineno == 1 else line).strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanoseekError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise NanoseekError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
