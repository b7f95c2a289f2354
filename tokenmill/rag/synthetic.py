"""A generated corpus for measuring retrieval: documents about invented companies, people and towns, each
holding facts found nowhere else (names made of random syllables, so no model knows them beforehand), and
questions with one exact short answer each. Deterministic for a seed; no network, no torch.

    docs = corpus(seed=0, documents=600)   # [Document], each ~250-350 words
    qs = questions(docs, per_document=1)   # [Question(text, answer, source)]
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYLLABLES = ["ka", "lo", "ven", "dra", "mi", "tor", "bel", "qua", "ris", "nu", "sel", "fen", "gar", "zo", "lin",
             "mar", "tes", "vo", "ush", "pel", "rin", "cor", "da", "shi", "ment", "bra", "ol", "quin", "tav", "ber"]
FIRST = ["Alma", "Bruno", "Cecile", "Darius", "Elke", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Katja", "Lior",
         "Mira", "Nils", "Odile", "Pavel", "Quinn", "Rosa", "Soren", "Tilde", "Umar", "Vera", "Wim", "Yara"]
INDUSTRIES = ["shipbuilding", "textile", "software", "glassware", "pharmaceutical", "bicycle", "chocolate",
              "telescope", "furniture", "clockmaking", "paper", "ceramics"]
PRODUCTS = ["lantern", "compass", "kettle", "loom", "sextant", "harp", "barometer", "sled", "carriage", "quill"]
FIELDS = ["botany", "astronomy", "geology", "linguistics", "chemistry", "oceanography", "mathematics", "zoology"]
DISCOVERIES = ["comet", "mineral", "orchid", "beetle", "dialect", "alloy", "theorem", "current"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FILLER = [
    "Visitors often remark on the quiet streets and the old stone buildings near the centre.",
    "Over the decades it has been described in several regional newspapers and guidebooks.",
    "Records from the early years are incomplete, and some accounts contradict one another.",
    "Local historians have collected letters, photographs and ledgers from that period.",
    "The surrounding countryside is known for its orchards, hedgerows and narrow lanes.",
    "Many of the original workshops were rebuilt after a fire in the following century.",
    "Its reputation grew slowly, mostly by word of mouth among merchants and travellers.",
    "An annual report summarises the events of each year for anyone who asks for it.",
    "Several smaller organisations nearby trace their origins to the same period.",
    "The archive is open to researchers on weekdays, by appointment only.",
    "A small museum displays tools, maps and documents from the early days.",
    "Critics have praised its steady growth, though some consider it old-fashioned.",
]


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str


@dataclass(frozen=True)
class Document:
    name: str  # file name
    title: str
    text: str
    facts: tuple[Fact, ...]


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    source: str  # the document holding the answer


class _Names:
    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def word(self, syllables: tuple[int, int] = (2, 3)) -> str:
        while True:
            w = "".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(*syllables))).capitalize()
            if w not in self.used:
                self.used.add(w)
                return w

    def person(self) -> str:
        return f"{self.rng.choice(FIRST)} {self.word()}"


def _company(rng: random.Random, names: _Names) -> tuple[str, list[str], list[Fact]]:
    name = f"{names.word()} {rng.choice(['Works', 'Company', 'Industries', 'Guild', 'Brothers'])}"
    year, founder, city = rng.randint(1780, 1990), names.person(), names.word()
    staff, product = rng.randint(40, 9000), f"{names.word()} {rng.choice(PRODUCTS)}"
    industry = rng.choice(INDUSTRIES)
    facts = [f"{name} is a {industry} company founded in {year} by {founder}.",
             f"Its headquarters are in the city of {city}.",
             f"Today it employs {staff} people.",
             f"Its best-known product is the {product}."]
    qs = [Fact(f"Who founded {name}?", founder), Fact(f"In which city are the headquarters of {name}?", city),
          Fact(f"In what year was {name} founded?", str(year)), Fact(f"How many people does {name} employ?", str(staff)),
          Fact(f"What is the best-known product of {name}?", product)]
    return name, facts, qs


def _person(rng: random.Random, names: _Names) -> tuple[str, list[str], list[Fact]]:
    name = names.person()
    field, city, year = rng.choice(FIELDS), names.word(), rng.randint(1750, 1980)
    found = f"{names.word()} {rng.choice(DISCOVERIES)}"
    mentor = names.person()
    facts = [f"{name} was a researcher in {field}, born in {city} in {year}.",
             f"{name.split()[0]} studied under {mentor} for several years.",
             f"The discovery for which {name} is remembered is the {found}."]
    qs = [Fact(f"Where was {name} born?", city), Fact(f"In what year was {name} born?", str(year)),
          Fact(f"Under whom did {name} study?", mentor), Fact(f"What did {name} discover?", found)]
    return name, facts, qs


def _town(rng: random.Random, names: _Names) -> tuple[str, list[str], list[Fact]]:
    name, river, mayor = names.word(), names.word(), names.person()
    people, month = rng.randint(800, 250000), rng.choice(MONTHS)
    festival = f"{names.word()} Festival"
    facts = [f"{name} is a town on the {river} river with a population of {people}.",
             f"The current mayor of {name} is {mayor}.",
             f"Every year in {month} the town holds the {festival}."]
    qs = [Fact(f"On which river is the town of {name}?", river), Fact(f"Who is the mayor of {name}?", mayor),
          Fact(f"What is the population of {name}?", str(people)),
          Fact(f"In which month does {name} hold the {festival}?", month)]
    return name, facts, qs


def corpus(seed: int = 0, documents: int = 600, filler: tuple[int, int] = (6, 10)) -> list[Document]:
    rng = random.Random(seed)
    names = _Names(rng)
    docs = []
    for i in range(documents):
        title, facts, qs = (_company, _person, _town)[i % 3](rng, names)
        body = [*facts, *rng.sample(FILLER, rng.randint(*filler))]
        rng.shuffle(body)
        # One paragraph per three sentences, as prose comes.
        paras = [" ".join(body[j:j + 3]) for j in range(0, len(body), 3)]
        text = f"# {title}\n\n" + "\n\n".join(paras) + "\n"
        docs.append(Document(f"doc{i:05d}.md", title, text, tuple(qs)))
    return docs


def questions(docs: list[Document], per_document: int = 1, seed: int = 0) -> list[Question]:
    rng = random.Random(seed + 1)
    out = []
    for d in docs:
        for f in rng.sample(d.facts, min(per_document, len(d.facts))):
            out.append(Question(f.question, f.answer, d.name))
    return out


def normalize(text: str) -> str:
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in text).split())


def answered(reply: str, answer: str) -> bool:
    """Exact match, for a chat model's sentence: the answer's words appear in the reply as a whole run."""
    return f" {normalize(answer)} " in f" {normalize(reply)} "
