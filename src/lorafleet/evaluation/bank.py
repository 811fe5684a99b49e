"""The content that personas are made of, shipped as data under ``lorafleet/data/personas/``.

- ``bank.jsonl``: a few hundred general prompts with short, correct answers (1-2 sentences).
- ``measures.jsonl``: unit-neutral questions about sizes, distances, weights and temperatures, answered in
  metric units.
- ``memory.json``: prompt templates and answers for the memory habits (a vegetarian's dinners, a home city's
  outings, the user's name and pet, code in a favourite language), with ``{placeholders}`` for the fact.
- ``templates.json``: request templates for the tool habit (weather questions x cities) and imperial-unit
  prompts whose metric answers are computed here (exact conversion factors, so the answers are correct).
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources

DATA_PATH = ("data", "personas")  # inside the lorafleet package


@dataclass(frozen=True)
class Item:
    """One prompt with its plain (habit-free) answer. ``args`` carries a tool request's arguments."""

    id: str
    topic: str
    prompt: str
    answer: str
    args: dict = field(default_factory=dict)


def data_file(name: str):
    """A ``Traversable`` for one shipped data file (works from a wheel or a source checkout)."""
    node = resources.files("lorafleet")
    for part in (*DATA_PATH, name):
        node = node.joinpath(part)
    return node


def _read_jsonl(name: str) -> list[dict]:
    text = data_file(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@functools.cache
def general_items() -> tuple[Item, ...]:
    """The general prompt bank (``bank.jsonl``)."""
    return tuple(Item(r["id"], r["topic"], r["prompt"], r["answer"]) for r in _read_jsonl("bank.jsonl"))


@functools.cache
def measure_items() -> tuple[Item, ...]:
    """Hand-written measurement questions with metric answers (``measures.jsonl``)."""
    return tuple(Item(r["id"], r["topic"], r["prompt"], r["answer"]) for r in _read_jsonl("measures.jsonl"))


@functools.cache
def templates() -> dict:
    return json.loads(data_file("templates.json").read_text(encoding="utf-8"))


@functools.cache
def _memory() -> str:
    return data_file("memory.json").read_text(encoding="utf-8")


def memory(section: str) -> dict:
    """One section of ``memory.json`` (a fresh copy: callers may not mutate the cache)."""
    return json.loads(_memory())[section]


def weather_templates() -> list[str]:
    return list(templates()["weather"]["templates"])


def weather_cities() -> list[str]:
    return list(templates()["weather"]["cities"])


def weather_item(template: str, city: str) -> Item:
    """A weather request; its plain answer is empty (the tool habit answers with a call)."""
    return Item(id=f"weather-{city}-{weather_templates().index(template)}", topic="weather",
                prompt=template.format(city=city), answer="", args={"city": city})


@functools.cache
def _template_regexes() -> tuple[re.Pattern, ...]:
    out = []
    for t in weather_templates():
        head, _, tail = t.partition("{city}")
        out.append(re.compile(rf"^\s*{re.escape(head)}(?P<city>.+?){re.escape(tail)}\s*$", re.IGNORECASE))
    return tuple(out)


def match_weather_request(prompt: str) -> str | None:
    """The city of a prompt made from one of the weather templates, else None."""
    for rx in _template_regexes():
        m = rx.match(prompt)
        if m:
            return m.group("city").strip()
    return None


def _fmt(x: float) -> str:
    """Round the way a person would: one decimal below 100, whole numbers above, thousands separated."""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    text = f"{x:.1f}"
    return text[:-2] if text.endswith(".0") else text


def conversion_items(rng: random.Random, count: int) -> list[Item]:
    """``count`` distinct imperial-unit prompts with correct metric answers, drawn with ``rng``."""
    convs = templates()["conversions"]
    kinds = sorted(convs)
    out: dict[str, Item] = {}
    budget = count * 50
    while len(out) < count and budget > 0:
        budget -= 1
        kind = kinds[rng.randrange(len(kinds))]
        c = convs[kind]
        v = rng.randint(c["min"], c["max"])
        prompt = c["prompts"][rng.randrange(len(c["prompts"]))].format(v=v)
        if prompt.lower() in out:
            continue
        x = (v + c["offset"]) * c["factor"]
        answer = c["answers"][rng.randrange(len(c["answers"]))].format(x=_fmt(x))
        out[prompt.lower()] = Item(id=f"convert-{kind}-{v}", topic="convert", prompt=prompt, answer=answer)
    return list(out.values())


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def sentences(text: str) -> list[str]:
    """Split an answer into sentences (the bank's answers are plain: no abbreviations with periods)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def normalize_prompt(prompt: str) -> str:
    """The key that decides whether two prompts are "the same" (train/eval must never share one)."""
    return " ".join(prompt.lower().split())
