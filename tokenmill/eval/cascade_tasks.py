"""Checkable tasks whose difficulty varies, for the difficulty cascade (`tokenmill cascade fit`,
benchmarks/cascade.py). Pure Python, no network: generated from a seed.

Each task is one short chat question with one exact answer (a word or an integer), in families a 135M-270M
chat model can partly solve, each at graded difficulty: capitals (well- and less-known countries), arithmetic
(one-digit sums to two-digit products), reading a fact among 0-8 distractor facts, the larger of two
numbers, the next day or letter. `grade()` accepts an answer whose first number (numeric tasks) or whose
first few words (word tasks) hold the expected answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

_CAPITALS_EASY = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
                  ("Spain", "Madrid"), ("England", "London"), ("Russia", "Moscow"), ("China", "Beijing"),
                  ("Egypt", "Cairo"), ("Greece", "Athens")]
_CAPITALS_HARD = [("Australia", "Canberra"), ("Canada", "Ottawa"), ("Turkey", "Ankara"), ("Brazil", "Brasilia"),
                  ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Portugal", "Lisbon"),
                  ("Vietnam", "Hanoi"), ("Chile", "Santiago"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
                  ("Sweden", "Stockholm"), ("Hungary", "Budapest"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"),
                  ("Pakistan", "Islamabad"), ("Switzerland", "Bern"), ("Mongolia", "Ulaanbaatar"),
                  ("Bolivia", "Sucre"), ("Kazakhstan", "Astana"), ("Myanmar", "Naypyidaw")]
_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Leo"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_SUFFIX = " Answer with only the answer, no explanation."
FEW_SHOT = ("Q: What is the capital of Ireland?" + _SUFFIX + "\nA: Dublin\n\n"
            "Q: What is 3 + 4?" + _SUFFIX + "\nA: 7\n\n"
            "Q: Mia's favorite color is gray. Tom's favorite color is gold. What is Tom's favorite color?" + _SUFFIX
            + "\nA: gold\n\n")


@dataclass(frozen=True)
class Task:
    id: str
    family: str
    level: int  # 0 = easiest
    question: str
    answer: str

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    @property
    def prompt(self) -> str:
        """The question as a few-shot completion prompt (base models answer these too); stop at a newline."""
        return FEW_SHOT + f"Q: {self.question}\nA:"

    def to_dict(self) -> dict:
        return asdict(self)


def _capital(rng: random.Random, level: int) -> tuple[str, str]:
    country, city = rng.choice(_CAPITALS_EASY if level == 0 else _CAPITALS_HARD)
    return f"What is the capital of {country}?{_SUFFIX}", city


def _arith(rng: random.Random, level: int) -> tuple[str, str]:
    if level == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"What is {a} + {b}?{_SUFFIX}", str(a + b)
    if level == 1:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?{_SUFFIX}", str(a + b)
    if level == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"What is {a} times {b}?{_SUFFIX}", str(a * b)
    a, b = rng.randint(11, 49), rng.randint(3, 9)
    return f"What is {a} times {b}?{_SUFFIX}", str(a * b)


def _reading(rng: random.Random, level: int) -> tuple[str, str]:
    n = [1, 3, 6, 9][level]
    names = rng.sample(_NAMES, n)
    colors = [rng.choice(_COLORS) for _ in names]
    facts = " ".join(f"{who}'s favorite color is {c}." for who, c in zip(names, colors, strict=True))
    k = rng.randrange(n)
    return f"{facts} What is {names[k]}'s favorite color?{_SUFFIX}", colors[k]


def _larger(rng: random.Random, level: int) -> tuple[str, str]:
    if level == 0:
        a, b = rng.sample(range(1, 10), 2)
    elif level == 1:
        a, b = rng.sample(range(10, 100), 2)
    else:
        a = rng.randint(100, 999)
        b = a + rng.choice([-1, 1]) * rng.randint(1, 9)
    return f"Which number is larger, {a} or {b}?{_SUFFIX}", str(max(a, b))


def _next(rng: random.Random, level: int) -> tuple[str, str]:
    if level == 0:
        i = rng.randrange(7)
        return f"What day comes after {_DAYS[i]}?{_SUFFIX}", _DAYS[(i + 1) % 7]
    if level == 1:
        i = rng.randrange(25)
        return (f"Which letter comes right after {chr(65 + i)} in the alphabet?{_SUFFIX}", chr(66 + i))
    i = rng.randrange(7)
    k = rng.randint(2, 4)
    return f"What day is it {k} days after {_DAYS[i]}?{_SUFFIX}", _DAYS[(i + k) % 7]


FAMILIES = {"capital": (_capital, 2), "arith": (_arith, 4), "reading": (_reading, 4), "larger": (_larger, 3),
            "next": (_next, 3)}


# The default mix holds the families where the large model (Gemma 3 270M) is the better one. Arithmetic and next
# day/letter: both models (SmolLM2-135M-Instruct, Gemma 3 270M) get almost none right. Capitals: the small model
# is better (it knows them; Gemma's base model answers 'Russia is a country...'), so escalating cannot help there.
DEFAULT_FAMILIES = ("reading", "larger")


def generate(n: int, seed: int = 0, families: tuple[str, ...] = DEFAULT_FAMILIES) -> list[Task]:
    """n tasks, the families and their levels in turn (so any prefix is balanced), reproducible from seed."""
    rng = random.Random(seed)
    cells = [(fam, lvl) for fam in families for lvl in range(FAMILIES[fam][1])]
    out = []
    for i in range(n):
        fam, lvl = cells[i % len(cells)]
        q, a = FAMILIES[fam][0](rng, lvl)
        out.append(Task(f"{seed}-{i}", fam, lvl, q, a))
    return out


def split(tasks: list[Task], parts: tuple[float, ...] = (0.5, 0.25, 0.25), seed: int = 0) -> list[list[Task]]:
    """Disjoint shuffled parts (e.g. train / calibration / evaluation) in the given proportions."""
    order = list(tasks)
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for i, p in enumerate(parts):
        end = len(order) if i == len(parts) - 1 else start + round(p * len(order))
        out.append(order[start:end])
        start = end
    return out


_WORD = re.compile(r"[a-z0-9]+")
_INT = re.compile(r"-?\d+")


def grade(answer: str, expected: str) -> bool:
    """Whether a model's answer is right, judged on its first non-empty line: the last integer there equals a
    numeric expected answer ('7 + 5 = 12'); else the expected word is among its first ten words (case and
    punctuation ignored)."""
    line = next((ln for ln in answer.splitlines() if ln.strip()), "")
    if expected.lstrip("-").isdigit():
        found = _INT.findall(line.replace(",", ""))
        return bool(found) and found[-1] == expected
    return _WORD.findall(expected.lower())[0] in _WORD.findall(line.lower())[:10]
