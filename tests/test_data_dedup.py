import json
import random

import pytest

from nanoseek.data.dedup import (
    CleaningReport,
    NearDupIndex,
    QualityFilter,
    alpha_fraction,
    clean_documents,
    dedup_key,
    duplicate_line_fraction,
    shingles,
)
from nanoseek.data.ingest import Document
from nanoseek.errors import NanoseekError


def make_words(rng, n):
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(n)]


VOCAB = make_words(random.Random(0), 3000)


def random_doc(seed, n_words=200):
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n_words)) + "."


def docs_of(texts):
    return [Document(text=t, source=f"doc{i}") for i, t in enumerate(texts)]


def run(texts, **kwargs):
    report = CleaningReport()
    kept = list(clean_documents(docs_of(texts), report=report, **kwargs))
    return [d.text for d in kept], report


# --- exact duplicates --------------------------------------------------------


def test_dedup_key_ignores_case_and_whitespace():
    assert dedup_key("Hello  World\n") == dedup_key("hello world")
    assert dedup_key("hello world") != dedup_key("hello, world")


def test_exact_duplicates_removed_and_counted():
    a, b = random_doc(1), random_doc(2)
    kept, report = run([a, b, a, a.upper(), b])
    assert kept == [a, b]
    d = report.to_dict()
    assert d["removed"] == {"exact_duplicate": 3}
    assert d["input_documents"] == 5 and d["kept_documents"] == 2 and d["removed_documents"] == 3
    assert d["examples"]["exact_duplicate"][0]["detail"] == "same text as doc0"


def test_no_dedup_keeps_duplicates():
    a = random_doc(1)
    kept, report = run([a, a], exact=False, near=False)
    assert kept == [a, a]
    assert report.to_dict()["removed"] == {}


# --- near duplicates ---------------------------------------------------------


def change_words(text, positions, rng):
    words = text.split()
    for p in positions:
        words[p] = rng.choice(VOCAB) + "x"  # suffix: never the same word again
    return " ".join(words)


def test_shingles_are_word_5grams():
    assert shingles("A b, c d e f!") == {"a b c d e", "b c d e f"}
    assert shingles("too short") == {"too short"}
    assert shingles("...") == set()


def test_near_duplicate_with_a_few_words_changed_is_caught():
    rng = random.Random(5)
    original = random_doc(10, 300)
    near = change_words(original, [40, 150, 260], rng)  # ~5% of shingles differ
    distinct = [random_doc(s, 300) for s in range(20, 30)]
    kept, report = run([original, *distinct, near])
    assert near not in kept
    assert kept == [original, *distinct]
    d = report.to_dict()
    assert d["removed"] == {"near_duplicate": 1}
    assert d["examples"]["near_duplicate"][0]["detail"] == "near-copy of doc0"


def test_half_overlap_is_not_a_near_duplicate():
    a = random_doc(1, 200)
    half = " ".join(a.split()[:100] + random_doc(2, 100).split())  # Jaccard ~ 1/3
    kept, _ = run([a, half])
    assert kept == [a, half]


def test_threshold_is_configurable():
    rng = random.Random(7)
    a = random_doc(3, 200)
    b = change_words(a, [20, 60, 100, 140, 180], rng)  # Jaccard ~ 0.77
    assert run([a, b], near_threshold=0.9)[0] == [a, b]
    assert run([a, b], near_threshold=0.6)[0] == [a]


def test_bad_threshold():
    with pytest.raises(NanoseekError, match="threshold"):
        NearDupIndex(threshold=1.5)


def test_near_dup_index_directly():
    index = NearDupIndex(threshold=0.8)
    a = random_doc(4, 300)
    assert index.add(a, "a") is None
    assert index.add(change_words(a, [100], random.Random(1)), "a2") == "a"
    assert index.add(random_doc(5, 300), "b") is None


# --- quality filters ---------------------------------------------------------

GOOD = "The quick brown fox jumps over the lazy dog near the quiet river bank today."


def test_good_text_passes():
    assert QualityFilter().reason(GOOD) is None


@pytest.mark.parametrize(
    "text, reason",
    [
        ("short", "too_few_chars"),
        ("word " * 300_000, "too_many_chars"),
        ("supercalifragilistic expialidocious", "too_few_words"),
        ("a b c d e f g h i j k l m n o p", "mean_word_len_too_low"),
        ("incomprehensibilities uncharacteristically counterrevolutionaries internationalization "
         "institutionalized", "mean_word_len_too_high"),
        ("1234 5678 9012 3456 7890 1234 5678 9012 abcd", "low_alpha_fraction"),
        ("buy cheap stuff now\nbuy cheap stuff now\nbuy cheap stuff now\nreal content line here", "repeated_lines"),
    ],
)
def test_each_filter_removes_what_it_says(text, reason):
    kept, report = run([GOOD, text], exact=False, near=False)
    assert kept == [GOOD]
    d = report.to_dict()
    assert d["removed"] == {reason: 1}
    assert d["examples"][reason][0]["source"] == "doc1"


def test_max_words_filter():
    qf = QualityFilter(max_words=10, max_chars=10**9)
    assert qf.reason(GOOD)[0] == "too_many_words"


def test_filters_can_be_disabled():
    kept, _ = run([GOOD, "short"], filters=False)
    assert kept == [GOOD, "short"]


def test_chat_documents_skip_quality_filters():
    chat = Document(text="Hi\n\nHello!", source="c", messages=[{"role": "user", "content": "Hi"}])
    assert list(clean_documents([chat])) == [chat]


def test_filter_helpers():
    assert alpha_fraction("ab 12") == 0.5
    assert alpha_fraction("   ") == 0.0
    assert duplicate_line_fraction("a\nb\na\n\na") == 0.5
    assert duplicate_line_fraction("") == 0.0


# --- report ------------------------------------------------------------------


def test_report_json_counts_and_examples(tmp_path):
    a = random_doc(1)
    texts = [a, a, "tiny", GOOD] + [f"{GOOD} {i}" for i in range(5)]
    report = CleaningReport(max_examples=2)
    kept = list(clean_documents(docs_of(texts), report=report))
    report.save(tmp_path / "report.json")
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["input_documents"] == len(texts)
    assert d["kept_documents"] == len(kept)
    assert d["kept_documents"] + sum(d["removed"].values()) == d["input_documents"]
    assert d["removed"]["exact_duplicate"] == 1 and d["removed"]["too_few_chars"] == 1
    assert d["removed"]["near_duplicate"] == 5  # GOOD + a number: same 5-grams
    assert len(d["examples"]["near_duplicate"]) == 2  # capped at max_examples
    assert d["settings"]["near_threshold"] == 0.8
    assert d["kept_chars"] == sum(len(t.text) for t in kept)
