"""Scale down and scale up: how small can a personal model be, and does a stronger base make it better.

``lorafleet bench scale-down`` trains, for a few personas and seeds, every *format* of a personal model —
LoRA of several ranks and targets, and the tiny VeRA family — in packed multi-tenant steps on one base; then
stores each trained adapter under every storage codec (fp16 / int8 / 4-bit; no retraining), commits the blobs
to a registry, and evaluates them all through the serving engine (tiny and LoRA users in the same batches):
bytes per user, habit adherence, held-out loss, and the spread over seeds.

``lorafleet bench scale-up`` trains the same personas with one format (rank-8 LoRA) on several bases — a
random-init model of the SmolLM2 shape, SmolLM2-135M-Instruct, Gemma-3-270M — and measures adherence at
checkpoints, hence the number of examples needed to reach 80% adherence, per base.

Both write a markdown table and PNG plots (see docs/scale.md). Defaults fit ~15 min on one busy CPU core;
``quick`` settings run on the tiny model in seconds (CI's smoke run).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lorafleet.adapters import LoraAdapter, LoraSpec, VeraAdapter, VeraSpec, to_bytes
from lorafleet.adapters.codecs import check_codec
from lorafleet.adapters.peft_io import decode_blob
from lorafleet.adapters.vera import as_lora
from lorafleet.evaluation.engine_backend import EngineBackend
from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.metrics import EvalSet, evaluate_adapters, wilson_interval
from lorafleet.evaluation.personas import Persona, get_persona
from lorafleet.registry import Provenance, Registry
from lorafleet.results import markdown_table, origin, pyplot, write_markdown
from lorafleet.serving.params import EngineConfig
from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig

DEFAULT_PERSONAS = ("ahab",)  # the sign-off habit: learned fastest; more with --personas (slower)
LORA_RANKS = (1, 2, 4, 8, 16)
TARGET_SETS = ("attention", "mlp", "all")
REFERENCE = "lora-r8-all"  # the format the others are compared with
KEEP = 0.9  # "keeps >= 90% of the reference's adherence"
SCALE_UP_BASES = ("random-init", "smollm2-135m-instruct", "gemma3-270m")
Say = Callable[[str], None]


# --------------------------------------------------------------------------------------------- formats

@dataclass(frozen=True)
class Format:
    """One trainable format of a personal model: ``family`` lora|vera, its rank and targets."""

    family: str
    rank: int
    targets: str

    @property
    def name(self) -> str:
        return f"{self.family}-r{self.rank}-{self.targets}"

    @classmethod
    def parse(cls, text: str) -> Format:
        """``lora-r8-all`` / ``vera-r16-attention`` -> a Format; errors name the bad part."""
        parts = text.strip().split("-")
        if len(parts) != 3 or parts[0] not in ("lora", "vera") or not parts[1].startswith("r") \
                or not parts[1][1:].isdigit() or parts[2] not in TARGET_SETS:
            raise EvaluationError(f"format {text!r} is not FAMILY-rRANK-TARGETS, e.g. lora-r8-all or "
                                  f"vera-r16-attention (families lora/vera, targets {'/'.join(TARGET_SETS)})")
        return cls(parts[0], int(parts[1][1:]), parts[2])

    def create(self, base, seed: int, alpha: float):
        if self.family == "vera":
            # The projections are shared by every user of the fleet: one fixed key, not the training seed.
            return VeraAdapter.create(base, VeraSpec(rank=self.rank, target_modules=self.targets, projection_seed=0))
        return LoraAdapter.create(base, LoraSpec(rank=self.rank, alpha=alpha, target_modules=self.targets), seed=seed)


def default_formats() -> tuple[Format, ...]:
    """The reduced default grid: the rank sweep on all targets, the target sweep at rank 8, two VeRA formats."""
    return (*(Format("lora", r, "all") for r in LORA_RANKS), Format("lora", 8, "attention"), Format("lora", 8, "mlp"),
            Format("vera", 16, "attention"), Format("vera", 16, "all"))


def full_formats() -> tuple[Format, ...]:
    return (*(Format("lora", r, t) for t in TARGET_SETS for r in LORA_RANKS),
            Format("vera", 16, "attention"), Format("vera", 16, "all"))


@dataclass(frozen=True)
class ScaleSettings:
    """Knobs of both benchmarks; the defaults are the ~15-minute run on SmolLM2 (one busy core)."""

    base: str = "smollm2-135m-instruct"
    personas: tuple[str, ...] = DEFAULT_PERSONAS
    formats: tuple[Format, ...] = field(default_factory=default_formats)
    codecs: tuple[str, ...] = ("fp16", "int8", "q4")
    # Formats stored under every codec; the others under the first codec only (evaluation is the costly part).
    codec_formats: tuple[str, ...] = ("lora-r1-all", "lora-r8-all", "vera-r16-attention")
    seeds: int = 3
    steps: int = 8
    batch: int = 1  # rows per user per step
    lr: float = 8e-3  # LoRA
    vera_lr: float = 5e-2  # VeRA trains two vectors per module and b starts at 0: it needs a much larger step
    alpha: float = 16.0
    max_len: int = 128
    n_eval: int = 4
    max_new_tokens: int = 32
    gen_batch: int = 32
    eval_chunk: int = 12  # adapters evaluated together (their stacked weights live in memory at once)
    checkpoints: tuple[int, ...] = ()  # scale-up: steps at which adherence is measured; () = 5, 10, 20, ... and the last
    bases: tuple[str, ...] = SCALE_UP_BASES
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.personas:
            raise EvaluationError("at least one persona is needed")
        if not (self.lr > 0 and self.vera_lr > 0):
            raise EvaluationError(f"learning rates must be positive, got lr={self.lr}, vera_lr={self.vera_lr}")
        if not isinstance(self.seeds, int) or not 1 <= self.seeds <= 10:
            raise EvaluationError(f"seeds must be an integer in 1..10, got {self.seeds!r}")
        if not self.formats:
            raise EvaluationError("at least one format is needed")

        for codec in self.codecs:
            check_codec(codec)
        cps = self.checkpoints
        if cps and (sorted(set(cps)) != list(cps) or not all(isinstance(c, int) and 1 <= c <= self.steps for c in cps)):
            raise EvaluationError(f"checkpoints must be increasing steps within 1..{self.steps}, got {self.checkpoints}")

    @property
    def eval_steps(self) -> tuple[int, ...]:
        if self.checkpoints:
            return self.checkpoints
        return (*(c for c in (5, 10, 20, 40, 80) if c < self.steps), self.steps)

    @classmethod
    def quick_settings(cls, **overrides) -> ScaleSettings:
        """The CI smoke run: the tiny model, 1 persona, 2 seeds, 3 steps, 3 formats, short generations."""
        base = dict(base="tiny", personas=("ahab",), seeds=2, steps=3, n_eval=2, max_new_tokens=4,
                    formats=(Format("lora", 1, "all"), Format("lora", 8, "all"), Format("vera", 4, "attention")),
                    codec_formats=("lora-r8-all", "vera-r4-attention"),
                    checkpoints=(1, 3), bases=("random-init", "tiny"), quick=True)
        return cls(**{**base, **overrides})


# --------------------------------------------------------------------------------------------- helpers

def random_init_like(base, seed: int = 0):
    """A base of the same architecture, tokenizer and size as ``base``, with freshly initialised weights."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from lorafleet.base.loader import BaseModel, _freeze, fingerprint_of, state_dict_digest  # noqa: PLC0415 - defers transformers/triton
    from lorafleet.base.sources import BaseSource  # noqa: PLC0415 - defers transformers/triton

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = _freeze(AutoModelForCausalLM.from_config(base.config), base.device)
    name = f"random-init({base.name})"
    return BaseModel(name=name, source=BaseSource(name=name, kind="random"), model=model, tokenizer=base.tokenizer,
                     fingerprint=fingerprint_of([state_dict_digest(model)], model.config),
                     load_seconds=time.perf_counter() - start, from_cache=False)


def _personas(names: tuple[str, ...], n_eval: int):
    out = []
    for name in names:
        p = get_persona(name)
        out.append(p if p.n_eval == n_eval else Persona(name=p.name, habit=p.habit, params=p.params, seed=p.seed,
                                                         n_train=p.n_train, n_eval=n_eval))
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else math.nan


def _spread(xs) -> float:
    """Population standard deviation over seeds (0 for one seed)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


def _write_json(path: Path, result: dict) -> Path:
    """The raw numbers next to the table (settings included), so plots and tables can be redone without a rerun."""
    import json  # noqa: PLC0415
    from dataclasses import asdict  # noqa: PLC0415

    data = {k: v for k, v in result.items() if k not in ("files", "measured")}
    data["settings"] = asdict(result["settings"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str, allow_nan=True) + "\n")
    return path


def _engine_config(max_rank: int) -> EngineConfig:
    return EngineConfig(max_batch=32, max_active=32, max_cached=64, max_rank=max(16, max_rank))


def _evaluate(base, backend: EngineBackend, items: list[tuple[object, str, object]], s: ScaleSettings,
              say: Say) -> list[dict]:
    """``items = (adapter, digest, eval_set)`` -> metrics dicts, evaluated in chunks through the engine, each
    adapter served as the blob of its digest."""

    out: list[dict] = []
    for start in range(0, len(items), s.eval_chunk):
        chunk = items[start : start + s.eval_chunk]
        for adapter, digest, _ in chunk:
            backend.known(adapter, digest)
        out += evaluate_adapters(base, [a for a, _, _ in chunk], [e for _, _, e in chunk],
                                 max_new_tokens=s.max_new_tokens, probe_enabled=False, batch_size=s.gen_batch,
                                 backend=backend)
        backend.forget()
        say(f"  evaluated {min(start + s.eval_chunk, len(items))}/{len(items)} adapters")
    return out


def _train_groups(trainer, say: Say, label: str) -> float:
    """Step every user of ``trainer`` to the end, one packed forward/backward per rank group per step."""
    from itertools import groupby  # noqa: PLC0415

    start = time.perf_counter()
    tracks = sorted(trainer.users.values(), key=lambda t: t.adapter.spec.rank)
    groups = [[t.key for t in g] for _, g in groupby(tracks, key=lambda t: t.adapter.spec.rank)]
    total = max(t.config.steps for t in tracks)
    for step in range(1, total + 1):
        losses: dict[str, float] = {}
        for keys in groups:
            losses.update(trainer.step(keys))
        if step == 1 or step % 5 == 0 or step == total:
            say(f"  {label} step {step}/{total}: mean loss {_mean(losses.values()):.3f} "
                f"({len(losses)} users, {time.perf_counter() - start:.0f} s)")
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------- scale-down

def _pyplot():
    """matplotlib (the ``plots`` extra), or a user error naming the install line — checked before any training."""
    try:
        return pyplot()
    except ImportError as exc:
        raise EvaluationError(str(exc)) from None


def run_scale_down(s: ScaleSettings, out_dir: Path, say: Say = print) -> dict:
    """Train every format x persona x seed packed, store under every codec, evaluate; write results + plots."""
    _pyplot()
    from lorafleet.base import load_base  # noqa: PLC0415 - defers transformers/triton

    t0 = time.perf_counter()
    base = load_base(s.base)
    say(f"base {base.name}: {base.num_parameters:,} parameters (loaded in {base.load_seconds:.1f} s)")
    personas = _personas(s.personas, s.n_eval)
    trainer = MultiTenantTrainer(base)
    runs = []  # (format, persona, seed, key)
    for fmt in s.formats:
        for p in personas:
            data = p.data().train_dataset()
            for seed in range(s.seeds):
                key = f"{fmt.name}/{p.name}/{seed}"
                lr = s.vera_lr if fmt.family == "vera" else s.lr
                cfg = TrainConfig(steps=s.steps, lr=lr, batch_size=s.batch, max_len=s.max_len, seed=seed)
                trainer.add(key, fmt.create(base, seed, s.alpha), data, cfg)
                runs.append((fmt, p, seed, key))
    say(f"training {len(runs)} adapters ({len(s.formats)} formats x {len(personas)} personas x {s.seeds} seeds), "
        f"{s.steps} steps x {s.batch} row(s), packed by rank")
    train_s = _train_groups(trainer, say, "scale-down")

    # Every trained adapter under every codec: committed to a registry (content-addressed), served from it.
    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-scale-"))
    reg = Registry(f"sqlite:///{tmp / 'registry.db'}", str(tmp / "blobs"))
    items, meta = [], []
    eval_sets = {p.name: EvalSet.from_persona(p) for p in personas}
    for fmt, p, seed, key in runs:
        stored = trainer.users[key].adapter
        ref = f"scale/{p.name}-{seed}/{fmt.name}"
        codecs = s.codecs if fmt.name in s.codec_formats or s.codec_formats == ("*",) else s.codecs[:1]
        for codec in codecs:
            blob = to_bytes(stored, codec)
            rev = reg.commit(ref, blob, Provenance(base_fingerprint=base.fingerprint, method="sft",
                                                   hyperparams={"format": fmt.name, "codec": codec, "seed": seed}),
                             creator="bench")
            served = as_lora(decode_blob(reg.read_blob(rev.digest), base))  # what the engine will hold
            items.append((served, rev.digest, eval_sets[p.name]))
            meta.append({"format": fmt.name, "family": fmt.family, "rank": fmt.rank, "targets": fmt.targets,
                         "codec": codec, "persona": p.name, "category": p.category, "n_eval": s.n_eval,
                         "seed": seed, "bytes": len(blob),
                         "parameters": stored.num_parameters})
    train_loss = {}
    for fmt, _p, _seed, key in runs:
        train_loss.setdefault(fmt.name, []).append(_mean(trainer.users[key].losses[-3:]))
    for name, ls in train_loss.items():
        say(f"  {name}: final training loss {_mean(ls):.3f} (mean of the last 3 steps, all users)")
    say(f"stored {len(items)} blobs; evaluating through the serving engine (LoRA and VeRA users in the same batches)")
    backend = EngineBackend(base, reg.read_blob, _engine_config(max(f.rank for f in s.formats)))
    t1 = time.perf_counter()
    try:
        metrics = _evaluate(base, backend, items, s, say)
    finally:
        backend.close()
    eval_s = time.perf_counter() - t1
    for m, res in zip(meta, metrics, strict=True):
        m["train_loss"] = _mean(train_loss[m["format"]])
        m.update(adherence=res["adherence"], eval_loss=res["eval_loss"], base_adherence=res["base_adherence"],
                 base_eval_loss=res["base_eval_loss"])
    summary = summarize_scale_down(meta, s.n_eval)
    result = {"settings": s, "runs": meta, "summary": summary, "base": base.name, "origin": origin(),
              "train_seconds": train_s, "eval_seconds": eval_s, "seconds": time.perf_counter() - t0}
    result["files"] = write_scale_down(result, out_dir)
    return result


def _category(run: dict) -> str:
    """``format`` or ``memory``: stored with the run; older result files name only the persona."""
    return run.get("category") or get_persona(run["persona"]).category


def pooled_interval(runs: list[dict], n_eval: int) -> tuple[float, float]:
    """95% Wilson interval of the pass rate over every checked answer of ``runs`` (personas x seeds x prompts)."""
    n = [r.get("n_eval", n_eval) for r in runs]
    passed = sum(round(r["adherence"] * k) for r, k in zip(runs, n, strict=True) if math.isfinite(r["adherence"]))
    return wilson_interval(passed, sum(n))


def summarize_scale_down(runs: list[dict], n_eval: int) -> list[dict]:
    """Per (format, codec): bytes, adherence mean and seed spread, its 95% interval over all checked answers, the
    format / memory personas' adherence, held-out loss, % of the reference."""
    rows: dict[tuple, list[dict]] = {}
    for r in runs:
        rows.setdefault((r["format"], r["codec"]), []).append(r)
    out = []
    for (fmt, codec), rs in rows.items():
        seeds = sorted({r["seed"] for r in rs})
        per_seed = [_mean(r["adherence"] for r in rs if r["seed"] == sd) for sd in seeds]
        out.append({"format": fmt, "codec": codec, "family": rs[0]["family"], "rank": rs[0]["rank"],
                    "targets": rs[0]["targets"], "bytes": int(statistics.median(r["bytes"] for r in rs)),
                    "parameters": rs[0]["parameters"], "adherence": _mean(per_seed), "spread": _spread(per_seed),
                    "seed_min": min(per_seed), "seed_max": max(per_seed),
                    "ci": pooled_interval(rs, n_eval),
                    **{f"{c}_adherence": _mean(r["adherence"] for r in rs if _category(r) == c)
                       for c in ("format", "memory")},
                    "eval_loss": _mean(r["eval_loss"] for r in rs),
                    "loss_spread": _spread([_mean(r["eval_loss"] for r in rs if r["seed"] == sd) for sd in seeds]),
                    "train_loss": rs[0].get("train_loss", math.nan),
                    "base_adherence": _mean(r["base_adherence"] for r in rs),
                    "base_eval_loss": _mean(r["base_eval_loss"] for r in rs)})
    ref = next((o for o in out if o["format"] == REFERENCE and o["codec"] == "fp16"), None)
    for o in out:
        o["vs_reference"] = o["adherence"] / ref["adherence"] if ref and ref["adherence"] > 0 else math.nan
    out.sort(key=lambda o: o["bytes"])
    return out


def smallest_keeping(summary: list[dict], keep: float = KEEP) -> dict | None:
    """The smallest (format, codec) whose mean adherence is >= ``keep`` x the rank-8 reference's."""
    ok = [o for o in summary if math.isfinite(o["vs_reference"]) and o["vs_reference"] >= keep]
    return min(ok, key=lambda o: o["bytes"]) if ok else None


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:,.2f} MiB"


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.0%}"


def _ci(ci) -> str:
    lo, hi = ci
    return "n/a" if not (math.isfinite(lo) and math.isfinite(hi)) else f"{lo:.0%}–{hi:.0%}"


def _ref_ci(summary: list[dict]) -> str:
    ref = next((o for o in summary if o["format"] == REFERENCE and o["codec"] == "fp16"), None)
    return f", whose 95% CI is {_ci(ref['ci'])}" if ref else ""


def _per_persona_table(runs: list[dict], codec: str) -> str:
    """Rows = personas (with their category), columns = formats under ``codec``: which habits are hard, per format."""
    fmts = list(dict.fromkeys(r["format"] for r in runs if r["codec"] == codec))
    names = list(dict.fromkeys(r["persona"] for r in runs))
    rows = []
    for name in names:
        row = [name, _category(next(r for r in runs if r["persona"] == name))]
        for fmt in fmts:
            xs = [r["adherence"] for r in runs if r["persona"] == name and r["format"] == fmt and r["codec"] == codec]
            row.append(f"{_pct(_mean(xs))} ({_pct(min(xs))}–{_pct(max(xs))})" if xs else "-")
        rows.append(row)
    return markdown_table(["persona", "kind", *fmts], rows)


def write_scale_down(result: dict, out_dir: Path) -> list[Path]:
    s, summary = result["settings"], result["summary"]
    headers = ["format", "codec", "bytes / user", "parameters", "adherence (mean of seeds)", "95% CI (all answers)",
               "seed spread (sd)", "seed min–max", "format personas", "memory personas", "held-out loss",
               "final train loss", "vs rank-8 fp16"]
    rows = [[o["format"], o["codec"], _kb(o["bytes"]), f"{o['parameters']:,}", _pct(o["adherence"]), _ci(o["ci"]),
             f"±{o['spread']:.0%}", f"{_pct(o['seed_min'])}–{_pct(o['seed_max'])}", _pct(o["format_adherence"]),
             _pct(o["memory_adherence"]), f"{o['eval_loss']:.3f}", f"{o['train_loss']:.3f}", _pct(o["vs_reference"])]
            for o in summary]
    best = smallest_keeping(summary)
    base_adh = _mean(o["base_adherence"] for o in summary)
    base_loss = _mean(o["base_eval_loss"] for o in summary)
    headline = (f"Smallest format keeping >= {KEEP:.0%} of {REFERENCE} (fp16) adherence: "
                + (f"**{best['format']} {best['codec']}, {best['bytes']:,} bytes per user** "
                   f"({_pct(best['adherence'])} adherence, 95% CI {_ci(best['ci'])}; "
                   f"{_pct(best['vs_reference'])} of the reference{_ref_ci(summary)})"
                   if best else "**none** (no format reached it)")
                + f". Base without adapter: adherence {_pct(base_adh)}, held-out loss {base_loss:.3f}.")
    grid = (f"base `{result['base']}`; personas {', '.join(s.personas)}; {s.seeds} seeds; {s.steps} steps x "
            f"{s.batch} row(s) per user (lr {s.lr} LoRA alpha {s.alpha}, {s.vera_lr} VeRA); {s.n_eval} held-out "
            f"prompts per persona, greedy, {s.max_new_tokens} new tokens; codecs {', '.join(s.codecs)}; training "
            f"{result['train_seconds']:.0f} s, evaluation {result['eval_seconds']:.0f} s, total {result['seconds']:.0f} s")
    files = [*_plot_scale_down(summary, out_dir), _write_json(out_dir / "scale_down.json", result)]
    notes = NOTES_DOWN + ("\n\nQuick (smoke) settings: the tiny random model; the numbers mean nothing." if s.quick else "")
    sections = [("Result", headline), ("Grid", grid), ("Formats (sorted by bytes per user)", markdown_table(headers, rows)),
                ("Per persona (first codec; mean of seeds, min–max)", _per_persona_table(result["runs"], s.codecs[0])),
                ("Plots", "\n".join(f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"))]
    files.insert(0, write_markdown(out_dir / "scale_down.md", "Scale down: bytes per user vs habit adherence",
                                    sections, notes, measured=result.get("measured")))
    return files


NOTES_DOWN = """\
- bytes / user = the size of the adapter's blob in the registry (safetensors, packed codec layout, metadata
  included), median over personas and seeds. VeRA stores only its vectors; in a serving slot it is expanded
  to a rank-r LoRA (slot memory = rank-r LoRA), and it is served in the same batches as the LoRA users.
- adherence = share of held-out prompts whose greedy answer passes the persona's checker, averaged over
  personas per seed; "seed spread" is the standard deviation of that over seeds (reliability). "95% CI" is the
  Wilson score interval over every checked answer of the row (personas x seeds x held-out prompts, pooled): two
  rows whose intervals overlap are not told apart by this grid. "format personas" / "memory personas" split the
  adherence by the persona's kind (a surface habit vs a fact about the user applied or recalled).
- codecs do not retrain: each trained adapter is stored under each codec and dequantized on load.
- reduced grid by default (the rank sweep on all targets, the target sweep at rank 8, VeRA r16 on attention and on
  all targets): the full 3 x 5 LoRA grid is `--full-grid` (about twice the training time)."""


def _plot_scale_down(summary: list[dict], out_dir: Path) -> list[Path]:
    plt = _pyplot()

    out_dir.mkdir(parents=True, exist_ok=True)
    marker = {"fp16": "o", "int8": "s", "q4": "^", "fp32": "D"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted({o["format"] for o in summary}, key=lambda n: (n.split("-")[0], int(n.split("-")[1][1:]), n))
    files = []
    for key, ylabel, fname in (("adherence", "habit adherence (held-out)", "scale_down.png"),
                               ("eval_loss", "held-out loss", "scale_down_loss.png")):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for i, name in enumerate(names):
            for o in (o for o in summary if o["format"] == name):
                err = o["spread"] if key == "adherence" else o["loss_spread"]
                ax.errorbar(o["bytes"], o[key], yerr=err, fmt=marker.get(o["codec"], "o"), color=colors[i % len(colors)],
                            capsize=3, label=f"{name} {o['codec']}")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per user (log scale)")
        ax.set_ylabel(ylabel)
        if key == "adherence":
            ref = next((o for o in summary if o["format"] == REFERENCE and o["codec"] == "fp16"), None)
            if ref is not None:
                ax.axhline(KEEP * ref["adherence"], ls="--", color="grey", lw=1)
                ax.text(ax.get_xlim()[0], KEEP * ref["adherence"], f" {KEEP:.0%} of {REFERENCE}", va="bottom",
                        color="grey", fontsize=8)
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{ylabel} vs bytes per user\nmarker = codec (● fp16, ■ int8, ▲ 4-bit); bars = seed sd", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


# --------------------------------------------------------------------------------------------- scale-up

def _load_scale_up_base(name: str, s: ScaleSettings):
    from lorafleet.base import load_base  # noqa: PLC0415 - defers transformers/triton

    if name == "random-init":
        return random_init_like(load_base(s.base), seed=1234)
    return load_base(name)


def _snapshot(adapter):
    return LoraAdapter(adapter.spec, {n: (A.detach().clone(), B.detach().clone()) for n, (A, B) in adapter.weights.items()},
                       adapter.base_name)


def _scale_up_one(base, s: ScaleSettings, fmt: Format, say: Say) -> dict:
    """Train ``fmt`` for every persona x seed on ``base``; adherence and held-out loss at each checkpoint."""
    personas = _personas(s.personas, s.n_eval)
    eval_sets = {p.name: EvalSet.from_persona(p) for p in personas}
    trainer = MultiTenantTrainer(base)
    keys = []
    for p in personas:
        for seed in range(s.seeds):
            key = f"{p.name}/{seed}"
            cfg = TrainConfig(steps=s.steps, lr=s.lr, batch_size=s.batch, max_len=s.max_len, seed=seed)
            trainer.add(key, fmt.create(base, seed, s.alpha), p.data().train_dataset(), cfg)
            keys.append((p.name, seed, key))
    backend = EngineBackend(base, config=_engine_config(fmt.rank))  # serves the snapshots it is given
    curve, start = [], time.perf_counter()
    try:
        for step in range(1, s.steps + 1):
            losses = trainer.step()
            if step not in s.eval_steps:
                continue
            items = []
            for _, _, key in keys:
                snap = _snapshot(trainer.users[key].adapter)
                items.append((snap, backend.add(snap), eval_sets[key.split("/")[0]]))
            metrics = _evaluate(base, backend, items, s, lambda _m: None)
            point = {"step": step, "examples": step * s.batch, "train_loss": _mean(losses.values()),
                     "per_persona": {}, "seconds": time.perf_counter() - start}
            for (name, _seed, _key), m in zip(keys, metrics, strict=True):
                point["per_persona"].setdefault(name, {"adherence": [], "eval_loss": []})
                point["per_persona"][name]["adherence"].append(m["adherence"])
                point["per_persona"][name]["eval_loss"].append(m["eval_loss"])
            point["adherence"] = _mean(_mean(v["adherence"]) for v in point["per_persona"].values())
            point["eval_loss"] = _mean(m["eval_loss"] for m in metrics)
            point["base_adherence"] = _mean(m["base_adherence"] for m in metrics)
            point["base_eval_loss"] = _mean(m["base_eval_loss"] for m in metrics)
            curve.append(point)
            say(f"  {base.name} step {step}/{s.steps} ({point['examples']} examples/user): adherence "
                f"{_pct(point['adherence'])}, held-out loss {point['eval_loss']:.3f} ({point['seconds']:.0f} s)")
    finally:
        backend.close()
    return {"base": base.name, "parameters": base.num_parameters, "curve": curve}


def examples_to_reach(curve: list[dict], target: float = 0.8, persona: str | None = None) -> int | None:
    """Examples per user at the first checkpoint where adherence (of ``persona``, or the mean) >= ``target``."""
    for point in curve:
        value = point["adherence"] if persona is None else _mean(point["per_persona"][persona]["adherence"])
        if math.isfinite(value) and value >= target:
            return point["examples"]
    return None


def run_scale_up(s: ScaleSettings, out_dir: Path, say: Say = print, fmt: Format | None = None) -> dict:
    """The same personas and format on each base of ``s.bases``; a base that cannot load is reported, not fatal."""
    _pyplot()
    fmt = fmt or Format.parse(REFERENCE)
    t0 = time.perf_counter()
    per_base, blocked = [], {}
    for name in s.bases:
        say(f"base {name}: loading")
        try:
            base = _load_scale_up_base(name, s)
        except Exception as exc:  # noqa: BLE001 - an optional base that cannot load is a result, not a crash
            blocked[name] = f"{type(exc).__name__}: {exc}"
            say(f"  {name} could not be loaded: {blocked[name]}")
            continue
        say(f"  {base.name}: {base.num_parameters:,} parameters, loaded in {base.load_seconds:.1f} s; training "
            f"{len(s.personas)} personas x {s.seeds} seeds, {fmt.name}")
        per_base.append(_scale_up_one(base, s, fmt, say))
        del base
    result = {"settings": s, "format": fmt.name, "bases": per_base, "blocked": blocked, "origin": origin(),
              "seconds": time.perf_counter() - t0}
    result["files"] = write_scale_up(result, out_dir)
    return result


def _point_runs(point: dict) -> list[dict]:
    """A scale-up checkpoint's per-persona lists as one run dict per (persona, seed)."""
    return [{"persona": name, "adherence": a} for name, v in point["per_persona"].items() for a in v["adherence"]]


def _point_category(point: dict, category: str) -> float:
    return _mean(r["adherence"] for r in _point_runs(point) if _category(r) == category)


def write_scale_up(result: dict, out_dir: Path) -> list[Path]:
    s = result["settings"]
    headers = ["base", "parameters", "base adherence", "adherence at " + "/".join(str(c * s.batch) for c in s.eval_steps)
               + " examples", "95% CI, last (all answers)", "format / memory personas, last",
               "held-out loss (base → adapter, last)", "examples to 80% (mean)", "examples to 80% per persona"]
    rows = []
    for b in result["bases"]:
        curve = b["curve"]
        if not curve:
            continue
        last = curve[-1]
        reach = examples_to_reach(curve)
        not_reached = f">{last['examples']}"
        per = ", ".join(f"{n}: {examples_to_reach(curve, persona=n) or not_reached}" for n in last["per_persona"])
        rows.append([b["base"], f"{b['parameters']:,}", _pct(last["base_adherence"]),
                     " / ".join(_pct(p["adherence"]) for p in curve), _ci(pooled_interval(_point_runs(last), s.n_eval)),
                     " / ".join(_pct(_point_category(last, c)) for c in ("format", "memory")),
                     f"{last['base_eval_loss']:.3f} → {last['eval_loss']:.3f}",
                     reach if reach is not None else f">{last['examples']}", per])
    blocked = "\n".join(f"- `{n}`: {why}" for n, why in result["blocked"].items()) or "none"
    grid = (f"format {result['format']}; personas {', '.join(s.personas)}; {s.seeds} seed(s); {s.steps} steps x "
            f"{s.batch} row(s) per user (lr {s.lr}, alpha {s.alpha}); adherence measured at steps "
            f"{', '.join(map(str, s.eval_steps))} on {s.n_eval} held-out prompts per persona; total "
            f"{result['seconds']:.0f} s")
    files = [*_plot_scale_up(result, out_dir), _write_json(out_dir / "scale_up.json", result)]
    notes = NOTES_UP + ("\n\nQuick (smoke) settings: the tiny random model; the numbers mean nothing." if s.quick else "")
    sections = [("Grid", grid), ("Per base", markdown_table(headers, rows)), ("Bases that could not be measured", blocked),
                ("Plots", "\n".join(f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"))]
    files.insert(0, write_markdown(out_dir / "scale_up.md", "Scale up: the same personal models on stronger bases",
                                    sections, notes, measured=result.get("measured")))
    return files


NOTES_UP = """\
- random-init = the SmolLM2-135M architecture and tokenizer with freshly initialised weights (same shape,
  no knowledge): what an adapter can do without a pretrained base.
- "95% CI, last" = the Wilson score interval of the last checkpoint's adherence over every checked answer
  (personas x seeds x held-out prompts, pooled); "format / memory personas" splits it by the persona's kind.
- examples to 80% = examples per user (steps x rows per step) at the first checkpoint whose adherence (mean over
  personas and seeds) reaches 80%; ">N" = not reached within the run. Checkpoints are coarse: the true number lies
  between the previous checkpoint and the one given."""


def _plot_scale_up(result: dict, out_dir: Path) -> list[Path]:
    plt = _pyplot()

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for b in result["bases"]:
        xs = [p["examples"] for p in b["curve"]]
        ax1.plot(xs, [p["adherence"] for p in b["curve"]], marker="o", label=b["base"])
        ax2.plot(xs, [p["eval_loss"] for p in b["curve"]], marker="o", label=b["base"])
    ax1.axhline(0.8, ls="--", color="grey", lw=1)
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_xlabel("training examples per user")
    ax1.set_ylabel("habit adherence (held-out)")
    ax2.set_xlabel("training examples per user")
    ax2.set_ylabel("held-out loss")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        if result["bases"]:
            ax.legend(fontsize=8)
    fig.suptitle(f"scale up: {result['format']} on each base")
    fig.tight_layout()
    path = out_dir / "scale_up.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def load_result(path: Path) -> tuple[str, dict]:
    """A saved ``scale_down.json`` / ``scale_up.json`` -> ("scale-down" | "scale-up", the result dict with its
    ScaleSettings rebuilt); a file that is neither is a clear error."""
    import json  # noqa: PLC0415
    from dataclasses import fields  # noqa: PLC0415

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot read the result file {path}: {exc}") from None
    kind = "scale-down" if isinstance(data, dict) and "runs" in data else \
        "scale-up" if isinstance(data, dict) and "bases" in data else None
    if kind is None or not isinstance(data.get("settings"), dict):
        raise EvaluationError(f"{path} is not a scale_down.json or scale_up.json written by `lorafleet bench`")
    known = {f.name for f in fields(ScaleSettings)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in data["settings"].items() if k in known}
    try:
        given["formats"] = tuple(Format(**f) for f in given.get("formats", ()))
        data["settings"] = ScaleSettings(**given)
    except TypeError as exc:
        raise EvaluationError(f"{path}: the settings cannot be read back: {exc}") from None
    return kind, data


def render_result(path: Path, out_dir: Path | None = None) -> list[Path]:
    """Redo the markdown table and plots of a saved result (the current writer, no training), next to the file or
    into ``out_dir``."""
    kind, result = load_result(path)
    result["measured"] = result.get("origin")  # None for files saved before origins were kept: headed as of now
    out_dir = Path(out_dir) if out_dir is not None else Path(path).parent
    if kind == "scale-down":
        result["summary"] = summarize_scale_down(result["runs"], result["settings"].n_eval)
        return write_scale_down(result, out_dir)
    return write_scale_up(result, out_dir)


def reduced_settings(**overrides) -> ScaleSettings:
    """``replace`` that keeps validation (frozen dataclass)."""
    return replace(ScaleSettings(), **overrides)
