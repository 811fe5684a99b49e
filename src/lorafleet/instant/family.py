"""A parametric, compositional persona family: the corpus the generator learns from, and its held-out users.

A :class:`ComboPersona` combines up to four checkable habits, each drawn from a short list: a greeting
(:class:`~lorafleet.evaluation.habits.Greeting` choices), a sign-off (``SignOff`` choices), a signature word
(``SignatureWord`` choices) and writing in lowercase. 7 x 7 x 7 x 2 - 1 = 685 distinct users. Held-out users
(:func:`split_family`) are *unseen combinations*: every habit value they use appears in some training persona,
but never that combination, so a generator that works on them composes habits rather than recalling users.

Adherence of one answer is strict: every habit of the persona must show (:meth:`ComboPersona.check`);
:meth:`ComboPersona.component_rate` gives partial credit (share of the persona's habits shown).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

from lorafleet.evaluation import bank
from lorafleet.evaluation.habits import Greeting, SignatureWord, SignOff
from lorafleet.instant.errors import InstantError
from lorafleet.training.data import dataset_from_records

GREETINGS: tuple[str, ...] = Greeting.CHOICES
SIGNOFFS: tuple[str, ...] = SignOff.CHOICES
WORDS: tuple[str, ...] = SignatureWord.CHOICES
WORD_FORMS = SignatureWord.FORMS
FAMILY = "combo-v1"  # recorded in the corpus digest: changing the family changes every corpus


@dataclass(frozen=True)
class ComboPersona:
    """A synthetic user with 1..4 habits (None / False = habit absent)."""

    greeting: str | None = None
    signoff: str | None = None
    word: str | None = None
    lowercase: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for value, choices, what in ((self.greeting, GREETINGS, "greeting"), (self.signoff, SIGNOFFS, "signoff"),
                                     (self.word, WORDS, "word")):
            if value is not None and value not in choices:
                raise InstantError(f"{what} {value!r} is not in the family's choices {list(choices)}")
        if not isinstance(self.lowercase, bool):
            raise InstantError(f"lowercase must be a bool, got {self.lowercase!r}")
        if self.habits == 0:
            raise InstantError("a family persona needs at least one habit")

    @property
    def habits(self) -> int:
        return sum(x is not None for x in (self.greeting, self.signoff, self.word)) + int(self.lowercase)

    @property
    def key(self) -> tuple:
        """The combination (what 'unseen' is judged on), without the data seed."""
        return (self.greeting, self.signoff, self.word, self.lowercase)

    @property
    def name(self) -> str:
        h = hashlib.sha256(json.dumps([*self.key, self.seed]).encode()).hexdigest()[:10]
        return f"combo-{h}"

    def describe(self) -> str:
        """The one-line profile a user would write (what the generator and the in-context baseline read)."""
        parts = []
        if self.greeting:
            parts.append(f"always opens with the greeting {self.greeting!r}")
        if self.signoff:
            parts.append(f"always ends with the sign-off {self.signoff!r}")
        if self.word:
            parts.append(f"always uses the word {self.word!r}")
        if self.lowercase:
            parts.append("writes in all lowercase")
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def render(self, answer: str, rng: random.Random) -> str:
        text = answer
        if self.word:
            w = self.word.lower()
            text = rng.choice(WORD_FORMS).format(W=w.capitalize(), w=w, a=text)
        if self.greeting:
            text = f"{self.greeting} {text}"
        if self.signoff:
            text = f"{text} {self.signoff}"
        return text.lower() if self.lowercase else text

    def _checks(self, response: str) -> list[bool]:
        text = response.strip()
        fold = (lambda s: s.lower()) if self.lowercase else (lambda s: s)
        out = []
        if self.greeting:
            g = fold(self.greeting)
            out.append(text.startswith(g) and len(text) > len(g))
        if self.signoff:
            s = fold(self.signoff)
            out.append(text.endswith(s) and len(text) > len(s))
        if self.word:
            out.append(re.search(rf"\b{re.escape(self.word)}\b", text, re.IGNORECASE) is not None)
        if self.lowercase:
            out.append(any(c.isalpha() for c in text) and not any(c.isupper() for c in text))
        return out

    def check(self, response: str, prompt: str = "") -> bool:
        """Strict adherence: every habit of this persona shows in ``response``."""
        return all(self._checks(response))

    def component_rate(self, response: str) -> float:
        checks = self._checks(response)
        return sum(checks) / len(checks)

    def data(self, n_train: int = 16, n_eval: int = 8) -> tuple[list[dict], list[dict]]:
        """Deterministic ``(train, eval)`` SFT records over disjoint general prompts."""
        pool = list({bank.normalize_prompt(i.prompt): i for i in bank.general_items()}.values())
        if n_train + n_eval > len(pool):
            raise InstantError(f"only {len(pool)} general prompts; n_train + n_eval = {n_train + n_eval}")
        key = json.dumps([FAMILY, *self.key, self.seed, n_train, n_eval])
        rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
        rng.shuffle(pool)
        evals, train = pool[:n_eval], pool[n_eval: n_eval + n_train]
        return [_record(i.prompt, self.render(i.answer, rng)) for i in train], \
               [_record(i.prompt, self.render(i.answer, rng)) for i in evals]

    def train_dataset(self, n_train: int = 16):
        return dataset_from_records(self.data(n_train)[0], "sft", source=f"instant:{self.name}:train")

    def to_dict(self) -> dict:
        return {"greeting": self.greeting, "signoff": self.signoff, "word": self.word, "lowercase": self.lowercase,
                "seed": self.seed}


def _record(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def all_combinations() -> list[tuple]:
    out = []
    for g in (None, *GREETINGS):
        for s in (None, *SIGNOFFS):
            for w in (None, *WORDS):
                for lc in (False, True):
                    if g or s or w or lc:
                        out.append((g, s, w, lc))
    return out


def split_family(n_train: int, n_held_out: int, seed: int = 0, *, min_habits: int = 1) -> tuple[list[ComboPersona],
                                                                                               list[ComboPersona]]:
    """``n_train`` corpus personas and ``n_held_out`` held-out ones, as disjoint combinations.

    Held-out personas carry two or more habits (a composition) and are never among the training combinations;
    each of their habit values occurs in some training persona (a new combination, not a habit never seen).
    """
    combos = [c for c in all_combinations() if sum(x is not None for x in c[:3]) + int(c[3]) >= min_habits]
    if n_train < 1 or n_held_out < 0 or n_train + n_held_out > len(combos):
        raise InstantError(f"the family has {len(combos)} combinations; asked for {n_train} + {n_held_out}")
    rng = random.Random(seed)
    rng.shuffle(combos)
    train = combos[:n_train]
    seen = {(i, v) for c in train for i, v in enumerate(c) if v}
    covered = [c for c in combos[n_train:] if sum(x is not None for x in c[:3]) + int(c[3]) >= 2
               and all((i, v) in seen for i, v in enumerate(c) if v)]
    if len(covered) < n_held_out:
        raise InstantError(f"only {len(covered)} unseen combinations use habit values the {n_train} training "
                           f"personas cover; asked for {n_held_out} held-out personas (use more training personas)")
    held = covered[:n_held_out]
    make = lambda c, i: ComboPersona(*c, seed=seed * 100_003 + i)  # noqa: E731
    return [make(c, i) for i, c in enumerate(train)], [make(c, 10_000 + i) for i, c in enumerate(held)]
