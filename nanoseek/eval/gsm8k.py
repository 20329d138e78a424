"""GSM8K: problems, prompts, answer extraction and scoring, identical to lm-evaluation-harness.

Everything here is model-independent: it builds requests and scores text. The formats:

- `gsm8k`: the harness's `gsm8k` task (v3). "Question: {q}\\nAnswer: {a}" exemplars joined by
  "\\n\\n", 5 of them drawn from the train split the way the harness draws them (one
  `random.Random(1234)` shared by all test docs, `rng.sample(train, k)` per doc, in order),
  the target being the full train answer including its "#### N" line.
- `gsm8k_cot`: the harness's `gsm8k_cot` task: the 8 fixed chain-of-thought exemplars
  ("Q: ... A: ... The answer is N."), first-n.
- `chat`: zero-shot chat messages for instruct / reasoning models, asking for a final
  "#### N" line; a `<think>...</think>` block is removed before extraction.

Extraction and scoring follow the harness's filter pipeline exactly: a regex filter
(`findall`, then `group_select`, first non-empty group of a tuple, `strip`, "[invalid]" when
nothing matches), `take_first`, and `exact_match` with ignore_case and the
regexes_to_ignore "," "\\$" "(?s).*#### " "\\.$" applied to prediction and gold alike.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Sequence

from nanoseek.errors import NanoseekError
from nanoseek.jsonl import iter_jsonl

FORMATS = ("gsm8k", "gsm8k_cot", "chat")
DEFAULT_NUM_FEWSHOT = {"gsm8k": 5, "gsm8k_cot": 8, "chat": 0}

# `generation_kwargs.until` of lm-eval 0.4.13's gsm8k.yaml / gsm8k-cot.yaml. (Older task
# versions stopped at "\n\n" too; v3 does not, so neither do we: a model that writes a blank
# line before its "#### N" line would otherwise be cut off before its answer.)
STOP_SEQUENCES = {
    "gsm8k": ["Question:", "</s>", "<|im_end|>"],
    "gsm8k_cot": ["Q:", "</s>", "<|im_end|>"],
    "chat": [],
}

# lm-eval's default --fewshot_random_seed; the sampler is re-seeded with it per task.
FEWSHOT_SEED = 1234
FALLBACK = "[invalid]"

STRICT_PATTERNS = {
    "gsm8k": r"#### (\-?[0-9\.\,]+)",
    # Sic: the trailing "." is the harness's, an unescaped any-character.
    "gsm8k_cot": r"The answer is (\-?[0-9\.\,]+).",
    # Ours (chat is not a harness task): the two endings the instruction allows.
    "chat": r"#### \$?(\-?[0-9\.\,]+)|[Tt]he answer is \$?(\-?[0-9\.\,]+)",
}
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
FILTERS = ("strict-match", "flexible-extract")
REGEXES_TO_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]

CHAT_INSTRUCTION = (
    "Solve the following math problem step by step. At the end, write the final answer "
    'on its own line as "#### N", where N is just the number.'
)

# gsm8k-cot.yaml's fewshot_config.samples, verbatim.
COT_EXEMPLARS = [
    {
        "question": "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",  # noqa: E501
        "target": "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6.",  # noqa: E501
    },
    {
        "question": "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",  # noqa: E501
        "target": "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    },
    {
        "question": "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",  # noqa: E501
        "target": "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.",  # noqa: E501
    },
    {
        "question": "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",  # noqa: E501
        "target": "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8.",  # noqa: E501
    },
    {
        "question": "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",  # noqa: E501
        "target": "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9.",  # noqa: E501
    },
    {
        "question": "There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",  # noqa: E501
        "target": "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",  # noqa: E501
    },
    {
        "question": "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",  # noqa: E501
        "target": "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",  # noqa: E501
    },
    {
        "question": "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",  # noqa: E501
        "target": "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",  # noqa: E501
    },
]


# ------------------------------------------------------------------------------- loading


def load_problems(path: str | None = None, split: str = "test") -> list[dict]:
    """GSM8K docs ({"question", "answer"}) from a local JSONL file, or from the HF hub."""
    if path is not None:
        return load_jsonl(path)
    return _load_from_hub(split)


def load_jsonl(path: str) -> list[dict]:
    """Read GSM8K JSONL; a malformed line is an error naming the file and the line."""
    docs = [_check_doc(doc, f"{path}:{lineno}") for lineno, doc in iter_jsonl(path)]
    if not docs:
        raise NanoseekError(f"{path}: no problems in file")
    return docs


def _check_doc(doc: dict, where: str) -> dict:
    for field in ("question", "answer"):
        if not isinstance(doc.get(field), str):
            raise NanoseekError(f"{where}: field '{field}' missing or not a string")
    if "####" not in doc["answer"]:
        raise NanoseekError(f"{where}: 'answer' has no final '#### N' line")
    return doc


def _load_from_hub(split: str) -> list[dict]:
    try:
        import datasets  # heavy and optional: only this path needs it
    except ImportError as exc:
        raise NanoseekError(
            "loading openai/gsm8k from the Hugging Face hub needs the `datasets` package "
            "(pip install datasets); or pass a local JSONL file with --data"
        ) from exc
    try:
        rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as exc:  # network, auth, cache: all the user's to fix
        raise NanoseekError(f"cannot load openai/gsm8k split '{split}': {exc}") from exc
    return [{"question": row["question"], "answer": row["answer"]} for row in rows]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------- prompts


def gold_answer(doc: dict, fmt: str) -> str:
    """The reference the harness compares against: the full answer for `gsm8k` (the
    "(?s).*#### " ignore-regex reduces it to the number), the number after "####" else."""
    if fmt == "gsm8k":
        return doc["answer"]
    return doc["answer"].split("####")[-1].strip()


def fewshot_sets(fmt: str, count: int, num_fewshot: int | None = None,
                 pool: Sequence[dict] | None = None, seed: int = FEWSHOT_SEED) -> list[list[dict]]:
    """The exemplars for each of the first `count` test docs, in doc order.

    Random formats share one generator across docs, as the harness does, so doc i gets the
    same exemplars here as in lm-eval only when docs 0..i-1 are drawn first.
    """
    k = resolve_num_fewshot(fmt, num_fewshot)
    if k == 0:
        return [[] for _ in range(count)]
    if fmt == "gsm8k_cot":
        if k > len(COT_EXEMPLARS):
            raise NanoseekError(f"gsm8k_cot has {len(COT_EXEMPLARS)} exemplars; asked for {k}")
        return [COT_EXEMPLARS[:k] for _ in range(count)]
    if not pool:
        raise NanoseekError(f"{fmt} with {k} few-shot examples needs the train split")
    if k > len(pool):
        raise NanoseekError(f"asked for {k} few-shot examples but the train split has {len(pool)}")
    rng = random.Random(seed)
    return [rng.sample(list(pool), k) for _ in range(count)]


def resolve_num_fewshot(fmt: str, num_fewshot: int | None) -> int:
    check_format(fmt)
    k = DEFAULT_NUM_FEWSHOT[fmt] if num_fewshot is None else num_fewshot
    if k < 0:
        raise NanoseekError(f"--num-fewshot must be >= 0, got {k}")
    return k


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise NanoseekError(f"unknown GSM8K format '{fmt}' (choose from {', '.join(FORMATS)})")


def build_prompt(fmt: str, doc: dict, shots: Sequence[dict]) -> str | list[dict]:
    """A text prompt (`gsm8k`, `gsm8k_cot`) or a messages list (`chat`)."""
    check_format(fmt)
    if fmt == "gsm8k":
        return _text_prompt("Question", "Answer", doc["question"],
                            [(s["question"], s["answer"]) for s in shots])
    if fmt == "gsm8k_cot":
        return _text_prompt("Q", "A", doc["question"],
                            [(s["question"], s["target"]) for s in shots])
    return chat_messages(doc, shots)


def _text_prompt(q_label: str, a_label: str, question: str,
                 shots: Sequence[tuple[str, str]]) -> str:
    # The harness renders "{Q}: {q}\n{A}:", adds " " + target + "\n\n" per exemplar and
    # nothing after the final "{A}:".
    parts = [f"{q_label}: {q}\n{a_label}: {a}\n\n" for q, a in shots]
    parts.append(f"{q_label}: {question}\n{a_label}:")
    return "".join(parts)


def chat_messages(doc: dict, shots: Sequence[dict] = ()) -> list[dict]:
    messages = []
    for shot in shots:  # optional few-shot as earlier turns, answers in the train format
        messages.append({"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n{shot['question']}"})
        messages.append({"role": "assistant", "content": shot["answer"]})
    messages.append({"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n{doc['question']}"})
    return messages


# ---------------------------------------------------------------------------- extraction


def strip_think(text: str) -> str:
    """Drop a reasoning block. Chat templates often open <think> in the prompt, so the output
    may hold only "</think>"; an unclosed <think> means the answer never came."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return text.split("<think>", 1)[0]
    return text


def regex_filter(text: str, pattern: str, group_select: int = 0,
                 fallback: str = FALLBACK) -> str:
    """lm-eval's RegexFilter on one response."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):  # several groups: the first that matched
        match = next((group for group in match if group), fallback)
    return match.strip()


def extract(text: str, fmt: str) -> dict[str, str]:
    """The answer each filter takes from one model output."""
    check_format(fmt)
    if fmt == "chat":
        text = strip_think(text)
    return {
        "strict-match": regex_filter(text, STRICT_PATTERNS[fmt]),
        "flexible-extract": regex_filter(text, FLEXIBLE_PATTERN, group_select=-1),
    }


def normalize(text: str) -> str:
    """What exact_match compares: ignore-regexes in order, then lower-case."""
    for pattern in REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, gold: str) -> bool:
    return normalize(prediction) == normalize(gold)


# ------------------------------------------------------------------------------- scoring


def score_doc(outputs: Sequence[str], doc: dict, fmt: str) -> dict:
    """Per-doc verdicts for n sampled outputs.

    For each filter: the first sample's answer and correctness (the harness's take_first),
    the majority answer (harness's majority_vote: most common extracted string, ties to the
    earliest) and whether any sample was right (pass@n).
    """
    if not outputs:
        raise ValueError("score_doc needs at least one output")
    gold = gold_answer(doc, fmt)
    answers = [extract(text, fmt) for text in outputs]
    verdict = {}
    for name in FILTERS:
        extracted = [a[name] for a in answers]
        correct = [exact_match(a, gold) for a in extracted]
        majority = Counter(extracted).most_common(1)[0][0]
        verdict[name] = {
            "answers": extracted,
            "correct": correct,
            "exact_match": correct[0],
            "majority": majority,
            "maj": exact_match(majority, gold),
            "pass": any(correct),
        }
    return verdict


def aggregate(verdicts: Sequence[dict], n: int) -> dict:
    """Means and standard errors over docs: exact_match (first sample), maj@n, pass@n."""
    scores = {}
    for name in FILTERS:
        metrics = {
            "exact_match": [v[name]["exact_match"] for v in verdicts],
            f"maj@{n}": [v[name]["maj"] for v in verdicts],
            f"pass@{n}": [v[name]["pass"] for v in verdicts],
        }
        scores[name] = {}
        for metric, values in metrics.items():
            scores[name][metric] = mean(values)
            scores[name][f"{metric}_stderr"] = mean_stderr(values)
    return scores


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation / sqrt(n), as lm-eval's mean_stderr; None below 2 values."""
    count = len(values)
    if count < 2:
        return None
    mu = mean(values)
    variance = sum((x - mu) ** 2 for x in values) / (count - 1)
    return math.sqrt(variance) / math.sqrt(count)
