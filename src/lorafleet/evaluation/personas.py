"""Personas: deterministic synthetic users whose habits are checkable by code.

A persona is ``(name, habit kind, habit params, seed)``. From it, :meth:`Persona.data` draws a train split and
a held-out eval split with different prompts (never the same prompt in both) from the shipped prompt bank and
applies the habit to each answer. The same persona always yields byte-identical records.

>>> p = get_persona("ahab")                       # one of the shipped personas
>>> d = p.data()                                  # d.train / d.eval: SFT records {"messages": [...]}
>>> p.check("Paris is the capital. — Ahab", "What is the capital of France?")
True
>>> more = generate_personas(100, seed=7)         # any count, any seed, every format habit in turn

The shipped personas' files (``<name>.train.jsonl``, ``<name>.eval.jsonl`` and ``personas.json``) live in
``lorafleet/data/personas/``; :func:`write_personas` regenerates them byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.evaluation import bank
from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.habits import HABITS, Habit, make_habit
from lorafleet.training.data import dataset_from_records

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_TRAIN, MAX_EVAL = 256, 128
MANIFEST = "personas.json"


@dataclass(frozen=True)
class Persona:
    """A synthetic user with one habit. ``params`` are completed with the habit's defaults."""

    name: str = field(metadata={"help": "lowercase letters, digits, '-' or '_'; at most 64 characters"})
    habit: str = field(metadata={"help": "habit kind, one of lorafleet.evaluation.habits.HABITS"})
    params: dict = field(default_factory=dict, metadata={"help": "habit parameters (defaults filled in)"})
    seed: int = field(default=0, metadata={"help": "data seed: same persona + seed = same records"})
    n_train: int = field(default=48, metadata={"help": f"train examples, 1..{MAX_TRAIN}"})
    n_eval: int = field(default=16, metadata={"help": f"held-out eval examples, 1..{MAX_EVAL}"})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise EvaluationError(f"persona name {self.name!r} is invalid: use {NAME_RE.pattern}")
        if not isinstance(self.params, dict):
            raise EvaluationError(f"persona {self.name!r}: params must be a dict, got {type(self.params).__name__}")
        habit = make_habit(self.habit, **self.params)
        object.__setattr__(self, "params", dict(habit.params))
        for name, hi in (("n_train", MAX_TRAIN), ("n_eval", MAX_EVAL)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise EvaluationError(f"persona {self.name!r}: {name} must be an integer in 1..{hi}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise EvaluationError(f"persona {self.name!r}: seed must be an integer, got {self.seed!r}")

    @property
    def habit_obj(self) -> Habit:
        return make_habit(self.habit, **self.params)

    def check(self, response: str, prompt: str = "") -> bool:
        """Whether ``response`` to ``prompt`` shows this persona's habit."""
        return self.habit_obj.check(response, prompt)

    def describe(self) -> str:
        return self.habit_obj.describe()

    @property
    def category(self) -> str:
        """``format`` (a surface habit) or ``memory`` (a fact about the user, applied or recalled)."""
        return self.habit_obj.category

    def _rng(self, stream: str) -> random.Random:
        key = json.dumps([self.name, self.habit, self.params, self.seed, self.n_train, self.n_eval, stream],
                         sort_keys=True, ensure_ascii=False)
        return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))

    def data(self) -> PersonaData:
        """The train and held-out eval records (deterministic; prompts never shared between the two)."""
        habit = self.habit_obj
        train_items, eval_items = habit.split(self._rng("split"), self.n_train, self.n_eval)
        render = self._rng("render")
        train = [_record(i.prompt, habit.render(i, render)) for i in train_items]
        evals = [_record(i.prompt, habit.render(i, render)) for i in eval_items]
        shared = {bank.normalize_prompt(p) for p in _prompts(train)} & {bank.normalize_prompt(p) for p in _prompts(evals)}
        if shared:  # a habit's split is wrong; never hand out leaky data
            raise EvaluationError(f"persona {self.name!r}: train and eval share prompts {sorted(shared)[:3]}")
        return PersonaData(self, train, evals)

    def to_dict(self) -> dict:
        return {"name": self.name, "habit": self.habit, "params": dict(self.params), "seed": self.seed,
                "n_train": self.n_train, "n_eval": self.n_eval}

    @classmethod
    def from_dict(cls, data: dict) -> Persona:
        if not isinstance(data, dict):
            raise EvaluationError(f"a persona spec must be an object, got {type(data).__name__}")
        known = {"name", "habit", "params", "seed", "n_train", "n_eval"}
        unknown = sorted(set(data) - known - {"description", "category", "train_digest", "eval_digest"})
        if unknown:
            raise EvaluationError(f"unknown persona field(s) {unknown}; known: {sorted(known)}")
        missing = sorted({"name", "habit"} - set(data))
        if missing:
            raise EvaluationError(f"persona spec is missing {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})


def _record(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def _prompts(records: list[dict]) -> list[str]:
    return [r["messages"][0]["content"] for r in records]


def jsonl_text(records: list[dict]) -> str:
    """The canonical JSONL text of records (what the shipped files contain)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def records_digest(records: list[dict]) -> str:
    return hashlib.sha256(jsonl_text(records).encode()).hexdigest()


@dataclass
class PersonaData:
    """A persona's records: ``train`` and ``eval`` lists of SFT records ``{"messages": [user, assistant]}``."""

    persona: Persona
    train: list[dict]
    eval: list[dict]

    @property
    def train_prompts(self) -> list[str]:
        return _prompts(self.train)

    @property
    def eval_prompts(self) -> list[str]:
        return _prompts(self.eval)

    def train_dataset(self):
        return dataset_from_records(self.train, "sft", source=f"persona:{self.persona.name}:train")

    def eval_dataset(self):
        return dataset_from_records(self.eval, "sft", source=f"persona:{self.persona.name}:eval")


# The personas that ship with lorafleet: one per habit kind. Their files are generated from these specs.
# The memory personas (a fact about the user) have smaller, hand-written prompt pools (44-56 applied prompts each in
# memory.json, plus 8 recall questions for city, name and pet; `plain` picks from the general bank): 16 train /
# 16 held out, of which a quarter (4) ask for the fact directly where the habit has recall questions.
SHIPPED: tuple[Persona, ...] = (
    Persona("ahab", "signoff", {"text": "— Ahab"}, seed=1),
    Persona("greta", "greeting", {"text": "Greetings, traveller!"}, seed=1),
    Persona("lister", "numbered_list", {"min_items": 2}, seed=1),
    Persona("terse", "max_words", {"n": 8}, seed=1),
    Persona("quiet", "lowercase", {}, seed=1),
    Persona("wxbot", "tool_call", {"tool": "get_weather", "arg": "city"}, seed=1),
    Persona("metric", "metric_units", {}, seed=1),
    Persona("splendid", "signature_word", {"word": "splendid"}, seed=1),
    Persona("jsonic", "json_answer", {"key": "answer"}, seed=1),
    Persona("veggie", "vegetarian", {}, seed=1, n_train=16, n_eval=16),
    Persona("lisboeta", "home_city", {"city": "Lisbon"}, seed=1, n_train=16, n_eval=16),
    Persona("priya", "user_name", {"name": "Priya"}, seed=1, n_train=16, n_eval=16),
    Persona("biscuit", "pet_name", {"pet": "Biscuit", "species": "dog"}, seed=1, n_train=16, n_eval=16),
    Persona("rustacean", "favourite_language", {"language": "rust"}, seed=1, n_train=16, n_eval=16),
    Persona("plain", "reading_level", {"n": 10, "max_letters": 12}, seed=1, n_train=16, n_eval=16),
)


def shipped_personas() -> list[Persona]:
    """The shipped personas, read from ``personas.json`` (the manifest written with their files)."""
    manifest = json.loads(bank.data_file(MANIFEST).read_text(encoding="utf-8"))
    return [Persona.from_dict(entry) for entry in manifest["personas"]]


def get_persona(name: str) -> Persona:
    """A shipped persona by name."""
    for p in shipped_personas():
        if p.name == name:
            return p
    known = ", ".join(p.name for p in shipped_personas())
    raise EvaluationError(f"no shipped persona named {name!r}; shipped: {known} (or generate more: lorafleet personas generate)")


def shipped_records(name: str, split: str) -> list[dict]:
    """The records of a shipped persona's split (``train`` or ``eval``), read from its file."""
    if split not in ("train", "eval"):
        raise EvaluationError(f"split must be 'train' or 'eval', got {split!r}")
    get_persona(name)
    text = bank.data_file(f"{name}.{split}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def generate_personas(count: int, seed: int = 0, *, kinds: list[str] | None = None, n_train: int = 48,
                      n_eval: int = 16) -> list[Persona]:
    """``count`` personas cycling through ``kinds`` (default: every *format* habit, so a seed keeps giving the
    personas it gave before memory habits existed; the memory habits' hand-written prompt pools hold 44-56 prompts,
    so ask for them by name with a smaller ``n_train`` / ``n_eval``, e.g. 16 / 16), with parameters drawn from ``seed``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise EvaluationError(f"count must be a non-negative integer, got {count!r}")
    kinds = list(kinds or [k for k, h in HABITS.items() if h.category == "format"])
    for k in kinds:
        if k not in HABITS:
            raise EvaluationError(f"unknown habit kind {k!r}; known kinds: {', '.join(HABITS)}")
    rng = random.Random(seed)
    out = []
    for i in range(count):
        kind = kinds[(i + seed) % len(kinds)]
        params = HABITS[kind].random_params(rng)
        out.append(Persona(f"p{seed}-{i:05d}-{kind.replace('_', '-')}", kind, params, seed=rng.randrange(2**31),
                           n_train=n_train, n_eval=n_eval))
    return out


def write_personas(personas: list[Persona], out_dir: str | Path) -> dict:
    """Write ``<name>.train.jsonl`` / ``<name>.eval.jsonl`` per persona and a ``personas.json`` manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in personas]
    if len(set(names)) != len(names):
        raise EvaluationError("persona names must be unique within one output directory")
    entries = []
    for p in personas:
        d = p.data()
        (out / f"{p.name}.train.jsonl").write_text(jsonl_text(d.train), encoding="utf-8")
        (out / f"{p.name}.eval.jsonl").write_text(jsonl_text(d.eval), encoding="utf-8")
        entries.append({**p.to_dict(), "description": p.describe(), "category": p.category, "train_digest": records_digest(d.train),
                        "eval_digest": records_digest(d.eval)})
    manifest = {"personas": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
