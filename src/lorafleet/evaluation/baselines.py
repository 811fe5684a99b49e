"""The baselines a personal adapter must beat: the same user put in the prompt instead of in weights.

On the same held-out prompts, five conditions (:data:`CONDITIONS`):

- ``base``: the held-out prompt alone, on the base;
- ``in_context``: the base with an *in-context profile*: a system prompt written from the user's description
  (:func:`profile_system_prompt`) plus the first ``k`` of the user's own training examples as earlier turns;
- ``retrieval``: the base with the ``k`` training examples most similar to the held-out prompt (BM25 over the
  examples' user turns, ``rank_bm25``) as earlier turns, and no description: what the user's history alone
  carries when a retriever picks it;
- ``adapter``: the held-out prompt alone, on the adapter;
- ``adapter_in_context``: the adapter with the in-context profile (do weights and prompt compose?).

:func:`condition_prompts` builds every row's chat messages; :func:`prompt_tokens` counts what each costs
(the chat template applied, as the engine tokenizes it); :func:`evaluate_conditions` generates (greedy, through
:mod:`lorafleet.evaluation.generation`) and scores every condition with the persona's checker. Torch-free
except for that last function's generation.

>>> from lorafleet.evaluation.personas import get_persona
>>> p = get_persona("veggie"); d = p.data()
>>> rows = condition_prompts("in_context", d.eval_prompts, d.train, description=p.describe(), k=4)
>>> rows[0][0]["role"], len(rows[0])           # system profile, 4 example turns (user + assistant), the prompt
('system', 10)
"""

from __future__ import annotations

import re
from collections.abc import Callable

from lorafleet.evaluation.errors import EvaluationError
from lorafleet.serving.chat import chat_prompt_ids

CONDITIONS = ("base", "in_context", "retrieval", "adapter", "adapter_in_context")
USES_ADAPTER = {"base": False, "in_context": False, "retrieval": False, "adapter": True, "adapter_in_context": True}
DEFAULT_K = 4
MAX_K = 32


def profile_system_prompt(description: str) -> str:
    """The system prompt of the in-context profile, from a persona's (or user's) one-line description."""
    if not isinstance(description, str) or not description.strip():
        raise EvaluationError("the in-context profile needs a non-empty user description")
    return ("You are a personal assistant for one user. What you know about this user: they "
            f"{description.strip()}. Follow this in every answer without being reminded, "
            "as in the earlier examples.")


def _check_examples(examples: list[dict], k: int) -> list[tuple[str, str]]:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise EvaluationError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    if not examples:
        raise EvaluationError("the user has no training examples to put in context")
    if k > len(examples):
        raise EvaluationError(f"k={k} is larger than the user's {len(examples)} training example(s); lower k")
    pairs = []
    for i, r in enumerate(examples):
        msgs = r.get("messages") if isinstance(r, dict) else None
        users = [m["content"] for m in msgs or [] if m.get("role") == "user"]
        answers = [m["content"] for m in msgs or [] if m.get("role") == "assistant"]
        if not users or not answers:
            raise EvaluationError(f"training example {i} has no user and assistant turn to show in context")
        pairs.append((users[-1], answers[-1]))
    return pairs


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for user, answer in pairs:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return out


_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize_for_bm25(text: str) -> list[str]:
    """Lowercased alphanumeric words (what BM25 matches on)."""
    return _TOKEN.findall(text.lower())


class Retriever:
    """BM25 (Okapi, ``rank_bm25``) over the user turns of a user's training examples."""

    def __init__(self, examples: list[dict], k: int = DEFAULT_K) -> None:
        from rank_bm25 import BM25Okapi  # noqa: PLC0415 - a small pure-Python dependency, imported when used

        self.pairs = _check_examples(examples, k)
        self.k = k
        corpus = [tokenize_for_bm25(u) or ["_"] for u, _ in self.pairs]
        self.bm25 = BM25Okapi(corpus)

    def top(self, prompt: str, k: int | None = None) -> list[int]:
        """Indices of the ``k`` examples most similar to ``prompt``, best first (ties: earlier example first)."""
        k = self.k if k is None else k
        scores = self.bm25.get_scores(tokenize_for_bm25(prompt))
        return sorted(range(len(self.pairs)), key=lambda i: (-scores[i], i))[:k]

    def messages(self, prompt: str, k: int | None = None) -> list[dict]:
        # best match last: nearest to the question, where a small model attends most
        picked = list(reversed(self.top(prompt, k)))
        return _turns([self.pairs[i] for i in picked]) + [{"role": "user", "content": prompt}]


def in_context_messages(prompt: str, examples: list[dict], *, description: str, k: int = DEFAULT_K) -> list[dict]:
    """System profile + the first ``k`` training examples as earlier turns + the held-out prompt."""
    pairs = _check_examples(examples, k)[:k]
    return [{"role": "system", "content": profile_system_prompt(description)}, *_turns(pairs),
            {"role": "user", "content": prompt}]


def condition_prompts(condition: str, prompts: list[str], examples: list[dict], *, description: str | None = None,
                      k: int = DEFAULT_K) -> list[list[dict]]:
    """Chat messages for each held-out prompt under ``condition`` (one of :data:`CONDITIONS`)."""
    if condition not in CONDITIONS:
        raise EvaluationError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
    if condition in ("base", "adapter"):
        return [[{"role": "user", "content": p}] for p in prompts]
    if condition == "retrieval":
        retriever = Retriever(examples, k)
        return [retriever.messages(p) for p in prompts]
    if description is None:
        raise EvaluationError(f"condition {condition!r} needs the user's description (the in-context profile)")
    return [in_context_messages(p, examples, description=description, k=k) for p in prompts]


def prompt_tokens(tokenizer, messages: list[dict]) -> int:
    """Prompt tokens of one request: the chat template applied with the generation prompt, as served."""
    return len(chat_prompt_ids(tokenizer, messages))


def evaluate_conditions(base, persona, examples: list[dict], eval_records: list[dict], *, adapter=None,
                        conditions: tuple[str, ...] = CONDITIONS, k: int = DEFAULT_K, max_new_tokens: int = 48,
                        batch_size: int = 16, on_batch: Callable[[int], None] | None = None,
                        backend=None) -> dict[str, dict]:
    """Held-out adherence and prompt tokens per condition for one user.

    ``persona``: its checker scores the responses and its description is the profile; ``examples``: the user's
    training records; ``eval_records``: held-out SFT records (their last user turn is the prompt); ``adapter``:
    the user's trained adapter (needed for the adapter conditions); ``backend``: the generation backend (None: the
    in-process default; see :func:`lorafleet.evaluation.generation.generate_responses`). Returns ``{condition: {"adherence",
    "prompt_tokens" (mean per request), "passed", "count", "responses"}}``.
    """
    from lorafleet.evaluation.generation import generate_responses  # noqa: PLC0415 - torch on demand

    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise EvaluationError(f"unknown condition(s) {unknown}; known: {', '.join(CONDITIONS)}")
    if adapter is None and any(USES_ADAPTER[c] for c in conditions):
        raise EvaluationError("the adapter conditions need the user's adapter")
    prompts = [next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user") for r in eval_records]
    if not prompts:
        raise EvaluationError("no held-out prompts to evaluate")
    rows, owners = [], []
    for c in conditions:
        msgs = condition_prompts(c, prompts, examples, description=persona.describe(), k=k)
        rows += msgs
        owners += [c] * len(msgs)
    adapters = [adapter if USES_ADAPTER[c] else None for c in owners]
    responses = generate_responses(base, rows, adapters, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   on_batch=on_batch, backend=backend)
    out = {}
    for c in conditions:
        idx = [i for i, o in enumerate(owners) if o == c]
        passed = [persona.check(responses[i], prompts[j]) for j, i in enumerate(idx)]
        tokens = [prompt_tokens(base.tokenizer, rows[i]) for i in idx]
        out[c] = {"adherence": sum(passed) / len(passed), "passed": sum(passed), "count": len(passed),
                  "prompt_tokens": sum(tokens) / len(tokens), "responses": [responses[i] for i in idx]}
    return out
