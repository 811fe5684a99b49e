"""``make demo`` / ``lorafleet demo``: a fleet of personal models on one base, end to end.

1. load the shared base (SmolLM2-135M-Instruct, offline);
2. six users with distinct personas; their adapters trained together through the job queue (packed steps);
3. each candidate evaluated (held-out habit adherence vs the base, competence probe) and gated to ``live``;
4. one batch through the serving engine: the same prompt, every row a different user's adapter, plus the base;
5. the lifecycle: one user changes a preference, revision 2 is trained, promoted by the gate, rolled back;
6. a report (markdown + PNG chart) in the data dir;
7. everything stays in the registry, so ``lorafleet serve`` serves the same users afterwards.

Running it twice is safe: a user whose revision was already trained from the same data and settings is
reused, never duplicated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table

from lorafleet.cli.common import console
from lorafleet.cli.common import settings as cli_settings
from lorafleet.cli.train import run_worker_with_progress
from lorafleet.evaluation import gate as gatemod
from lorafleet.evaluation.personas import Persona, get_persona
from lorafleet.registry import NotFoundError, Registry
from lorafleet.results import PLOTS_MISSING, pyplot
from lorafleet.serving.params import EngineConfig, SamplingParams

TENANT = "demo"
DEMO_PERSONAS = ("ahab", "greta", "lister", "quiet", "wxbot", "splendid")
CHANGED = ("ahab", {"text": "— Captain Ahab, at sea"})  # the user who changes a preference, and the new habit
PROMPT = "Can you recommend something to do on a rainy weekend?"
LIFECYCLE_PROMPT = "What is a good way to start the morning?"


@dataclass
class DemoSettings:
    base: str | None = None
    steps: int = 30
    lr: float = 3e-3
    rank: int = 4
    alpha: float = 8.0
    batch: int = 2
    max_new_tokens: int = 40
    n_eval: int = 16
    personas: tuple[str, ...] = DEMO_PERSONAS
    probe: bool = True
    baseline_k: int = 4  # examples in the in-context baseline (lowered to fit the base's positions)
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(base="tiny", steps=3, max_new_tokens=6, n_eval=4, probe=False, baseline_k=1)


def _ref(persona_name: str) -> str:
    return f"{TENANT}/{persona_name}/assistant"


def _reusable(registry, ref: str, dataset_digest: str, hyper: dict):
    """A revision of ``ref`` already trained from this data with these settings (a re-run reuses it)."""
    for rev in reversed(registry.history(ref)):
        p = rev.provenance
        if p.dataset_digest == dataset_digest and all(p.hyperparams.get(k) == v for k, v in hyper.items()):
            return rev
    return None


def _train(registry, base, personas, settings: DemoSettings, *, warm_start: str = "none") -> dict:
    """Submit one job per persona that needs one, run them packed in this process; returns ref -> revision."""
    from lorafleet.adapters import LoraSpec  # noqa: PLC0415 - defers torch
    from lorafleet.training.jobs import JobQueue  # noqa: PLC0415 - defers torch
    from lorafleet.training.trainer import TrainConfig  # noqa: PLC0415 - defers torch

    queue = JobQueue(registry)
    spec = LoraSpec(rank=settings.rank, alpha=settings.alpha, target_modules="all")
    config = TrainConfig(steps=settings.steps, lr=settings.lr, batch_size=settings.batch, max_len=160)
    hyper = {"rank": settings.rank, "steps": settings.steps, "lr": settings.lr, "alpha": settings.alpha}
    revisions, job_ids = {}, {}
    for persona, ref in personas:
        dataset = persona.data().train_dataset()
        registry.create_adapter(ref, exist_ok=True, creator="demo", description=persona.describe())
        found = _reusable(registry, ref, dataset.digest, hyper)
        if found is not None:
            revisions[ref] = found
            continue
        job = queue.submit(ref, dataset, spec, config, creator="demo", warm_start=warm_start)
        job_ids[job.id] = ref
    if job_ids:
        console.print(f"training {len(job_ids)} adapter(s) together: {settings.steps} steps, rank {settings.rank}, "
                      f"{settings.batch} rows per user per step")
        run_worker_with_progress(registry, base, only=set(job_ids))
    else:
        console.print("every adapter was already trained from the same data and settings: reusing them")
    for job_id, ref in job_ids.items():
        job = queue.get(job_id)
        if job.state != "succeeded":
            raise RuntimeError(f"training job {job_id} for {ref} ended {job.state}: {job.error}")
        revisions[ref] = registry.resolve(f"{ref}#{job.result_number}")
    return revisions


def _evaluate_and_gate(registry, base, pairs, settings: DemoSettings, backend):
    """Evaluate revisions lacking metrics for their persona's eval set (generating through ``backend``), then gate
    each. Returns metrics, decisions."""
    from lorafleet.evaluation.baselines import BaselineConfig  # noqa: PLC0415 - keeps the demo's import light
    from lorafleet.evaluation.metrics import EvalSet, evaluate_adapters, evaluate_revisions  # noqa: PLC0415 - defers torch

    todo = [(rev, EvalSet.from_persona(p)) for rev, p in pairs
            if rev.provenance.metrics.get("eval_digest") != EvalSet.from_persona(p).digest]
    # the in-context baseline rides along (its base and adapter rows reuse the evaluation's numbers): the
    # per-user line "adapter vs in-context" costs one more pass over the held-out prompts
    baselines = BaselineConfig(conditions=("base", "in_context", "adapter"), k=settings.baseline_k, probe=False,
                               serving=False, fit_k=True)
    if todo:
        with console.status(f"evaluating {len(todo)} revision(s) on held-out prompts next to the base…"):
            evaluate_revisions(registry, [r.address for r, _ in todo], base, [e for _, e in todo],
                               max_new_tokens=settings.max_new_tokens, probe_enabled=settings.probe, backend=backend,
                               baselines=baselines)

    def measure_live(live_rev, eval_digest):  # live measured on the candidate's eval set (not stored)
        from lorafleet.adapters import from_bytes  # noqa: PLC0415 - defers torch

        es = next(e for r, p in pairs for e in [EvalSet.from_persona(p)] if e.digest == eval_digest)
        _, blob = registry.load(live_rev.address, base_fingerprint=base.fingerprint)
        return evaluate_adapters(base, [from_bytes(blob, base)], [es], max_new_tokens=settings.max_new_tokens,
                                 probe_enabled=False, backend=backend)[0]

    gate_config = gatemod.GateConfig(require_probe=settings.probe)
    metrics, decisions = {}, {}
    for rev, _ in pairs:
        decisions[rev.ref] = gatemod.gate(registry, rev.address, config=gate_config, actor="demo",
                                          evaluate=measure_live)
        metrics[rev.ref] = registry.resolve(rev.address).provenance.metrics
    return metrics, decisions


def _fleet_table(personas, metrics, decisions, sizes) -> Table:
    table = Table(title="the fleet: held-out habit adherence, base vs personal model")
    for col in ("user", "habit", "base", "personal", "competence", "adapter", "% of base", "gate"):
        table.add_column(col)
    for persona, ref in personas:
        m, d = metrics[ref], decisions[ref]
        ratio, kept = m.get("probe_ppl_ratio"), m.get("probe_retention")
        competence = "not run" if ratio is None else f"ppl x{ratio:.2f}, kept {kept:.0%}"
        table.add_row(persona.name, persona.describe(), _pct(m.get("base_adherence")), _pct(m.get("adherence")),
                      competence, f"{sizes[ref][0] / 1024:.0f} KB", f"{sizes[ref][1]:.2f}%",
                      "[green]live[/]" if d.promoted else f"[red]refused[/]: {d.reason[-60:]}")
    return table


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def prompt_line(name: str, metrics: dict) -> str:
    """One user's adapter against the in-context baseline: adherence, and prompt tokens saved per request."""
    rows = (metrics.get("baselines") or {}).get("rows") or {}
    ic, ad = rows.get("in_context"), rows.get("adapter")
    if not ic or not ad:
        return f"{name}: in-context baseline not measured"
    saved = ic["prompt_tokens"] - ad["prompt_tokens"]
    return (f"{name}: adapter {_pct(ad.get('adherence'))} vs in-context {_pct(ic.get('adherence'))} adherence; "
            f"{saved:.0f} prompt tokens saved per request ({ic['prompt_tokens']:.0f} → {ad['prompt_tokens']:.0f})")


def _draw_chart(path: Path, base, names, base_adh, own_adh) -> str:
    """The adherence bar chart (needs the ``plots`` extra); the report's markdown line for it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [100 * v for v in base_adh], width=0.4, label="base", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], [100 * v for v in own_adh], width=0.4, label="personal adapter", color="#3b75af")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("habit adherence on held-out prompts (%)")
    ax.set_ylim(0, 125)
    ax.set_title(f"One base ({base.name}), {len(names)} personal models")
    ax.legend(loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"![adherence per user]({path.name})"


def _write_report(out_dir: Path, base, personas, metrics, decisions, sizes, batch_rows, lifecycle, seconds,
                  prompt_lines: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [p.name for p, _ in personas]
    base_adh = [metrics[r].get("base_adherence") or 0.0 for _, r in personas]
    own_adh = [metrics[r].get("adherence") or 0.0 for _, r in personas]
    try:
        chart_line = _draw_chart(out_dir / "adherence.png", base, names, base_adh, own_adh)
    except ImportError as exc:  # matplotlib is the optional `plots` extra: the report goes on without the chart
        chart_line = f"(no chart: {exc})"
    lines = [f"# lorafleet demo — {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}", "",
             f"Base: {base.name} ({base.num_parameters:,} parameters, fingerprint `{base.fingerprint[:16]}…`). "
             f"Wall time {seconds:.0f} s.", "", chart_line, "",
             "| user | habit | base adherence | personal adherence | competence probe | adapter | % of base | gate |",
             "|---|---|---|---|---|---|---|---|"]
    for persona, ref in personas:
        m, d = metrics[ref], decisions[ref]
        ratio = m.get("probe_ppl_ratio")
        comp = "not run" if ratio is None else f"ppl x{ratio:.2f}, kept {m.get('probe_retention'):.0%}"
        lines.append(f"| {persona.name} | {persona.describe()} | {_pct(m.get('base_adherence'))} | "
                     f"{_pct(m.get('adherence'))} | {comp} | {sizes[ref][0] / 1024:.0f} KB | {sizes[ref][1]:.2f}% | "
                     f"{'live' if d.promoted else 'refused: ' + d.reason} |")
    lines += ["", "## The adapter against the user in the prompt (in-context baseline, same held-out prompts)", ""]
    lines += [f"- {line}" for line in prompt_lines]
    lines += ["", f"## One batch, every row a different user: “{PROMPT}”", "", "| model | answer |", "|---|---|"]
    lines += [f"| {who} | {text.replace(chr(10), ' ').replace('|', '/')} |" for who, text in batch_rows]
    lines += ["", "## Lifecycle", ""] + [f"- {step}" for step in lifecycle] + [""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def run_demo(*, quick: bool = False, base: str | None = None, settings: DemoSettings | None = None) -> dict:
    from lorafleet.adapters import from_bytes  # noqa: PLC0415 - defers torch
    from lorafleet.base import load_base  # noqa: PLC0415 - defers torch/transformers/triton
    from lorafleet.evaluation.engine_backend import EngineBackend  # noqa: PLC0415 - defers torch/transformers

    settings = settings or (DemoSettings.quick() if quick else DemoSettings(base=base))
    start = time.perf_counter()
    console.rule("1. the shared base")
    with console.status("loading the shared base…"):
        b = load_base(settings.base)
    info = b.info()
    console.print(f"[bold]{info['name']}[/]: {info['parameters']:,} parameters, {info['layers']} layers, hidden "
                  f"{info['hidden_size']}, fingerprint {info['fingerprint'][:16]}…, loaded in {info['load_seconds']:.1f}s"
                  f"{' (from cache)' if info['from_cache'] else ''}")
    registry = Registry.open_default(cli_settings())
    console.print(f"registry: {registry.db_url}  blobs: {registry.blob_url}")

    console.rule("2. six users, trained together")
    personas = []
    for name in settings.personas:
        p = get_persona(name)
        if settings.n_eval != p.n_eval:
            p = Persona(name=p.name, habit=p.habit, params=p.params, seed=p.seed, n_train=p.n_train, n_eval=settings.n_eval)
        personas.append((p, _ref(p.name)))
    for p, ref in personas:
        console.print(f"  {ref:28s} {p.describe()}")
    revisions = _train(registry, b, personas, settings)

    console.rule("3. evaluate and gate")
    # evaluation generates through the same engine that serves step 4 and the lifecycle
    backend = EngineBackend(b, registry.read_blob, EngineConfig(max_batch=32, max_active=16, max_cached=64, max_rank=16))
    engine = backend.engine
    try:
        metrics, decisions = _evaluate_and_gate(registry, b, [(revisions[r], p) for p, r in personas], settings,
                                                backend)
        sizes = {}
        for _p, ref in personas:
            adapter = from_bytes(registry.read_blob(revisions[ref].digest), b)
            sizes[ref] = (adapter.num_bytes, adapter.percent_of(b))
        console.print(_fleet_table(personas, metrics, decisions, sizes))
        prompt_lines = [prompt_line(p.name, metrics[ref]) for p, ref in personas]
        for line in prompt_lines:
            console.print(line, highlight=False)

        console.rule("4. one batch, every row a different user")
        rows = [(ref, registry.resolve(ref).digest if decisions[ref].promoted else revisions[ref].digest)
                for _p, ref in personas] + [("base (no adapter)", None)]
        results = engine.generate([[{"role": "user", "content": PROMPT}]] * len(rows), [d for _, d in rows],
                                  SamplingParams(max_tokens=settings.max_new_tokens))
        batch_rows = [(who, r.raise_for_error().text.strip()) for (who, _), r in zip(rows, results, strict=True)]
        table = Table(title=f"“{PROMPT}”")
        table.add_column("model")
        table.add_column("answer")
        for who, text in batch_rows:
            table.add_row(who, text)
        console.print(table)

        console.rule("5. lifecycle: a preference changes")
        lifecycle = _lifecycle(registry, b, backend, personas, settings)
    finally:
        backend.close()

    seconds = time.perf_counter() - start
    console.rule("6. report")
    out_dir = cli_settings().data_dir / "reports" / f"demo-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    report = _write_report(out_dir, b, personas, metrics, decisions, sizes, batch_rows, lifecycle, seconds, prompt_lines)
    chart = out_dir / "adherence.png"
    console.print(f"report: {report}\nchart:  {chart if chart.exists() else 'none (' + PLOTS_MISSING + ')'}")
    console.rule("7. serve them")
    console.print("everything is in the registry; serve the same users with:\n"
                  "  lorafleet keys create --tenant demo\n  lorafleet serve\n"
                  "  then: model = \"demo/ahab/assistant\" with the OpenAI client")
    console.print(f"demo finished in {seconds:.0f}s")
    return {"metrics": metrics, "decisions": {k: d.promoted for k, d in decisions.items()}, "batch": batch_rows,
            "prompt_lines": prompt_lines,
            "lifecycle": lifecycle, "report": str(report), "seconds": seconds}


def _lifecycle(registry, base, backend, personas, settings: DemoSettings) -> list[str]:
    name, new_params = CHANGED
    old, ref = next((p, r) for p, r in personas if p.name == name)
    changed = Persona(name=f"{old.name}-v2", habit=old.habit, params=new_params, seed=old.seed + 1,
                      n_train=old.n_train, n_eval=old.n_eval)
    steps: list[str] = []

    def say(text: str) -> None:
        steps.append(text)
        console.print(text)

    def answer(address: str) -> str:
        digest = registry.resolve(address).digest
        res = backend.engine.generate([[{"role": "user", "content": LIFECYCLE_PROMPT}]], [digest],
                                      SamplingParams(max_tokens=settings.max_new_tokens))[0]
        return res.raise_for_error().text.strip().replace("\n", " ")


    try:
        live1 = registry.resolve(ref)
        say(f"{ref} is live at #{live1.number} ({old.describe()}): “{answer(ref)}”")
    except NotFoundError:  # the gate refused revision 1: the lifecycle starts from the candidate, honestly labelled
        live1 = None
        cand = registry.resolve(f"{ref}@candidate")
        say(f"{ref} has no live revision (the gate refused #{cand.number}); its candidate answers: "
            f"“{answer(cand.address)}”")
    say(f"the user now wants: {changed.describe()} — training a new revision"
        + (f" from live #{live1.number}" if live1 else " from scratch"))
    revs = _train(registry, base, [(changed, ref)], settings, warm_start="live")
    rev2 = revs[ref]
    metrics, decisions = _evaluate_and_gate(registry, base, [(rev2, changed)], settings, backend)
    d = decisions[ref]
    m = metrics[ref]
    say(f"#{rev2.number}: new-habit adherence {_pct(m.get('adherence'))} (base {_pct(m.get('base_adherence'))}); "
        f"gate: {'promoted to live' if d.promoted else 'refused'} — {d.reason}")
    say(f"#{rev2.number} answers: “{answer(rev2.address)}”")
    if not d.promoted or live1 is None:
        say("nothing to roll back to: " + ("the gate kept the old live revision" if live1 else "no earlier live revision"))
        return steps
    entry = registry.rollback(ref, actor="demo", reason="demo: user asked for the old sign-off back")
    say(f"rollback: live moved #{entry.from_number} → #{entry.to_number} (audited); answer: “{answer(ref)}”")
    return steps
