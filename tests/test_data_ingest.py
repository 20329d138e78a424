import json

import pytest

from nanoseek.data.ingest import (
    detect_format,
    normalize_text,
    read_chat_jsonl,
    read_documents,
    read_jsonl,
    read_text_file,
)
from nanoseek.errors import NanoseekError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --- normalisation -----------------------------------------------------------


def test_normalize_nfc():
    decomposed = "cafe\u0301"  # e + combining acute
    assert normalize_text(decomposed) == "caf\u00e9"


def test_normalize_strips_control_chars_but_keeps_tabs_and_newlines():
    text = "a\x00b\x07c\x1bd\x7f\u0085e\ufefff\u200bg\tx\ny"
    assert normalize_text(text) == "abcdefg\tx\ny"


def test_normalize_whitespace():
    text = "\r\n  first  line   here \r\nsecond\u00a0line\u3000!\r\n\r\n\r\n\n\nthird\t \n"
    assert normalize_text(text) == "first line here\nsecond line !\n\nthird"


def test_normalize_keeps_indentation():
    code = "def f():\n    return  1\n"
    assert normalize_text(code) == "def f():\n    return 1"


def test_normalize_removes_lone_surrogates():
    assert normalize_text(json.loads('"a\\ud800b"')) == "ab"


# --- plain text --------------------------------------------------------------


def test_text_file_is_one_document(tmp_path):
    p = write(tmp_path / "a.txt", "Hello  world.\n\nSecond paragraph.\n")
    docs = list(read_text_file(p))
    assert [d.text for d in docs] == ["Hello world.\n\nSecond paragraph."]
    assert docs[0].source == str(p)


def test_text_file_split_on_blank_line_runs(tmp_path):
    p = write(tmp_path / "a.txt", "one\nstill one\n\n\n  \ntwo\n\nthree\n")
    docs = list(read_text_file(p, split_blank_lines=True))
    assert [d.text for d in docs] == ["one\nstill one", "two", "three"]
    assert [d.source.rsplit(":", 1)[1] for d in docs] == ["1", "6", "8"]  # paragraph start lines


def test_empty_text_file_gives_no_documents(tmp_path):
    assert list(read_text_file(write(tmp_path / "e.txt", " \n\n"))) == []


def test_missing_file(tmp_path):
    with pytest.raises(NanoseekError, match="nope.txt: no such file"):
        list(read_text_file(tmp_path / "nope.txt"))


def test_invalid_utf8_names_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(NanoseekError, match=r"bad.txt:3: not valid UTF-8"):
        list(read_text_file(p))


# --- JSONL -------------------------------------------------------------------


def test_jsonl_field(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a  b"}\n\n{"text": "c", "body": "x"}\n')
    assert [d.text for d in read_jsonl(p)] == ["a b", "c"]
    assert [d.source for d in read_jsonl(p)] == [f"{p}:1", f"{p}:3"]


def test_jsonl_custom_field(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"body": "hello"}\n')
    assert [d.text for d in read_jsonl(p, field="body")] == ["hello"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(NanoseekError, match=r"d.jsonl:2: malformed JSON"):
        list(read_jsonl(p))


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(NanoseekError, match=r"d.jsonl:2: missing field 'text' \(fields present: txt\)"):
        list(read_jsonl(p))


def test_jsonl_non_string_field(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": 5}\n')
    with pytest.raises(NanoseekError, match=r"d.jsonl:1: field 'text' must be a string"):
        list(read_jsonl(p))


def test_jsonl_non_object_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '["text"]\n')
    with pytest.raises(NanoseekError, match=r"d.jsonl:1: expected a JSON object"):
        list(read_jsonl(p))


# --- chat JSONL --------------------------------------------------------------


def chat_line(*messages):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]}) + "\n"


def test_chat_jsonl(tmp_path):
    p = write(tmp_path / "c.jsonl", chat_line(("system", "Be brief."), ("user", "Hi  there"), ("assistant", "Hello!")))
    (doc,) = read_chat_jsonl(p)
    assert doc.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert doc.text == "Be brief.\n\nHi there\n\nHello!"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"conversation": []}\n', "missing field 'messages'"),
        ('{"messages": []}\n', "non-empty list"),
        ('{"messages": [{"role": "user"}]}\n', r"messages\[0\] must be an object with 'role' and 'content'"),
        ('{"messages": [{"role": "asistant", "content": "x"}]}\n', "unknown role 'asistant'"),
        ('{"messages": [{"role": "user", "content": null}]}\n', r"messages\[0\].content must be a string"),
    ],
)
def test_chat_errors_name_file_and_line(tmp_path, line, message):
    p = write(tmp_path / "c.jsonl", chat_line(("user", "fine")) + line)
    with pytest.raises(NanoseekError, match=rf"c.jsonl:2: .*{message}"):
        list(read_chat_jsonl(p))


# --- dispatch ----------------------------------------------------------------


def test_detect_format_and_read_documents(tmp_path):
    txt = write(tmp_path / "a.md", "# Title\n\nBody text.")
    plain = write(tmp_path / "b.jsonl", '{"text": "json doc"}\n')
    chat = write(tmp_path / "c.jsonl", chat_line(("user", "q"), ("assistant", "a")))
    assert [detect_format(p) for p in (txt, plain, chat)] == ["text", "jsonl", "chat"]
    docs = list(read_documents([txt, plain, chat]))
    assert [d.text for d in docs] == ["# Title\n\nBody text.", "json doc", "q\n\na"]
    assert docs[2].messages is not None and docs[0].messages is None


def test_read_documents_unknown_format(tmp_path):
    with pytest.raises(NanoseekError, match="unknown input format"):
        list(read_documents([tmp_path / "x"], fmt="csv"))
