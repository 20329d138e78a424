"""Verifiable arithmetic word problems (GSM8K format), the GSM8K loader, and the answer reward.

A generated problem is a dict {question, answer, level, final}:
  * answer is a worked solution, one calculation per line written GSM8K-style as
    "... 4*3 = <<4*3=12>>12 dollars." and a last line "#### 12"
  * level 1..5 = number of calculation steps, and the numbers grow with it
  * final is the answer as a normalised string ("12")

Every template is a story of up to five stages; level L tells the first L stages and
asks for the quantity the L-th one computes. All answers and intermediate values are
positive integers: divisions are set up to be exact (the divisor is picked among the
divisors of the dividend, or the attempt is redrawn).

Generation is deterministic: problem i of (seed, level) comes from its own RNG seeded
with those three values, so the first k problems do not depend on n. The train/held-out
split is decided by a hash of the question text, so the two sets can never overlap,
whatever the seeds.
"""

import hashlib
import json
import random
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from nanoseek.errors import NanoseekError

LEVELS = (1, 2, 3, 4, 5)
SCALE = {1: 1, 2: 2, 3: 3, 4: 5, 5: 8}  # upper bounds of drawn numbers grow with the level
HELDOUT_PER_MILLE = 100  # 10% of all possible questions belong to the held-out split


# -----------------------------------------------------------------------------
# Building a problem


class _Redraw(Exception):
    """The random draw led to a non-integer, non-positive or implausible value: draw again."""


class Story:
    """Collects the question's sentences and the solution's calculation lines."""

    def __init__(self):
        self.facts: list[str] = []
        self.lines: list[str] = []
        self.value: int | None = None

    def fact(self, sentence: str) -> None:
        self.facts.append(sentence)

    def step(self, sentence: str, expr: str) -> int:
        """Evaluate expr, write `sentence` with {calc} -> "expr = <<expr=v>>v", return v."""
        value = evaluate(expr)
        if value.denominator != 1 or value <= 0:
            raise _Redraw
        value = int(value)
        calc = f"{expr} = <<{expr}={value}>>{value}"
        self.lines.append(sentence.format(calc=calc))
        self.value = value
        return value


def evaluate(expr: str) -> Fraction:
    """Exact value of an expression of integers, + - * / and parentheses (left to right, usual precedence)."""
    tokens = re.findall(r"\d+|[-+*/()]", expr)
    if "".join(tokens) != expr.replace(" ", ""):
        raise ValueError(f"unsupported expression {expr!r}")
    value, rest = _parse_sum(tokens)
    if rest:
        raise ValueError(f"unsupported expression {expr!r}")
    return value


def _parse_sum(tokens):
    value, tokens = _parse_product(tokens)
    while tokens and tokens[0] in "+-":
        op, (rhs, tokens) = tokens[0], _parse_product(tokens[1:])
        value = value + rhs if op == "+" else value - rhs
    return value, tokens


def _parse_product(tokens):
    value, tokens = _parse_atom(tokens)
    while tokens and tokens[0] in "*/":
        op, (rhs, tokens) = tokens[0], _parse_atom(tokens[1:])
        value = value * rhs if op == "*" else value / rhs
    return value, tokens


def _parse_atom(tokens):
    if not tokens:
        raise ValueError("unexpected end of expression")
    if tokens[0] == "(":
        value, tokens = _parse_sum(tokens[1:])
        if not tokens or tokens[0] != ")":
            raise ValueError("missing )")
        return value, tokens[1:]
    if tokens[0] == "-":
        value, tokens = _parse_atom(tokens[1:])
        return -value, tokens
    if not tokens[0].isdigit():
        raise ValueError(f"unexpected {tokens[0]!r}")
    return Fraction(int(tokens[0])), tokens[1:]


def _num(rng: random.Random, lo: int, hi: int, level: int) -> int:
    return rng.randint(lo, hi * SCALE[level])


def _divisor(rng: random.Random, value: int, lo: int = 2, hi: int = 12) -> int:
    """A random divisor of value in [lo, hi], so the story's division is exact."""
    choices = [d for d in range(lo, hi + 1) if value % d == 0 and d < value]
    if not choices:
        raise _Redraw
    return rng.choice(choices)


def _round_up(value: int, unit: int) -> int:
    return (value // unit + 1) * unit


NAMES = [
    ("Ava", "she", "her"), ("Liam", "he", "his"), ("Maya", "she", "her"), ("Noah", "he", "his"),
    ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"), ("Raj", "he", "his"),
    ("Sofia", "she", "her"), ("Kenji", "he", "his"), ("Amara", "she", "her"), ("Diego", "he", "his"),
]


def _people(rng: random.Random, k: int) -> list[tuple[str, str, str]]:
    return rng.sample(NAMES, k)


# -----------------------------------------------------------------------------
# Templates: each takes (rng, level, story), tells `level` stages, returns the question.


def shopping(rng, level, s):
    (name, he, his), = _people(rng, 1)
    item = rng.choice(["notebooks", "pens", "apples", "candles", "stickers", "socks"])
    extra = rng.choice(["backpack", "lunch box", "umbrella", "water bottle"])
    q, p = rng.randint(2, 4 + 2 * level), _num(rng, 2, 9, level)
    s.fact(f"{name} buys {q} {item} that cost ${p} each.")
    total = s.step(f"The {item} cost {{calc}} dollars.", f"{q}*{p}")
    ask = f"How much does {name} spend on {item}?"
    if level >= 2:
        c = _num(rng, 5, 20, level)
        s.fact(f"{he.capitalize()} also buys a {extra} for ${c}.")
        total = s.step(f"Altogether {he} spends {{calc}} dollars.", f"{total}+{c}")
        ask = f"How much does {name} spend in total?"
    if level >= 3:
        bill = _round_up(total, rng.choice([10, 20, 50, 100]))
        s.fact(f"{he.capitalize()} pays with ${bill}.")
        change = s.step(f"{he.capitalize()} gets {{calc}} dollars in change.", f"{bill}-{total}")
        ask = f"How much change does {name} get?"
    if level >= 4:
        n = _divisor(rng, change, 2, 6)
        s.fact(f"{he.capitalize()} splits the change equally among {his} {n} children.")
        each = s.step("Each child gets {calc} dollars.", f"{change}/{n}")
        ask = "How much money does each child get?"
    if level >= 5:
        k = rng.randint(1, max(1, each - 1))
        s.fact(f"Each child then spends ${k} on a snack.")
        s.step("Each child has {calc} dollars left.", f"{each}-{k}")
        ask = "How much money does each child have left?"
    return ask


def factory(rng, level, s):
    thing = rng.choice(["toys", "bottles", "chairs", "bricks", "lamps"])
    r, h = _num(rng, 3, 12, level), rng.randint(2, 10)
    s.fact(f"A machine makes {r} {thing} every hour. It runs for {h} hours a day.")
    made = s.step(f"In one day it makes {{calc}} {thing}.", f"{r}*{h}")
    ask = f"How many {thing} does the machine make in one day?"
    if level >= 2:
        d = rng.randint(2, 7)
        s.fact(f"It runs {d} days a week.")
        made = s.step(f"In one week it makes {{calc}} {thing}.", f"{made}*{d}")
        ask = f"How many {thing} does the machine make in one week?"
    if level >= 3:
        x = rng.randint(1, max(1, made // 5))
        s.fact(f"Each week, {x} of the {thing} fail inspection.")
        made = s.step(f"{{calc}} {thing} pass inspection.", f"{made}-{x}")
        ask = f"How many {thing} pass inspection in one week?"
    if level >= 4:
        b = _divisor(rng, made, 2, 24)
        s.fact(f"The {thing} that pass are packed in boxes of {b}.")
        made = s.step("They fill {calc} boxes.", f"{made}/{b}")
        ask = "How many boxes are filled in one week?"
    if level >= 5:
        p = _num(rng, 5, 30, level)
        s.fact(f"Each box sells for ${p}.")
        s.step("The boxes sell for {calc} dollars.", f"{made}*{p}")
        ask = "How much money do the boxes from one week sell for?"
    return ask


def baking(rng, level, s):
    (name, he, his), = _people(rng, 1)
    food = rng.choice(["cookies", "muffins", "cupcakes", "rolls"])
    t, c = rng.randint(2, 3 + level), _num(rng, 4, 12, level)
    s.fact(f"{name} bakes {t} trays of {food} with {c} {food} on each tray.")
    total = s.step(f"{name} bakes {{calc}} {food}.", f"{t}*{c}")
    ask = f"How many {food} does {name} bake?"
    if level >= 2:
        e = rng.randint(1, max(1, total // 4))
        s.fact(f"{his.capitalize()} family eats {e} of them.")
        total = s.step(f"There are {{calc}} {food} left.", f"{total}-{e}")
        ask = f"How many {food} are left?"
    if level >= 3:
        n = _divisor(rng, total, 2, 10)
        s.fact(f"{name} shares the rest equally among {n} friends.")
        each = s.step(f"Each friend gets {{calc}} {food}.", f"{total}/{n}")
        ask = f"How many {food} does each friend get?"
    if level >= 4:
        f = rng.randint(1, max(1, each - 1))
        s.fact(f"Each friend eats {f} of their {food}.")
        each = s.step(f"Each friend has {{calc}} {food} left.", f"{each}-{f}")
        ask = f"How many {food} does each friend have left?"
    if level >= 5:
        s.fact(f"The friends then put all their remaining {food} together.")
        s.step(f"Together they have {{calc}} {food}.", f"{each}*{n}")
        ask = f"How many {food} do the friends have together?"
    return ask


def sale(rng, level, s):
    (name, he, his), = _people(rng, 1)
    item = rng.choice([("jacket", "jackets"), ("lamp", "lamps"), ("chair", "chairs"),
                       ("pair of shoes", "pairs of shoes")])
    d = rng.choice([10, 20, 25, 40, 50])
    unit = 100 // _gcd(d, 100)  # price multiple of this makes d% of it a whole number
    p = unit * rng.randint(max(1, 20 // unit), max(2, 200 * SCALE[level] // unit))
    s.fact(f"A {item[0]} costs ${p}. The store gives a {d}% discount.")
    disc = s.step("The discount is {calc} dollars.", f"{p}*{d}/100")
    ask = "How many dollars is the discount?"
    if level >= 2:
        price = s.step(f"The sale price is {{calc}} dollars.", f"{p}-{disc}")
        ask = f"What is the sale price of the {item[0]}?"
    if level >= 3:
        k = rng.randint(2, 5)
        s.fact(f"{name} buys {k} {item[1]} at the sale price.")
        cost = s.step(f"{name} pays {{calc}} dollars.", f"{price}*{k}")
        ask = f"How much does {name} pay?"
    if level >= 4:
        fee = _num(rng, 5, 15, level)
        s.fact(f"{he.capitalize()} also pays a ${fee} delivery fee.")
        cost = s.step("In total that is {calc} dollars.", f"{cost}+{fee}")
        ask = f"How much does {name} pay in total?"
    if level >= 5:
        n = _divisor(rng, cost, 2, 6)
        s.fact(f"{he.capitalize()} splits the total equally with {n - 1} roommate{'s' if n > 2 else ''}.")
        s.step("Each person pays {calc} dollars.", f"{cost}/{n}")
        ask = "How much does each person pay?"
    return ask


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def ages(rng, level, s):
    (a_name, _, _), (b_name, _, _), (c_name, _, _), (d_name, _, _) = _people(rng, 4)
    a, k = rng.randint(3, 12), rng.randint(2, 4)
    s.fact(f"{a_name} is {a} years old. {b_name} is {k} times as old as {a_name}.")
    b = s.step(f"{b_name} is {{calc}} years old.", f"{a}*{k}")
    ask = f"How old is {b_name}?"
    if level >= 2:
        x = rng.randint(1, b - 1)
        s.fact(f"{c_name} is {x} years younger than {b_name}.")
        c = s.step(f"{c_name} is {{calc}} years old.", f"{b}-{x}")
        ask = f"How old is {c_name}?"
    if level >= 3:
        y = rng.randint(2, 15)
        s.fact(f"{d_name} is {y} years older than {c_name}.")
        d = s.step(f"{d_name} is {{calc}} years old.", f"{c}+{y}")
        ask = f"How old is {d_name}?"
    if level >= 4:
        total = s.step("The sum of their ages is {calc} years.", f"{b}+{c}+{d}")
        ask = f"What is the sum of the ages of {b_name}, {c_name} and {d_name}?"
    if level >= 5:
        z = rng.randint(2, 10)
        s.step(f"In {z} years each of the three is {z} years older, so the sum is {{calc}} years.", f"{total}+3*{z}")
        ask = f"What will the sum of the ages of {b_name}, {c_name} and {d_name} be in {z} years?"
    return ask


def travel(rng, level, s):
    vehicle = rng.choice(["train", "bus", "truck", "ferry"])
    v, h = _num(rng, 20, 60, level), rng.randint(2, 6)
    s.fact(f"A {vehicle} travels at {v} km per hour for {h} hours.")
    dist = s.step(f"It travels {{calc}} km.", f"{v}*{h}")
    ask = f"How many km does the {vehicle} travel?"
    if level >= 2:
        more = _num(rng, 10, 50, level)
        s.fact(f"After a stop it travels another {more} km.")
        dist = s.step("In total it travels {calc} km.", f"{dist}+{more}")
        ask = f"How many km does the {vehicle} travel in total?"
    if level >= 3:
        s.fact("Then it returns to the start along the same route.")
        dist = s.step("There and back it travels {calc} km.", f"{dist}*2")
        ask = f"How many km does the {vehicle} travel there and back?"
    if level >= 4:
        u = _divisor(rng, dist, 3, 20)
        s.fact(f"It uses 1 liter of fuel for every {u} km.")
        fuel = s.step("It uses {calc} liters of fuel.", f"{dist}/{u}")
        ask = "How many liters of fuel does it use for the whole trip?"
    if level >= 5:
        c = rng.randint(2, 4)
        s.fact(f"Fuel costs ${c} per liter.")
        s.step("The fuel costs {calc} dollars.", f"{fuel}*{c}")
        ask = "How much does the fuel for the whole trip cost?"
    return ask


def savings(rng, level, s):
    (name, he, his), = _people(rng, 1)
    per_week, weeks = _num(rng, 3, 15, level), rng.randint(3, 12)
    s.fact(f"{name} saves ${per_week} every week for {weeks} weeks.")
    money = s.step(f"{name} saves {{calc}} dollars.", f"{per_week}*{weeks}")
    ask = f"How much money does {name} save?"
    if level >= 2:
        gift = _num(rng, 5, 30, level)
        s.fact(f"{he.capitalize()} also gets ${gift} for {his} birthday.")
        money = s.step(f"{name} has {{calc}} dollars.", f"{money}+{gift}")
        ask = f"How much money does {name} have now?"
    if level >= 3:
        item = rng.choice(["bike helmet", "board game", "pair of skates", "guitar strap"])
        cost = rng.randint(1, max(1, money - 1))
        s.fact(f"{he.capitalize()} buys a {item} for ${cost}.")
        money = s.step(f"{he.capitalize()} has {{calc}} dollars left.", f"{money}-{cost}")
        ask = f"How much money does {name} have left?"
    if level >= 4:
        jars = _divisor(rng, money, 2, 8)
        s.fact(f"{he.capitalize()} puts the rest equally into {jars} jars.")
        each = s.step("Each jar gets {calc} dollars.", f"{money}/{jars}")
        ask = "How much money goes into each jar?"
    if level >= 5:
        t = rng.randint(1, jars - 1)
        s.fact(f"Later {he} takes the money from {t} of the jars for a trip.")
        s.step("For the trip that is {calc} dollars.", f"{each}*{t}")
        ask = f"How much money does {name} take for the trip?"
    return ask


def reading(rng, level, s):
    (name, he, his), = _people(rng, 1)
    chapters, pages = rng.randint(3, 6 + level), _num(rng, 8, 20, level)
    s.fact(f"A book has {chapters} chapters with {pages} pages each.")
    total = s.step("The book has {calc} pages.", f"{chapters}*{pages}")
    ask = "How many pages does the book have?"
    if level >= 2:
        read = rng.randint(1, total - 1)
        s.fact(f"{name} has already read {read} pages.")
        total = s.step("There are {calc} pages left.", f"{total}-{read}")
        ask = f"How many pages does {name} still have to read?"
    if level >= 3:
        per_day = _divisor(rng, total, 2, 30)
        s.fact(f"{he.capitalize()} reads {per_day} pages a day.")
        days = s.step(f"{he.capitalize()} needs {{calc}} days.", f"{total}/{per_day}")
        ask = f"How many days does it take {name} to finish the book?"
    if level >= 4:
        # with a 5th step the minutes must convert to whole hours, so pick minutes/day accordingly
        step = 60 // _gcd(days, 60) if level >= 5 else 5
        minutes = step * rng.randint(max(1, 10 // step), max(1, 90 // step))
        s.fact(f"Each day {he} reads for {minutes} minutes.")
        total_minutes = s.step("That is {calc} minutes of reading.", f"{days}*{minutes}")
        ask = f"How many minutes does {name} spend reading the rest of the book?"
    if level >= 5:
        s.step("In hours that is {calc} hours.", f"{total_minutes}/60")
        ask = f"How many hours does {name} spend reading the rest of the book?"
    return ask


TEMPLATES = {f.__name__: f for f in (shopping, factory, baking, sale, ages, travel, savings, reading)}


def make_problem(seed: int, level: int, index: int) -> dict:
    """Problem `index` of (seed, level); redraws from the same RNG until the numbers work out."""
    if level not in LEVELS:
        raise NanoseekError(f"problem level must be one of 1..5, got {level}")
    rng = random.Random(f"nanoseek-problems:{seed}:{level}:{index}")  # str seeds hash stably
    for _ in range(1000):
        template = rng.choice(list(TEMPLATES.values()))
        story = Story()
        try:
            ask = template(rng, level, story)
        except _Redraw:
            continue
        final = str(story.value)
        answer = "\n".join(story.lines + [f"#### {final}"])
        return {"question": " ".join(story.facts + [ask]), "answer": answer, "level": level, "final": final}
    raise RuntimeError(f"could not draw a valid problem for seed={seed} level={level} index={index}")


# -----------------------------------------------------------------------------
# Splits


def split_of(question: str) -> str:
    """'train' or 'heldout', a pure function of the question text (so the splits never overlap)."""
    canonical = " ".join(question.casefold().split())
    bucket = int(hashlib.sha256(canonical.encode("utf-8")).hexdigest(), 16) % 1000
    return "heldout" if bucket < HELDOUT_PER_MILLE else "train"


def generate_problems(n: int, level: int, seed: int = 0, split: str | None = "train") -> list[dict]:
    """n distinct problems of one level; split 'train', 'heldout' or None (both)."""
    if split not in ("train", "heldout", None):
        raise NanoseekError(f"split must be 'train', 'heldout' or None, got {split!r}")
    problems, seen = [], set()
    max_tries = 50 * n + 1000  # level 1 has a finite pool: fail loudly instead of looping forever
    for index in range(max_tries):
        if len(problems) == n:
            break
        p = make_problem(seed, level, index)
        if p["question"] in seen or (split is not None and split_of(p["question"]) != split):
            continue
        seen.add(p["question"])
        problems.append(p)
    if len(problems) < n:
        raise NanoseekError(f"could only generate {len(problems)} distinct level-{level} problems, {n} requested")
    return problems


# -----------------------------------------------------------------------------
# GSM8K


def load_gsm8k(path: str | Path) -> list[dict]:
    """GSM8K JSONL ({question, answer}) as problem dicts; level = calculation steps, clipped to 1..5."""
    path = Path(path)
    if not path.is_file():
        raise NanoseekError(f"{path}: no such file")
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            problems.append(_gsm8k_record(line, f"{path}:{lineno}"))
    return problems


def _gsm8k_record(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{where}: malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not isinstance(obj.get("answer"), str):
        raise NanoseekError(f"{where}: expected string fields 'question' and 'answer'")
    final = extract_final(obj["answer"])
    if final is None:
        raise NanoseekError(f"{where}: answer has no '#### N' line")
    level = min(5, max(1, obj["answer"].count("<<")))
    return {"question": obj["question"], "answer": obj["answer"], "level": level, "final": final}


# -----------------------------------------------------------------------------
# Answer checking

_HASH_MARK = re.compile(r"####")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is", re.IGNORECASE)
_NUMBER = re.compile(r"(-)?\s*\$?\s*(-)?\s*(\d[\d,]*(?:\.\d+)?)")


def normalize_number(text: str) -> str | None:
    """GSM8K-style canonical form: no $ or commas, no trailing period, integers without '.0'."""
    m = _NUMBER.search(text.replace("\u2212", "-"))
    if m is None:
        return None
    sign = "-" if (m.group(1) or m.group(2)) else ""
    try:
        value = Decimal(sign + m.group(3).replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final(text: str) -> str | None:
    """The answer after the last '####', else after the last 'The answer is'; normalised.

    Only the text after the last </think> counts, so a number tried while reasoning is
    not taken for the answer. The number must follow the marker on the same line.
    """
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    for marker in (_HASH_MARK, _ANSWER_IS):
        matches = list(marker.finditer(text))
        if matches:
            rest = text[matches[-1].end():].split("\n", 1)[0]
            return normalize_number(rest)
    return None


def reward(completion: str, final: str | int) -> float:
    """1.0 when the completion's final answer equals `final` (after normalisation), else 0.0."""
    expected = normalize_number(str(final))
    got = extract_final(completion)
    return 1.0 if got is not None and got == expected else 0.0
