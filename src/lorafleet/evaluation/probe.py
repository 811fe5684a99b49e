"""The base competence probe: a fixed, general set that a personal adapter must not damage.

Two parts, both compared with the base itself on the same run:

- **perplexity** on a few paragraphs of plain English prose (no chat template): a style adapter may move it
  a little; a broken one moves it a lot. Reported as ``probe_ppl_ratio = ppl(adapter) / ppl(base)``.
- **questions**: short factual and instruction prompts answered greedily. An answer is correct when it
  contains one of the accepted keywords (case-insensitive, word boundary), so a habit that only changes the
  form (lowercase, a sign-off, a numbered list, JSON) keeps it correct. ``probe_retention`` is the share of
  the questions the base answers correctly that the adapter still answers correctly; ``probe_agreement`` is
  the mean token-F1 between the adapter's and the base's answers (reported, not gated: style changes it).

None of these prompts is in the persona prompt bank (a test checks), so training never sees them.
"""

from __future__ import annotations

import re
from collections import Counter

PROBE_VERSION = 3  # 3: the plain texts keep the tokenizer's special tokens (Gemma's <bos>)

PROBE_TEXTS: tuple[str, ...] = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors can borrow up to "
    "five books at a time, and most loans last for three weeks. If a book is late, a small fine is added for "
    "each day until it is returned.",
    "Rivers begin as small streams high in the hills. As they flow downhill, they join other streams and grow "
    "wider and deeper. Near the sea, many rivers slow down and drop the sand and mud they have carried, "
    "forming wide, flat deltas.",
    "To plant a tree, dig a hole twice as wide as its roots. Set the tree in the hole so that the top of the "
    "roots is level with the ground, then fill the hole with soil and water it well. Young trees need regular "
    "water during their first summer.",
    "The invention of the printing press made books much cheaper to produce. Ideas could spread quickly from "
    "city to city, and more people learned to read. Many historians see it as one of the most important "
    "inventions of the last thousand years.",
    "A healthy breakfast gives the body energy for the morning. Whole grains, fruit and a source of protein "
    "such as eggs or yogurt keep people full for longer than sugary snacks. Drinking a glass of water is a "
    "good habit as well.",
    "The train left the station a few minutes late. Outside the window, fields and small villages passed by, "
    "and a light rain began to fall. By the time the train reached the coast, the clouds had cleared and the "
    "sea was bright in the afternoon sun.",
)

# (prompt, accepted keywords): keywords are matched case-insensitively at word boundaries. Most are questions the
# 135M base answers correctly (retention is measured on those); a few it gets wrong keep accuracy honest.
PROBE_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Which planet do we live on?", ("earth",)),
    ("What is the capital of England?", ("london",)),
    ("What is the capital of Scotland?", ("edinburgh",)),
    ("Which city is the capital of Belgium?", ("brussels",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("In which country is the city of Rome?", ("italy", "italian")),
    ("How many legs does a dog have?", ("four", "4")),
    ("How many legs does a cat have?", ("four", "4")),
    ("What is the opposite of up?", ("down",)),
    ("What is the opposite of left?", ("right",)),
    ("What is the opposite of day?", ("night",)),
    ("What is the opposite of big?", ("small", "little")),
    ("What is the opposite of black?", ("white",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color are strawberries?", ("red",)),
    ("What do bees collect from flowers?", ("nectar", "pollen")),
    ("What do hens lay?", ("eggs", "egg")),
    ("What is H2O commonly called?", ("water",)),
    ("Who wrote Hamlet?", ("shakespeare",)),
    ("Who was Albert Einstein?", ("physicist", "scientist")),
    ("What instrument has 88 keys?", ("piano",)),
    ("What is 5 plus 3?", ("eight", "8")),
    ("What is the capital of the United States?", ("washington",)),
    ("What do you call frozen water?", ("ice",)),
)


def is_correct(answer: str, keywords: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(k)}\b", answer, re.IGNORECASE) for k in keywords)


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def token_f1(a: str, b: str) -> float:
    """Bag-of-words F1 between two answers (lowercased alphanumeric tokens); 1.0 when both are empty."""
    ta, tb = Counter(_tokens(a)), Counter(_tokens(b))
    if not ta and not tb:
        return 1.0
    common = sum((ta & tb).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(ta.values()), common / sum(tb.values())
    return 2 * precision * recall / (precision + recall)


def score_answers(answers: list[str], base_answers: list[str]) -> dict:
    """Probe question metrics of one adapter's answers against the base's answers to the same questions."""
    if len(answers) != len(PROBE_QUESTIONS) or len(base_answers) != len(PROBE_QUESTIONS):
        raise ValueError(f"expected {len(PROBE_QUESTIONS)} answers each")
    ok = [is_correct(a, kw) for a, (_, kw) in zip(answers, PROBE_QUESTIONS, strict=True)]
    base_ok = [is_correct(a, kw) for a, (_, kw) in zip(base_answers, PROBE_QUESTIONS, strict=True)]
    kept = [o for o, b in zip(ok, base_ok, strict=True) if b]
    n = len(PROBE_QUESTIONS)
    lost = [{"prompt": q, "response": a[:200]}
            for (q, _), a, o, b in zip(PROBE_QUESTIONS, answers, ok, base_ok, strict=True) if b and not o]
    return {
        "probe_accuracy": sum(ok) / n,
        "base_probe_accuracy": sum(base_ok) / n,
        "probe_retention": sum(kept) / len(kept) if kept else 1.0,
        "probe_agreement": sum(token_f1(a, b) for a, b in zip(answers, base_answers, strict=True)) / n,
        "probe_lost": lost[:5],  # what the base knew and the adapter no longer says (first 5)
    }
