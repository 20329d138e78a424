"""GSM8K prompts, extraction and scoring against lm-evaluation-harness 0.4.13.

Expected values were produced once by running the harness itself (lm-eval==0.4.13 in a
separate virtualenv, offline): its RegexFilter + TakeFirstFilter + exact_match_hf_evaluate
with the gsm8k / gsm8k-cot filter_list and metric_list on the outputs below, and its
`Task.build_all_requests(limit=4)` with fewshot seed 1234 on the local GSM8K JSONL files
(task YAMLs copied with `dataset_path: json` + `data_files`), hashing each context.
Where lm_eval's filter classes are importable, the extraction is also compared live.
"""

import hashlib
import json
import math
import os
import random
import sys
from pathlib import Path

import pytest

from nanoseek.errors import NanoseekError
from nanoseek.eval import gsm8k

REPO = Path(__file__).resolve().parents[1]

# (format, model output, gold "#### N", strict answer, strict correct, flexible answer,
#  flexible correct), as lm-eval 0.4.13 computes them.
HARNESS_CASES = [
    ("gsm8k", " She makes 9 * 2 = $18 every day.\n#### 18", "#### 18", "18", True, "18", True),
    ("gsm8k", " The total is 1,234 apples.\n#### 1,234", "#### 1234", "1,234", True, "1,234", True),
    ("gsm8k", " #### $1,234.", "#### 1234", "[invalid]", False, "$1,234.", True),
    ("gsm8k", " It costs $18.", "#### 18", "[invalid]", False, "$18.", True),
    ("gsm8k", " The answer is 18.", "#### 18", "[invalid]", False, "18.", True),
    ("gsm8k", " The answer is -3.", "#### -3", "[invalid]", False, "-3.", True),
    ("gsm8k", " He lost 5 then 7 more, so 12 remain.\n#### -12", "#### -12", "-12", True, "-12", True),
    ("gsm8k", " First 3, then 4, then 5 and finally 42", "#### 42", "[invalid]", False, "42", True),
    ("gsm8k", " #### 10 and then #### 20", "#### 10", "10", True, "20", False),
    ("gsm8k", " We get #### 7 in the middle and 9 at the end.", "#### 7", "7", True, "9", False),
    ("gsm8k", " I don't know.", "#### 0", "[invalid]", False, "[invalid]", False),
    ("gsm8k", "", "#### 0", "[invalid]", False, "[invalid]", False),
    ("gsm8k", " The result is 3.5.", "#### 3.5", "[invalid]", False, "3.5.", True),
    ("gsm8k", " #### 18.00", "#### 18", "18.00", False, "18.00", False),
    ("gsm8k", " 0.5", "#### 0.5", "[invalid]", False, "0.5", True),
    ("gsm8k", " Total: 1,000,000 dollars. #### 1000000", "#### 1000000", "1000000", True, "1000000", True),  # noqa: E501
    ("gsm8k", " So x = -7\n#### -7.", "#### -7", "-7.", True, "-7.", True),
    ("gsm8k", " 7 8 9.", "#### 9", "[invalid]", False, "9.", True),
    ("gsm8k", " The answer is 1.5.\n\nQuestion: next", "#### 1.5", "[invalid]", False, "1.5.", True),
    ("gsm8k_cot", " She makes 9 * 2 = $18 every day.\n#### 18", "#### 18", "[invalid]", False, "18", True),  # noqa: E501
    ("gsm8k_cot", " The answer is 18.", "#### 18", "18", True, "18.", True),
    # The harness's pattern ends in an unescaped "." that must eat a character: "1" + "8".
    ("gsm8k_cot", " The answer is 18", "#### 18", "1", False, "18", True),
    ("gsm8k_cot", " The answer is -3.", "#### -3", "-3", True, "-3.", True),
    ("gsm8k_cot", " The answer is $18.", "#### 18", "[invalid]", False, "$18.", True),
    ("gsm8k_cot", " #### 10 and then #### 20", "#### 10", "[invalid]", False, "20", False),
    ("gsm8k_cot", " The answer is 2,500.", "#### 2500", "2,500", True, "2,500.", True),
    ("gsm8k_cot", " So x = -7\n#### -7.", "#### -7", "[invalid]", False, "-7.", True),
    ("gsm8k_cot", " The answer is 1.5.\n\nQuestion: next", "#### 1.5", "1.5", True, "1.5.", True),
    ("gsm8k_cot", "", "#### 0", "[invalid]", False, "[invalid]", False),
]

# sha256 of lm-eval 0.4.13's contexts for test docs 0..3 (see module docstring).
HARNESS_CONTEXT_SHA256 = {
    "gsm8k": [
        "32680f263ba83280e98a8a24ceefed10a722a4cdcd9f4d78e93c45d43143ca66",
        "e6b9a0195411932e5323ed20ad05e965b08b979103bbb26594a5bdf123d27990",
        "97eb2662b11bbd7bd0423f898efde0e9a04d22028ed5fc1f80576965b0f570fa",
        "d86f60ba0709d975d0b08e350def68f8108dff3e64f376e672b43c37efa6ab8c",
    ],
    "gsm8k_cot": [
        "901fead9abd2535b6d0610c3c90125f38cad81678c4b2b98ec8fb818e3948bde",
        "d8ef3245c80f640811539185b957683e5036aab3d96e0ecf13cd5728c88cf30f",
        "dc37b83aca6e54ce0ed7be37efa94c2ba8f01755955ff2c04344d5acd546492b",
        "0a9de94503c79619eb8a59ad3ae3f5817ea8ee3076fdbe13425e542189189795",
    ],
}
TEST_SHA256 = "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"
TRAIN_SHA256 = "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"


def gsm8k_dir() -> Path | None:
    """The shared GSM8K copy: $NANOSEEK_GSM8K_DIR, shared/ beside the repo, or /work/shared."""
    candidates = [os.environ.get("NANOSEEK_GSM8K_DIR"), REPO.parent / "shared/data/gsm8k",
                  "/work/shared/data/gsm8k"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "test.jsonl").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def real_data():
    directory = gsm8k_dir()
    if directory is None:
        pytest.skip("GSM8K data not found (set NANOSEEK_GSM8K_DIR)")
    test, train = directory / "test.jsonl", directory / "train.jsonl"
    if gsm8k.file_sha256(str(test)) != TEST_SHA256 or gsm8k.file_sha256(str(train)) != TRAIN_SHA256:
        pytest.skip("GSM8K files differ from the copy the expected prompts were built from")
    return gsm8k.load_jsonl(str(test)), gsm8k.load_jsonl(str(train))


def doc_with(gold: str) -> dict:
    return {"question": "q", "answer": "Some steps.\n" + gold}


# ------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("case", HARNESS_CASES, ids=lambda c: f"{c[0]}:{c[1][:30]!r}")
def test_extraction_and_exact_match_agree_with_harness(case):
    fmt, output, gold, strict, strict_ok, flexible, flexible_ok = case
    verdict = gsm8k.score_doc([output], doc_with(gold), fmt)
    assert verdict["strict-match"]["answers"] == [strict]
    assert verdict["strict-match"]["exact_match"] is strict_ok
    assert verdict["flexible-extract"]["answers"] == [flexible]
    assert verdict["flexible-extract"]["exact_match"] is flexible_ok


def test_extraction_matches_live_lm_eval_filters_when_installed():
    extraction = pytest.importorskip("lm_eval.filters.extraction")
    selection = pytest.importorskip("lm_eval.filters.selection")
    for fmt, output, *_ in HARNESS_CASES:
        strict = extraction.RegexFilter(gsm8k.STRICT_PATTERNS[fmt])
        flexible = extraction.RegexFilter(gsm8k.FLEXIBLE_PATTERN, group_select=-1)
        take_first = selection.TakeFirstFilter()
        for name, flt in (("strict-match", strict), ("flexible-extract", flexible)):
            expected = list(take_first.apply(flt.apply([[output]], None), None))[0]
            assert gsm8k.extract(output, fmt)[name] == expected, (fmt, output, name)


def test_normalize_applies_ignore_regexes_in_order_then_lowercases():
    assert gsm8k.normalize("Steps 1,000\nmore\n#### $1,000.") == "1000"
    assert gsm8k.normalize("$-7.") == "-7"
    assert gsm8k.normalize("12.5") == "12.5"  # only a trailing period goes
    assert gsm8k.normalize("ABC") == "abc"


def test_majority_vote_takes_most_common_answer_and_first_on_ties():
    doc = doc_with("#### 7")
    verdict = gsm8k.score_doc([" #### 5", " #### 7", " #### 7", " nothing", " #### 5"], doc, "gsm8k")
    strict = verdict["strict-match"]
    # 5 and 7 tie at two votes; Counter.most_common keeps first-seen order, as lm-eval's
    # MajorityVoteFilter does (checked against it: it returns "5" for this list).
    assert strict["majority"] == "5"
    assert strict["maj"] is False
    assert strict["pass"] is True
    assert strict["exact_match"] is False  # the first sample says 5


def test_chat_format_strips_think_and_accepts_both_endings():
    assert gsm8k.extract("<think>maybe #### 3</think>So #### 18", "chat")["strict-match"] == "18"
    # Templates that open <think> in the prompt leave only the closing tag in the output.
    assert gsm8k.extract("hmm 3 or 4\n</think>\nThe answer is $1,250.", "chat") == {
        "strict-match": "1,250.", "flexible-extract": "$1,250."}
    # Unfinished reasoning has no answer, even if it mentions numbers.
    assert gsm8k.extract("<think>#### 12 wait", "chat")["strict-match"] == "[invalid]"
    assert gsm8k.score_doc(["</think>\n#### 1,250"], doc_with("#### 1250"), "chat")[
        "strict-match"]["exact_match"] is True


def test_stop_sequences_are_the_harness_generation_kwargs():
    assert gsm8k.STOP_SEQUENCES["gsm8k"] == ["Question:", "</s>", "<|im_end|>"]
    assert gsm8k.STOP_SEQUENCES["gsm8k_cot"] == ["Q:", "</s>", "<|im_end|>"]


# ------------------------------------------------------------------------------- prompts


def test_gsm8k_prompts_match_lm_eval_contexts(real_data):
    test, train = real_data
    shots = gsm8k.fewshot_sets("gsm8k", 4, None, train)
    prompts = [gsm8k.build_prompt("gsm8k", test[i], shots[i]) for i in range(4)]
    assert [hashlib.sha256(p.encode()).hexdigest() for p in prompts] == HARNESS_CONTEXT_SHA256["gsm8k"]


def test_gsm8k_cot_prompts_match_lm_eval_contexts(real_data):
    test, _ = real_data
    shots = gsm8k.fewshot_sets("gsm8k_cot", 4)
    prompts = [gsm8k.build_prompt("gsm8k_cot", test[i], shots[i]) for i in range(4)]
    assert [hashlib.sha256(p.encode()).hexdigest() for p in prompts] == HARNESS_CONTEXT_SHA256["gsm8k_cot"]


def test_gsm8k_prompt_structure(real_data):
    test, train = real_data
    prompt = gsm8k.build_prompt("gsm8k", test[0], gsm8k.fewshot_sets("gsm8k", 1, None, train)[0])
    blocks = prompt.split("\n\n")  # GSM8K answers have no blank lines, so blocks = turns
    assert len(blocks) == 6
    for block in blocks[:5]:
        assert block.startswith("Question: ") and "\nAnswer: " in block
        assert "\n#### " in block  # the target is the full train answer
    assert blocks[5] == f"Question: {test[0]['question']}\nAnswer:"
    # The harness's sampler: Random(1234).sample(train, 5) for the first doc.
    expected = random.Random(1234).sample(train, 5)
    assert [b.split("\nAnswer: ")[0][len("Question: "):] for b in blocks[:5]] == [
        d["question"] for d in expected]


def test_gsm8k_cot_prompt_structure():
    doc = {"question": "How many?", "answer": "x\n#### 4"}
    prompt = gsm8k.build_prompt("gsm8k_cot", doc, gsm8k.fewshot_sets("gsm8k_cot", 1)[0])
    blocks = prompt.split("\n\n")
    assert len(blocks) == 9
    for block, exemplar in zip(blocks[:8], gsm8k.COT_EXEMPLARS):
        assert block == f"Q: {exemplar['question']}\nA: {exemplar['target']}"
        assert block.endswith(".") and "The answer is " in block
    assert blocks[8] == "Q: How many?\nA:"


def test_fewshot_draws_continue_one_generator_across_docs():
    pool = [{"question": f"q{i}", "answer": f"a\n#### {i}"} for i in range(50)]
    sets = gsm8k.fewshot_sets("gsm8k", 3, 5, pool)
    rng = random.Random(1234)
    assert sets == [rng.sample(pool, 5) for _ in range(3)]
    assert sets[0] != sets[1]


def test_num_fewshot_override():
    doc = {"question": "Q?", "answer": "x\n#### 1"}
    pool = [{"question": f"q{i}", "answer": f"a{i}\n#### {i}"} for i in range(10)]
    zero = gsm8k.build_prompt("gsm8k", doc, gsm8k.fewshot_sets("gsm8k", 1, 0, pool)[0])
    assert zero == "Question: Q?\nAnswer:"
    three = gsm8k.build_prompt("gsm8k_cot", doc, gsm8k.fewshot_sets("gsm8k_cot", 1, 3)[0])
    assert three.count("\n\n") == 3 and three.startswith("Q: There are 15 trees")
    with pytest.raises(NanoseekError, match="8 exemplars"):
        gsm8k.fewshot_sets("gsm8k_cot", 1, 9)
    with pytest.raises(NanoseekError, match=">= 0"):
        gsm8k.fewshot_sets("gsm8k", 1, -1, pool)
    with pytest.raises(NanoseekError, match="train split"):
        gsm8k.fewshot_sets("gsm8k", 1, 5, None)


def test_chat_prompt_is_messages_with_instruction():
    messages = gsm8k.build_prompt("chat", {"question": "Q?", "answer": "#### 1"}, [])
    assert len(messages) == 1 and messages[0]["role"] == "user"
    assert messages[0]["content"].endswith("Q?") and '"#### N"' in messages[0]["content"]


# ------------------------------------------------------------------------------- loading


def test_load_jsonl_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q", "answer": "a\n#### 1"})
    path.write_text(good + "\n\n" + "{not json\n")
    with pytest.raises(NanoseekError, match=rf"{path}:3: malformed JSON"):
        gsm8k.load_jsonl(str(path))
    path.write_text(good + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(NanoseekError, match=rf"{path}:2: field 'answer'"):
        gsm8k.load_jsonl(str(path))
    path.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(NanoseekError, match=rf"{path}:1: .*####"):
        gsm8k.load_jsonl(str(path))
    with pytest.raises(NanoseekError, match="missing.jsonl: no such file"):
        gsm8k.load_jsonl(str(tmp_path / "missing.jsonl"))


def test_hub_loading_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(NanoseekError, match="pip install datasets"):
        gsm8k.load_problems(None)


# ------------------------------------------------------------------------------- scoring


def test_aggregate_scores_and_sample_stderr():
    docs = [doc_with("#### 1"), doc_with("#### 2"), doc_with("#### 3"), doc_with("#### 4")]
    outputs = [
        [" #### 1", " #### 9", " #### 9"],  # first right, majority wrong, pass
        [" #### 5", " #### 2", " #### 2"],  # first wrong, majority right
        [" #### 3", " #### 3", " #### 3"],
        [" no idea", " #### 8", " #### 7"],  # nothing right
    ]
    verdicts = [gsm8k.score_doc(o, d, "gsm8k") for o, d in zip(outputs, docs)]
    scores = gsm8k.aggregate(verdicts, 3)["strict-match"]
    assert scores["exact_match"] == 0.5
    assert scores["maj@3"] == 0.5
    assert scores["pass@3"] == 0.75
    # sample stddev (n-1) / sqrt(n): values 1,0,1,0 -> sqrt(1/3) / 2
    assert scores["exact_match_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert scores["pass@3_stderr"] == pytest.approx(math.sqrt(0.25) / 2)
    assert gsm8k.mean_stderr([1.0]) is None
