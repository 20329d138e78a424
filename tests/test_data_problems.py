import ast
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from nanoseek.data.problems import (
    LEVELS,
    TEMPLATES,
    evaluate,
    extract_final,
    generate_problems,
    load_gsm8k,
    make_problem,
    reward,
    split_of,
)
from nanoseek.errors import NanoseekError

GSM8K = Path("/work/shared/data/gsm8k")

# --- an independent checker for worked solutions -------------------------------


def exact_eval(expr: str) -> Fraction:
    """Evaluate with Python's own parser; every division must come out whole."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if isinstance(node.op, ast.Div):
                assert (a / b).denominator == 1, f"division with remainder: {a}/{b}"
                return a / b
        raise AssertionError(f"unexpected syntax in {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


STEP = re.compile(r"([\d+\-*/() ]+?) = <<([^=>]+)=([^>]+)>>(\S+?)\b")


def check_solution(answer: str) -> list[int]:
    """Assert every step's arithmetic; return the step results in order."""
    lines = answer.split("\n")
    assert lines[-1].startswith("#### ")
    results = []
    for line in lines[:-1]:
        steps = STEP.findall(line)
        assert len(steps) == 1, f"expected one calculation in {line!r}"
        plain, expr, result, shown = steps[0]
        assert plain.strip() == expr, f"plain and annotated expressions differ in {line!r}"
        assert result == shown, f"annotation result and text differ in {line!r}"
        value = exact_eval(expr)
        assert value == int(result), f"wrong arithmetic in {line!r}: {expr} = {value}"
        assert value > 0
        results.append(int(result))
    return results


def test_checker_can_fail():
    good = "He buys 3*4 = <<3*4=12>>12 pens.\n#### 12"
    assert check_solution(good) == [12]
    for bad in (
        "He buys 3*4 = <<3*4=13>>13 pens.\n#### 13",  # wrong arithmetic
        "He buys 3*4 = <<3*4=12>>13 pens.\n#### 13",  # text disagrees with annotation
        "He shares 7/2 = <<7/2=3>>3 pens.\n#### 3",  # remainder
        "He buys 3*5 = <<3*4=12>>12 pens.\n#### 12",  # plain and annotated differ
    ):
        with pytest.raises(AssertionError):
            check_solution(bad)


# --- generation ----------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_every_solution_is_correct(level):
    for p in generate_problems(200, level, seed=11):
        assert set(p) == {"question", "answer", "level", "final"}
        assert p["level"] == level
        results = check_solution(p["answer"])
        assert len(results) == level  # level = number of reasoning steps
        assert p["final"] == str(results[-1]) == p["answer"].rsplit("#### ", 1)[1]
        assert reward(p["answer"], p["final"]) == 1.0
        assert p["question"].endswith("?")


def test_all_templates_used_at_every_level():
    for level in LEVELS:
        seen = set()
        for i in range(300):
            # the first solution line identifies the template well enough: count distinct openings
            seen.add(make_problem(0, level, i)["answer"].split(" ")[0])
        assert len(seen) >= 6


def test_numbers_grow_with_level():
    def biggest(level):
        return max(int(p["final"]) for p in generate_problems(100, level, seed=0))

    assert biggest(1) < biggest(5)


def test_deterministic_by_seed():
    a = generate_problems(50, 3, seed=7)
    assert a == generate_problems(50, 3, seed=7)
    assert a[:10] == generate_problems(10, 3, seed=7)  # prefix-stable
    assert a != generate_problems(50, 3, seed=8)


def test_problems_are_distinct():
    questions = [p["question"] for p in generate_problems(500, 1, seed=0)]
    assert len(set(questions)) == 500


def test_train_and_heldout_never_overlap():
    for level in (1, 2):
        train = {p["question"] for s in (0, 1) for p in generate_problems(400, level, seed=s, split="train")}
        held = {p["question"] for s in (0, 1) for p in generate_problems(100, level, seed=s, split="heldout")}
        assert len(held) >= 100 and not train & held
        assert {split_of(q) for q in train} == {"train"} and {split_of(q) for q in held} == {"heldout"}


def test_split_is_about_a_tenth():
    questions = [p["question"] for p in generate_problems(2000, 4, seed=3, split=None)]
    held = sum(split_of(q) == "heldout" for q in questions)
    assert 120 < held < 300


def test_bad_level_and_split():
    with pytest.raises(NanoseekError, match="level"):
        generate_problems(1, 6)
    with pytest.raises(NanoseekError, match="split"):
        generate_problems(1, 1, split="test")


def test_evaluate_precedence():
    assert evaluate("2+3*4") == 14
    assert evaluate("100-20-30") == 50
    assert evaluate("1580*10/100") == 158
    assert evaluate("(2+3)*4") == 20
    with pytest.raises(ValueError):
        evaluate("2**3")


def test_template_registry():
    assert len(TEMPLATES) >= 5


# --- answer checking -----------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("work...\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### $1,234.", "1234"),
        ("#### 72.00", "72"),
        ("#### -5", "-5"),
        ("#### $-5", "-5"),
        ("#### \u22125", "-5"),
        ("####72", "72"),
        ("#### 0.50", "0.5"),
        ("#### 12\nmore text\n#### 13", "13"),  # the last one counts
        ("The answer is 42.", "42"),
        ("so the final answer is: **$1,000**", "1000"),
        ("The answer is 3. Wait, the answer is 4 apples", "4"),
        ("The answer is 7\n#### 8", "8"),  # #### wins over prose
        ("<think>#### 5</think>The answer is 6", "6"),  # reasoning drafts do not count
        ("<think>#### 5</think>no final answer", None),
        ("#### twelve", None),
        ("#### \n12", None),  # the number must be on the marker's line
        ("It is 12.", None),
        ("", None),
    ],
)
def test_extract_final(completion, expected):
    assert extract_final(completion) == expected


@pytest.mark.parametrize(
    "completion, final, score",
    [
        ("#### 1,000", "1000", 1.0),
        ("#### 1000.", 1000, 1.0),
        ("The answer is $18.", "18", 1.0),
        ("#### 18", "$18", 1.0),
        ("#### 17", "18", 0.0),
        ("#### 180", "18", 0.0),
        ("#### 18.5", "18", 0.0),
        ("#### -18", "18", 0.0),
        ("I think 18", "18", 0.0),
        ("#### 18\n#### 19", "18", 0.0),
    ],
)
def test_reward(completion, final, score):
    assert reward(completion, final) == score


# --- GSM8K ---------------------------------------------------------------------


def test_load_gsm8k_small_file(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text(
        json.dumps({"question": "Q?", "answer": "a <<1+1=2>>2\nb <<2*3=6>>6\n#### 6"}) + "\n\n"
        + json.dumps({"question": "Q2?", "answer": "#### 1,000"}) + "\n"
    )
    assert load_gsm8k(p) == [
        {"question": "Q?", "answer": "a <<1+1=2>>2\nb <<2*3=6>>6\n#### 6", "level": 2, "final": "6"},
        {"question": "Q2?", "answer": "#### 1,000", "level": 1, "final": "1000"},
    ]


def test_load_gsm8k_errors(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"question": "Q?", "answer": "no marker"}) + "\n")
    with pytest.raises(NanoseekError, match=r"g.jsonl:1: answer has no '#### N' line"):
        load_gsm8k(p)
    p.write_text('{"question": "Q?"}\n')
    with pytest.raises(NanoseekError, match=r"g.jsonl:1: expected string fields"):
        load_gsm8k(p)
    with pytest.raises(NanoseekError, match="no such file"):
        load_gsm8k(tmp_path / "missing.jsonl")


@pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="GSM8K not present")
def test_load_real_gsm8k():
    problems = load_gsm8k(GSM8K / "train.jsonl")
    assert len(problems) == 7473
    first = problems[0]
    assert first["final"] == "72" and first["question"].startswith("Natalia sold clips")
    assert all(p["level"] in LEVELS for p in problems)
    assert all(reward(p["answer"], p["final"]) == 1.0 for p in problems)
    # generated problems and GSM8K are the same shape
    assert set(first) == set(generate_problems(1, 1)[0])
