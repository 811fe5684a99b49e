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
:mod:`lorafleet.evaluation.generation`) and scores every condition with the persona's checker.

:func:`compare_conditions` is the full report every evaluation shows (``lorafleet eval``, the gate's reason, the
continual loop, the dashboard, the demo, ``benchmarks/personal_vs_prompt.py``): per condition adherence, held-out
loss, the competence probe, prompt tokens per request and the serving cost of that prompt length on the engine
(tok/s, time to first token), for many users in shared batches. :class:`BaselineConfig` picks the conditions and
``k``; :class:`Profile` is what the prompt knows about a user (description + their own training examples).
Importing this module is torch-free; the measuring functions import torch when called.

>>> from lorafleet.evaluation.personas import get_persona
>>> p = get_persona("veggie"); d = p.data()
>>> rows = condition_prompts("in_context", d.eval_prompts, d.train, description=p.describe(), k=4)
>>> rows[0][0]["role"], len(rows[0])           # system profile, 4 example turns (user + assistant), the prompt
('system', 10)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

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


# --------------------------------------------------------------------------- the baseline report of an evaluation

DEFAULT_BASELINES = ("base", "in_context", "adapter")  # base and adapter rows reuse the evaluation's own numbers
PROMPT_CONDITIONS = tuple(c for c in CONDITIONS if c not in ("base", "adapter"))


def parse_conditions(text: str | None) -> tuple[str, ...]:
    """``"all"``, ``"none"``, ``"default"`` (:data:`DEFAULT_BASELINES`) or a comma list of :data:`CONDITIONS`."""
    if text is None or text.strip() in ("", "default"):
        return DEFAULT_BASELINES
    text = text.strip()
    if text == "all":
        return CONDITIONS
    if text == "none":
        return ()
    names = [t.strip().replace("-", "_") for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise EvaluationError(f"unknown baseline(s) {unknown}; choose from {', '.join(CONDITIONS)}, 'all' or 'none'")
    return tuple(c for c in CONDITIONS if c in names)  # canonical order, no duplicates


@dataclass(frozen=True)
class BaselineConfig:
    """Which conditions an evaluation measures next to the adapter, and how."""

    conditions: tuple[str, ...] = field(default=DEFAULT_BASELINES, metadata={"help": "subset of CONDITIONS"})
    k: int = field(default=DEFAULT_K, metadata={"help": f"examples in context (in-context, retrieval), 1..{MAX_K}"})
    probe: bool = field(default=True, metadata={"help": "run the competence probe under each prompt condition"})
    probe_conditions: tuple[str, ...] | None = field(default=None, metadata={
        "help": "the conditions the probe runs under (None: every measured one)"})
    serving: bool = field(default=True, metadata={"help": "measure each condition's tok/s and TTFT on the engine"})
    serve_tokens: int = field(default=8, metadata={"help": "new tokens per request in the serving measurement"})
    fit_k: bool = field(default=False, metadata={
        "help": "lower k (recorded) until the prompts fit the base's positions, instead of refusing"})

    def __post_init__(self) -> None:
        conditions = tuple(self.conditions)
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown:
            raise EvaluationError(f"unknown baseline condition(s) {unknown}; known: {', '.join(CONDITIONS)}")
        object.__setattr__(self, "conditions", tuple(c for c in CONDITIONS if c in conditions))
        if self.probe_conditions is not None:
            bad = [c for c in self.probe_conditions if c not in CONDITIONS]
            if bad:
                raise EvaluationError(f"unknown probe condition(s) {bad}; known: {', '.join(CONDITIONS)}")
            object.__setattr__(self, "probe_conditions", tuple(self.probe_conditions))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise EvaluationError(f"k must be an integer in 1..{MAX_K}, got {self.k!r}")
        if isinstance(self.serve_tokens, bool) or not isinstance(self.serve_tokens, int) or not 1 <= self.serve_tokens <= 256:
            raise EvaluationError(f"serve_tokens must be an integer in 1..256, got {self.serve_tokens!r}")

    @property
    def needs_profile(self) -> bool:
        return any(c in PROMPT_CONDITIONS for c in self.conditions)

    def to_dict(self) -> dict:
        return {"conditions": list(self.conditions), "k": self.k, "probe": self.probe, "serving": self.serving,
                "serve_tokens": self.serve_tokens, "fit_k": self.fit_k,
                "probe_conditions": None if self.probe_conditions is None else list(self.probe_conditions)}


@dataclass(frozen=True)
class Profile:
    """What the prompt baselines know about a user: a one-line description and their own training examples.

    Validated on construction (an empty description or no usable examples is an :class:`EvaluationError`)."""

    description: str
    examples: tuple = ()

    def __post_init__(self) -> None:
        if not isinstance(self.description, str) or not self.description.strip():
            raise EvaluationError("the user's profile is empty: the in-context baseline needs a non-empty description")
        examples = tuple(self.examples)
        if not examples:
            raise EvaluationError("the user's profile has no training examples to put in context")
        _check_examples(list(examples), 1)
        object.__setattr__(self, "examples", examples)

    @classmethod
    def from_persona(cls, persona) -> Profile:
        """A persona's description and its training split (what its adapter was trained on)."""
        return cls(persona.describe(), tuple(persona.data().train))

    def check_k(self, k: int) -> None:
        _check_examples(list(self.examples), k)


def _last_answer_only(labels: list[int], ignore: int) -> list[int]:
    """Labels with every assistant turn but the last masked (the in-context examples are not scored)."""
    end = max((i for i, x in enumerate(labels) if x != ignore), default=-1)
    start = end
    while start > 0 and labels[start - 1] != ignore:
        start -= 1
    return [ignore] * start + labels[start:] if end >= 0 else labels


def _max_positions(base) -> int:
    return int(getattr(base.model.config, "max_position_embeddings", 2048) or 2048)


def compare_conditions(base, items: list[dict], config: BaselineConfig = BaselineConfig(), *, max_new_tokens: int = 48,
                       probe_max_new_tokens: int = 24, batch_size: int = 16, backend=None,
                       on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """The baseline report of each user in ``items``, measured together (shared generation batches, one serving run
    per condition). Each item is a dict:

    - ``eval_set``: the held-out :class:`~lorafleet.evaluation.metrics.EvalSet` (its persona's checker scores);
    - ``profile``: a :class:`Profile` (needed for the prompt conditions);
    - ``adapter``: the user's adapter (a ``LoraAdapter`` or ``AdapterStack``; needed for the adapter conditions);
    - ``metrics`` (optional): the evaluation's own metrics of that adapter; the ``base`` and ``adapter`` rows reuse
      their adherence, loss and probe numbers instead of measuring them again;
    - ``conditions`` (optional): a subset of ``config.conditions`` for this item.

    Returns one report per item: ``{"k", "conditions", "rows": {condition: {"adherence", "passed", "count",
    "eval_loss", "probe_accuracy", "probe_retention", "prompt_tokens", "tok_s", "ttft_ms"}}, "serving": {...},
    "token_ratio"}`` (``token_ratio``: in-context prompt tokens per request / the adapter's). Bad input (no profile,
    k larger than the user's examples, a prompt longer than the base holds) raises before anything is generated.
    """
    # reasons for the imports below: torch is only needed when a report is measured
    from lorafleet.evaluation import probe  # noqa: PLC0415 - torch-free, but keeps this module's import light
    from lorafleet.evaluation.generation import generate_responses  # noqa: PLC0415 - torch on demand
    from lorafleet.evaluation.metrics import _mean_nll  # noqa: PLC0415 - torch on demand
    from lorafleet.training.data import IGNORE, tokenize_sft  # noqa: PLC0415 - torch on demand

    limit = _max_positions(base)
    plans = []
    for n, item in enumerate(items):
        es = item["eval_set"]
        conds = tuple(item.get("conditions") or config.conditions)
        bad = [c for c in conds if c not in CONDITIONS]
        if bad or not conds:
            raise EvaluationError(f"unknown or no condition(s) {bad or list(conds)}; known: {', '.join(CONDITIONS)}")
        profile = item.get("profile")
        if any(c in PROMPT_CONDITIONS for c in conds):
            if not isinstance(profile, Profile):
                raise EvaluationError(f"user {n}: the prompt baselines need the user's profile (description + examples)")
            profile.check_k(config.k)
        if item.get("adapter") is None and any(USES_ADAPTER[c] for c in conds):
            raise EvaluationError(f"user {n}: the adapter conditions need the user's adapter")
        prompts = es.user_prompts
        if not prompts:
            raise EvaluationError(f"user {n}: no held-out prompts to evaluate")
        answers = [next(m["content"] for m in reversed(r["messages"]) if m["role"] == "assistant") for r in es.records]
        examples = list(profile.examples) if profile else []
        desc = profile.description if profile else None
        k = config.k
        while True:
            msgs = {c: condition_prompts(c, prompts, examples, description=desc, k=k) for c in conds}
            tokens = {c: [prompt_tokens(base.tokenizer, m) for m in msgs[c]] for c in conds}
            worst = max(conds, key=lambda c: max(tokens[c]))
            longest = max(tokens[worst]) + max_new_tokens
            if longest <= limit:
                break
            if not config.fit_k or k == 1:
                raise EvaluationError(f"user {n}: condition {worst!r} needs {longest} positions (prompt + "
                                      f"{max_new_tokens} new tokens) but the base holds {limit}; lower k (now {k})")
            k -= 1
        plans.append({"k": k, "conds": conds, "prompts": prompts, "answers": answers, "msgs": msgs, "tokens": tokens,
                      "examples": examples, "desc": desc, "adapter": item.get("adapter"),
                      "metrics": item.get("metrics") or {}, "persona": es.persona})

    def reused(plan, c) -> bool:
        return c in ("base", "adapter") and plan["metrics"].get("eval_digest") is not None

    # -- generation: every row of every user that is not reused, in shared batches
    rows, adapters, owners = [], [], []
    for n, plan in enumerate(plans):
        for c in plan["conds"]:
            if reused(plan, c) or plan["persona"] is None:
                continue
            rows += plan["msgs"][c]
            adapters += [plan["adapter"] if USES_ADAPTER[c] else None] * len(plan["msgs"][c])
            owners += [(n, c, "eval", i) for i in range(len(plan["msgs"][c]))]
    questions = [q for q, _ in probe.PROBE_QUESTIONS]
    p_rows, p_adapters, p_owners = [], [], []
    if config.probe:
        for n, plan in enumerate(plans):
            for c in plan["conds"]:
                if c in ("base", "adapter") and plan["metrics"].get("probe_accuracy") is not None:
                    continue
                if c == "base" or (config.probe_conditions is not None and c not in config.probe_conditions):
                    continue  # the base's plain answers are measured once, below
                qmsgs = condition_prompts(c, questions, plan["examples"], description=plan["desc"], k=plan["k"])
                p_rows += qmsgs
                p_adapters += [plan["adapter"] if USES_ADAPTER[c] else None] * len(qmsgs)
                p_owners += [(n, c, "probe", i) for i in range(len(qmsgs))]
        if p_rows or any("base" in p["conds"] and p["metrics"].get("probe_accuracy") is None for p in plans):
            # the base's own answers: what retention is measured against (and the base row's probe)
            p_rows += [[{"role": "user", "content": q}] for q in questions]
            p_adapters += [None] * len(questions)
            p_owners += [(-1, "base", "probe", i) for i in range(len(questions))]
    got: dict[tuple, list] = {}
    for r, a, o, new_tokens in ((rows, adapters, owners, max_new_tokens),
                                (p_rows, p_adapters, p_owners, probe_max_new_tokens)):
        if not r:
            continue
        outs = generate_responses(base, r, a, max_new_tokens=new_tokens, batch_size=batch_size, on_batch=on_batch,
                                  backend=backend)
        for (n, c, kind, _i), text in zip(o, outs, strict=True):
            got.setdefault((n, c, kind), []).append(text)
    base_probe = got.get((-1, "base", "probe"))

    # -- held-out loss of each condition's prompts (only the held-out answer is scored)
    loss_rows, loss_groups, loss_adapters = [], [], []
    for n, plan in enumerate(plans):
        for c in plan["conds"]:
            if reused(plan, c):
                continue
            g = len(loss_adapters)
            loss_adapters.append(plan["adapter"] if USES_ADAPTER[c] else None)
            loss_groups.append((n, c))
            for m, a in zip(plan["msgs"][c], plan["answers"], strict=True):
                ex = tokenize_sft(base.tokenizer, {"messages": [*m, {"role": "assistant", "content": a}]}, limit)
                loss_rows.append((g, ex.input_ids, _last_answer_only(ex.labels, IGNORE)))
    losses = dict(zip(loss_groups, _mean_nll(base, loss_adapters, loss_rows, len(loss_adapters)), strict=True)) \
        if loss_rows else {}

    serving = measure_serving(base, plans, config) if config.serving else {}

    reports = []
    for n, plan in enumerate(plans):
        m, persona, out_rows = plan["metrics"], plan["persona"], {}
        for c in plan["conds"]:
            row: dict = {"prompt_tokens": round(sum(plan["tokens"][c]) / len(plan["tokens"][c]), 1),
                         "count": len(plan["prompts"])}
            if reused(plan, c):
                pre = "base_" if c == "base" else ""
                row["adherence"] = m.get(f"{pre}adherence")
                row["passed"] = None if row["adherence"] is None else round(row["adherence"] * row["count"])
                row["eval_loss"] = m.get(f"{pre}eval_loss")
            else:
                responses = got.get((n, c, "eval"))
                if persona is not None and responses is not None:
                    ok = [persona.check(r, p) for r, p in zip(responses, plan["prompts"], strict=True)]
                    row.update(adherence=sum(ok) / len(ok), passed=sum(ok), passed_each=ok, sample=responses[0][:200])
                else:
                    row.update(adherence=None, passed=None)
                loss = losses.get((n, c))
                row["eval_loss"] = loss if loss is not None and loss == loss else None
            answers = base_probe if c == "base" else got.get((n, c, "probe"))
            if answers is not None and base_probe is not None:
                scored = probe.score_answers(answers, base_probe)
                row.update(probe_accuracy=scored["probe_accuracy"], probe_retention=scored["probe_retention"])
            elif c == "base":
                row.update(probe_accuracy=m.get("base_probe_accuracy"),
                           probe_retention=1.0 if m.get("base_probe_accuracy") is not None else None)
            elif c == "adapter":
                row.update(probe_accuracy=m.get("probe_accuracy"), probe_retention=m.get("probe_retention"))
            else:
                row.update(probe_accuracy=None, probe_retention=None)
            s = serving.get(c)
            row.update(tok_s=s["tok_s"] if s else None, ttft_ms=s["ttft_ms"] if s else None)
            out_rows[c] = row
        ratio = None
        if "in_context" in plan["tokens"]:
            plain = sum(prompt_tokens(base.tokenizer, [{"role": "user", "content": p}]) for p in plan["prompts"])
            ratio = round(sum(plan["tokens"]["in_context"]) / plain, 2)
        reports.append({"k": plan["k"], "conditions": list(plan["conds"]), "rows": out_rows, "token_ratio": ratio,
                        "serving": {"new_tokens": config.serve_tokens, "requests": serving.get("_requests")}
                        if serving else None, "config": config.to_dict()})
    return reports


def measure_serving(base, plans: list[dict], config: BaselineConfig) -> dict:
    """Per condition: every user's held-out requests under it submitted together to a fresh engine,
    ``serve_tokens`` new tokens each (``ignore_eos``), after a warm-up: generated tok/s and mean TTFT (ms)."""
    import time  # noqa: PLC0415 - only the measurement needs the clock

    from lorafleet.adapters.stack import AdapterStack  # noqa: PLC0415 - torch on demand
    from lorafleet.evaluation.engine_backend import EngineBackend  # noqa: PLC0415 - torch on demand
    from lorafleet.serving.params import EngineConfig, SamplingParams  # noqa: PLC0415 - torch on demand

    conds = [c for c in CONDITIONS if any(c in p["conds"] for p in plans)]
    n_requests = max(sum(len(p["prompts"]) for p in plans if c in p["conds"]) for c in conds)
    levels = [a.levels if isinstance(a, AdapterStack) else (a,) for a in (p["adapter"] for p in plans) if a is not None]
    rank = max([lv.spec.rank for ls in levels for lv in ls] or [8])
    cfg = EngineConfig(max_batch=max(8, n_requests), max_active=max(8, len(plans) * 4), max_rank=max(8, rank),
                       max_prefill_tokens=4096)
    out: dict = {"_requests": n_requests}
    with EngineBackend(base, config=cfg) as eb:
        names = {}
        for n, p in enumerate(plans):
            a = p["adapter"]
            if a is not None:
                ls = a.levels if isinstance(a, AdapterStack) else (a,)
                digests = [eb.add(lv) for lv in ls]
                names[n] = digests[0] if len(digests) == 1 else digests
        params = SamplingParams(max_tokens=config.serve_tokens, ignore_eos=True)
        for c in conds:
            msgs, adps = [], []
            for n, p in enumerate(plans):
                if c in p["conds"]:
                    msgs += p["msgs"][c]
                    adps += [names.get(n) if USES_ADAPTER[c] else None] * len(p["msgs"][c])
            eb.engine.generate(msgs[:2], adps[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
            t = time.perf_counter()
            res = [r.raise_for_error() for r in eb.engine.generate(msgs, adps, params)]
            wall = time.perf_counter() - t
            ttfts = [r.timings["ttft_s"] for r in res if r.timings.get("ttft_s") is not None]
            out[c] = {"tok_s": round(sum(r.completion_tokens for r in res) / wall, 2),
                      "ttft_ms": round(1000 * sum(ttfts) / len(ttfts), 1) if ttfts else None}
    return out
