"""Metrics of a revision, measured side by side with the base in the same run, and stored on the revision.

For an adapter and its user's eval set (a persona's held-out split, or any SFT JSONL file):

- ``eval_loss`` / ``base_eval_loss``: mean token NLL of the eval answers (assistant tokens only);
- ``adherence`` / ``base_adherence``: share of eval prompts whose greedy response passes the persona's habit
  checker (``None`` for an eval file with no persona, which has no checker);
- the competence probe (see :mod:`lorafleet.evaluation.probe`): ``probe_ppl_ratio``, ``probe_retention``,
  ``probe_accuracy``, ``probe_agreement`` and their base values.

:func:`evaluate_adapters` evaluates many adapters in shared batches (one base forward serves every adapter's
rows); :func:`evaluate_revisions` loads revisions from the registry, evaluates them and merges the metrics
into each revision with ``Registry.update_metrics``. The revision remembers its eval set in
``metrics["eval_set"]`` / ``metrics["eval_digest"]``, and a persona in ``metrics["persona"]`` plus the full
spec in ``metrics["persona_spec"]`` (so a generated persona is reproducible from the revision alone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from lorafleet.adapters import LoraHost, from_bytes
from lorafleet.adapters.stack import AdapterStack, route_rows
from lorafleet.evaluation import probe
from lorafleet.evaluation.baselines import BaselineConfig, Profile, compare_conditions
from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.generation import Backend, generate_responses
from lorafleet.evaluation.personas import Persona, get_persona, records_digest
from lorafleet.registry.stacks import stack_record
from lorafleet.training.data import IGNORE, dataset_from_records, load_jsonl, tokenize_sft
from lorafleet.training.losses import sft_token_loss

MAX_LEN = 256
SAMPLES = 3  # responses kept on the revision, for `lorafleet report`
PROBE_MAX_NEW_TOKENS = 24
PROBE_KEYS = ("probe_accuracy", "base_probe_accuracy", "probe_retention", "probe_agreement", "probe_lost",
              "probe_version", "probe_ppl", "base_probe_ppl", "probe_ppl_ratio")


@dataclass
class EvalSet:
    """A user's held-out set: SFT records (the last assistant turn is the target) and, for a persona, a checker."""

    name: str
    records: list[dict]
    persona: Persona | None = None
    path: str | None = None
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        dataset_from_records(self.records, "sft", source=self.name)
        self.digest = records_digest(self.records)

    @classmethod
    def from_persona(cls, persona: Persona) -> EvalSet:
        return cls(f"persona:{persona.name}", persona.data().eval, persona=persona)

    @classmethod
    def from_file(cls, path: str | Path) -> EvalSet:
        ds = load_jsonl(path, "sft")
        return cls(f"file:{Path(path).name}", ds.records, path=str(Path(path).resolve()))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def prompts(self) -> list[list[dict]]:
        """Each record's conversation up to (not including) its last assistant turn: what is generated from."""
        out = []
        for r in self.records:
            msgs = r["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            out.append(msgs[:last])
        return out

    @property
    def user_prompts(self) -> list[str]:
        """The last user message before each target (what a habit checker sees as ``prompt``)."""
        return [next((m["content"] for m in reversed(p) if m["role"] == "user"), "") for p in self.prompts]

    def describe(self) -> dict:
        return {
            "eval_set": self.name,
            "eval_digest": self.digest,
            "eval_count": len(self.records),
            "persona": self.persona.name if self.persona else None,
            "persona_spec": self.persona.to_dict() if self.persona else None,
            "eval_file": self.path,
        }


def eval_set_for(rev=None, *, persona: str | Persona | None = None, eval_file: str | Path | None = None,
                 manifest: str | Path | None = None) -> EvalSet:
    """The eval set to use for a revision: an explicit file or persona, else the persona the revision records
    (``provenance.hyperparams["persona_spec"|"persona"]``, then ``metrics["persona_spec"|"persona"]``)."""
    if eval_file is not None and persona is not None:
        raise EvaluationError("give either a persona or an eval file, not both")
    if eval_file is not None:
        return EvalSet.from_file(eval_file)
    if isinstance(persona, Persona):
        return EvalSet.from_persona(persona)
    if isinstance(persona, str):
        return EvalSet.from_persona(_find_persona(persona, manifest, rev))
    if rev is not None:
        for source in (rev.provenance.hyperparams, rev.provenance.metrics):
            spec = source.get("persona_spec")
            if isinstance(spec, dict):
                return EvalSet.from_persona(Persona.from_dict(spec))
            if isinstance(source.get("persona"), str):
                return EvalSet.from_persona(_find_persona(source["persona"], manifest, rev))
        if rev.provenance.metrics.get("eval_file"):
            return EvalSet.from_file(rev.provenance.metrics["eval_file"])
    where = f"revision {rev.address} records" if rev is not None else "there is"
    raise EvaluationError(f"{where} no persona or eval set; pass --persona NAME or --eval-file FILE")


def _find_persona(name: str, manifest: str | Path | None, rev=None) -> Persona:
    import json  # noqa: PLC0415

    if manifest is not None:
        entries = json.loads(Path(manifest).read_text(encoding="utf-8")).get("personas", [])
        for entry in entries:
            if entry.get("name") == name:
                return Persona.from_dict(entry)
        raise EvaluationError(f"no persona named {name!r} in {manifest}")
    if rev is not None:  # a generated persona recorded on the revision
        for source in (rev.provenance.hyperparams, rev.provenance.metrics):
            spec = source.get("persona_spec")
            if isinstance(spec, dict) and spec.get("name") == name:
                return Persona.from_dict(spec)
    return get_persona(name)


# --------------------------------------------------------------------------- losses


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@torch.no_grad()
def _mean_nll(base, adapters: list, rows: list[tuple[int, list[int], list[int]]], n_groups: int,
              batch: int = 16) -> list[float]:
    """Mean token NLL per group over ``rows = (group, ids, labels)``; ``adapters[group]`` (an adapter, a stack
    of adapters, or None = base)."""

    host = LoraHost.attach(base.model)
    table, slot_of = route_rows(adapters)  # slot_of[group]: the group's slot per stack level
    total, count = [0.0] * n_groups, [0] * n_groups
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))  # similar lengths share a batch
    pad = base.tokenizer.pad_token_id
    for start in range(0, len(order), batch):
        chunk = [rows[i] for i in order[start : start + batch]]
        width = max(len(ids) for _, ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
        lab = torch.full((len(chunk), width), IGNORE, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        for i, (_, r, lb) in enumerate(chunk):
            ids[i, : len(r)], lab[i, : len(lb)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(lb), 1
        slots = [slot_of[g] for g, _, _ in chunk] if table is not None else None
        routed = table if slots is not None and any(s >= 0 for row in slots for s in row) else None
        with host.route(routed, slots if routed is not None else None):
            logits = base.model(input_ids=ids.to(base.device), attention_mask=mask.to(base.device)).logits
        nll, n = sft_token_loss(logits, lab.to(base.device))  # (B,), (B,)
        for i, (g, _, _) in enumerate(chunk):
            total[g] += float(nll[i])
            count[g] += int(n[i])
    return [total[g] / count[g] if count[g] else math.nan for g in range(n_groups)]


def eval_losses(base, adapters: list, record_lists: list[list[dict]], *, max_len: int = MAX_LEN) -> list[float]:
    """Mean assistant-token NLL of ``record_lists[k]`` under ``adapters[k]`` (None = base), in shared batches."""
    rows = []
    for k, records in enumerate(record_lists):
        for r in records:
            ex = tokenize_sft(base.tokenizer, r, max_len)
            rows.append((k, ex.input_ids, ex.labels))
    return _mean_nll(base, adapters, rows, len(record_lists))


def perplexities(base, adapters: list, texts: tuple[str, ...] = probe.PROBE_TEXTS) -> list[float]:
    """Perplexity of plain ``texts`` (no chat template) under each adapter (None = base).

    Each text is encoded as the model's own tokenizer encodes a document, special tokens included: Gemma's adds
    ``<bos>``, without which Gemma-3-270M's perplexity on these texts is 262 instead of 15 (SmolLM2's adds none)."""
    rows = []
    for k in range(len(adapters)):
        for text in texts:
            ids = base.tokenizer(text)["input_ids"][:MAX_LEN]
            rows.append((k, ids, list(ids)))
    return [math.exp(x) if math.isfinite(x) else math.nan for x in _mean_nll(base, adapters, rows, len(adapters))]


# --------------------------------------------------------------------------- the whole evaluation

_base_cache: dict[tuple, object] = {}


def clear_base_cache() -> None:
    """Forget the base's cached results (they are keyed by base fingerprint and eval set digest)."""
    _base_cache.clear()


def wilson_interval(passed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a pass rate (``passed`` of ``n`` checked answers); NaNs for ``n == 0``."""
    if n == 0:
        return (math.nan, math.nan)
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def adherence_rate(eval_set: EvalSet, responses: list[str]) -> float | None:
    """Share of responses that pass the persona's checker; None without a persona."""
    if eval_set.persona is None:
        return None
    habit = eval_set.persona.habit_obj
    oks = [habit.check(r, p) for r, p in zip(responses, eval_set.user_prompts, strict=True)]
    return sum(oks) / len(oks) if oks else None


def _base_losses(base, eval_sets: list[EvalSet], adapters: list) -> list[float]:
    """Adapter losses on their sets; the base's (uncached) losses ride in the same batches and are cached."""
    fp, sets = base.fingerprint, {es.digest: es for es in eval_sets}
    need = [d for d in sets if (fp, "loss", d) not in _base_cache]
    losses = eval_losses(base, list(adapters) + [None] * len(need),
                         [es.records for es in eval_sets] + [sets[d].records for d in need])
    for d, value in zip(need, losses[len(adapters):], strict=True):
        _base_cache[(fp, "loss", d)] = value
    return losses[: len(adapters)]


def _responses(base, adapters: list, eval_sets: list[EvalSet], max_new_tokens: int, **gen) -> list[list[str]]:
    """Greedy responses of each adapter to its eval prompts; the base's (uncached) ones are generated and cached."""
    fp, sets = base.fingerprint, {es.digest: es for es in eval_sets}
    need = [d for d in sets if (fp, "gen", d, max_new_tokens) not in _base_cache]
    prompts, rows = [], []
    for a, es in [*zip(adapters, eval_sets, strict=True), *((None, sets[d]) for d in need)]:
        prompts += es.prompts
        rows += [a] * len(es)
    outs = generate_responses(base, prompts, rows, max_new_tokens=max_new_tokens, **gen)
    per_set, pos = [], 0
    for es in [*eval_sets, *(sets[d] for d in need)]:
        per_set.append(outs[pos : pos + len(es)])
        pos += len(es)
    for d, responses in zip(need, per_set[len(eval_sets):], strict=True):
        _base_cache[(fp, "gen", d, max_new_tokens)] = responses
    return per_set[: len(eval_sets)]


def _probe(base, adapters: list, max_new_tokens: int, **gen) -> list[dict]:
    """The competence probe of each adapter against the base (the base's side cached)."""
    key = (base.fingerprint, "probe", probe.PROBE_VERSION, max_new_tokens)
    questions = [q for q, _ in probe.PROBE_QUESTIONS]
    extra = [None] if key not in _base_cache else []
    rows = [*adapters, *extra]
    outs = generate_responses(base, questions * len(rows), [a for a in rows for _ in questions],
                              max_new_tokens=max_new_tokens, **gen)
    answers = [outs[k * len(questions) : (k + 1) * len(questions)] for k in range(len(rows))]
    ppl = perplexities(base, rows)
    if extra:
        _base_cache[key] = (ppl[-1], answers[-1])
    base_ppl, base_answers = _base_cache[key]
    out = []
    for k in range(len(adapters)):
        m = probe.score_answers(answers[k], base_answers)
        ratio = ppl[k] / base_ppl if base_ppl and math.isfinite(base_ppl) else None
        m.update({"probe_version": probe.PROBE_VERSION, "probe_ppl": _finite(ppl[k]),
                  "base_probe_ppl": _finite(base_ppl), "probe_ppl_ratio": _finite(ratio)})
        out.append(m)
    return out


def evaluate_adapters(base, adapters: list, eval_sets: list[EvalSet], *, max_new_tokens: int = 48,
                      probe_enabled: bool = True, probe_max_new_tokens: int = PROBE_MAX_NEW_TOKENS,
                      batch_size: int = 16, on_batch: Callable[[int], None] | None = None,
                      backend: Backend | None = None) -> list[dict]:
    """Metrics of ``adapters[k]`` on ``eval_sets[k]``, with the base's values on the same sets, in shared batches;
    ``backend`` generates the responses (None: the default in-process generate; see ``evaluation.generation``).

    The base's results are computed once per eval set (and cached per process by base fingerprint and eval-set
    digest); adapter rows and base rows share forward passes. Returns one JSON-ready metrics dict per adapter.
    """
    if len(adapters) != len(eval_sets):
        raise ValueError(f"got {len(adapters)} adapters but {len(eval_sets)} eval sets")
    start = time.perf_counter()
    fp = base.fingerprint
    gen = {"batch_size": batch_size, "on_batch": on_batch, "backend": backend}
    losses = _base_losses(base, eval_sets, adapters)
    responses = _responses(base, adapters, eval_sets, max_new_tokens, **gen)
    probes = _probe(base, adapters, probe_max_new_tokens, **gen) if probe_enabled else None
    elapsed = time.perf_counter() - start
    results = []
    for k, es in enumerate(eval_sets):
        base_responses = _base_cache[(fp, "gen", es.digest, max_new_tokens)]
        habit = es.persona.habit_obj if es.persona else None
        m = {
            **es.describe(),
            "eval_loss": _finite(losses[k]),
            "base_eval_loss": _finite(_base_cache[(fp, "loss", es.digest)]),
            "adherence": adherence_rate(es, responses[k]),
            "base_adherence": adherence_rate(es, base_responses),
            "max_new_tokens": max_new_tokens,
            "samples": [{"prompt": p[:200], "response": r[:300], "ok": habit.check(r, p) if habit else None}
                        for p, r in list(zip(es.user_prompts, responses[k], strict=True))[:SAMPLES]],
            # explicit None without the probe: stale numbers of an earlier evaluation must not survive the merge
            **(probes[k] if probes is not None else dict.fromkeys(PROBE_KEYS)),
            "base_fingerprint": fp,
            "evaluated_at": datetime.now(UTC).isoformat(),
            "eval_seconds": round(elapsed, 2),
        }
        results.append(m)
    return results


def load_for_eval(registry, address: str, base) -> tuple[object, object, list[dict]]:
    """``(revision, adapter, stack)`` for evaluating ``address`` as it is served: a stacked adapter comes with its
    parents' live revisions (an ``AdapterStack``); ``stack`` lists every level (address, digest), root first."""

    levels = registry.load_stack(address, base_fingerprint=base.fingerprint)  # refuses another base's level
    adapters = tuple(from_bytes(blob, base) for _, blob in levels)
    revs = [rev for rev, _ in levels]
    return revs[-1], adapters[0] if len(adapters) == 1 else AdapterStack(adapters), stack_record(revs)


def baseline_profiles(eval_sets: list[EvalSet], baselines: BaselineConfig | None,
                      profiles: list[Profile | None] | None = None) -> list[Profile | None]:
    """The in-context profile of each eval set's user (an explicit one, else its persona's description and training
    split), validated up front: a set without a persona's checker, an empty profile or ``k`` larger than the user's
    examples is an :class:`EvaluationError` before anything is generated or stored."""
    if baselines is None or not baselines.conditions:
        return [None] * len(eval_sets)
    profiles = list(profiles) if profiles is not None else [None] * len(eval_sets)
    if len(profiles) != len(eval_sets):
        raise EvaluationError(f"got {len(profiles)} profiles for {len(eval_sets)} eval sets")
    out = []
    for es, prof in zip(eval_sets, profiles, strict=True):
        if es.persona is None:
            raise EvaluationError(f"eval set {es.name!r} has no persona, so no habit checker: the baselines compare "
                                  "adherence; evaluate with --persona NAME, or turn them off (--baselines none)")
        if baselines.needs_profile:
            prof = prof if prof is not None else Profile.from_persona(es.persona)
            if not isinstance(prof, Profile):
                raise EvaluationError(f"a profile must be a Profile, got {type(prof).__name__}")
            prof.check_k(baselines.k)
        out.append(prof)
    return out


def evaluate_revisions(registry, addresses: list[str], base, eval_sets: list[EvalSet], *, store: bool = True,
                       baselines: BaselineConfig | None = None, profiles: list[Profile | None] | None = None,
                       **kwargs) -> list[tuple[object, dict]]:
    """Load each revision (refused if made for another base), evaluate them together, and (``store``) merge the
    metrics into each revision. Returns ``(RevisionInfo, metrics)`` pairs (the info after the update).

    A stacked adapter is evaluated on top of its parents' live revisions, as it is served; the levels used are
    recorded in ``metrics["stack"]``. With ``baselines`` the same held-out prompts are also measured under the
    prompt baselines (:func:`lorafleet.evaluation.baselines.compare_conditions`; ``profiles[k]`` or the persona's
    own), stored as ``metrics["baselines"]``; their bad input fails before anything is evaluated or stored."""
    profs = baseline_profiles(eval_sets, baselines, profiles)
    revs, adapters, stacks = [], [], []
    for address in addresses:
        rev, adapter, stack = load_for_eval(registry, address, base)
        revs.append(rev)
        adapters.append(adapter)
        stacks.append(stack)
    metrics = evaluate_adapters(base, adapters, eval_sets, **kwargs)
    for m, stack in zip(metrics, stacks, strict=True):
        if len(stack) > 1:
            m["stack"] = stack
    if baselines is not None and baselines.conditions:
        reports = compare_conditions(
            base, [{"eval_set": es, "profile": pr, "adapter": a, "metrics": m}
                   for es, pr, a, m in zip(eval_sets, profs, adapters, metrics, strict=True)],
            # no probe asked of the evaluation: none under the baselines either
            replace(baselines, probe=baselines.probe and kwargs.get("probe_enabled", True)),
            max_new_tokens=kwargs.get("max_new_tokens", 48),
            probe_max_new_tokens=kwargs.get("probe_max_new_tokens", PROBE_MAX_NEW_TOKENS),
            batch_size=kwargs.get("batch_size", 16), backend=kwargs.get("backend"))
        for m, report in zip(metrics, reports, strict=True):
            m["baselines"] = report
    elif baselines is not None:
        for m in metrics:
            m["baselines"] = None  # asked for none: stale baselines of an earlier evaluation must not survive the merge
    out = []
    for rev, m in zip(revs, metrics, strict=True):
        out.append((registry.update_metrics(rev.address, m) if store else rev, m))
    return out


def evaluate_revision(registry, address: str, base, eval_set: EvalSet, *, store: bool = True, **kwargs):
    """:func:`evaluate_revisions` for one revision: returns ``(RevisionInfo, metrics)``."""
    return evaluate_revisions(registry, [address], base, [eval_set], store=store, **kwargs)[0]
