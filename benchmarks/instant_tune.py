"""Instant personal models: pick the generator's components and gain on corpus personas held out of the fit.

    python benchmarks/instant_tune.py           # SmolLM2: reads the corpus benchmarks/instant.py built (cached)
    python benchmarks/instant_tune.py --quick   # the tiny random model: plumbing only

The ridge fit minimises squared error over the whole weight vector, most of which is per-user noise the profile
cannot predict, so its predictions are shrunk toward the corpus mean and show fewer habits than the adapters they
imitate. This script fits generators on the corpus minus ``--val`` multi-habit corpus personas and measures, on those
personas only (never on benchmarks/instant.py's held-out users), the generated adapters' strict and habit-level
adherence for each (components, gain), next to the trained corpus adapters themselves. The defaults in
``lorafleet.instant.generator`` (DEFAULT_COMPONENTS, DEFAULT_GAIN) come from this table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few personas")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--corpus", type=int, default=200, help="corpus personas (as benchmarks/instant.py)")
    parser.add_argument("--val", type=int, default=24, help="multi-habit corpus personas held out of the fit")
    parser.add_argument("--n-eval", type=int, default=4, help="held-out prompts per validation persona")
    parser.add_argument("--components", default="16,32,63")
    parser.add_argument("--gains", default="1,1.5,2,2.5,3")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--cache", default=None, help="corpus cache (default $LORAFLEET_HOME/instant-corpus)")
    parser.add_argument("--out", default=None, help="result file (default docs/results/instant_tune[_quick].md)")
    args = parser.parse_args(argv)
    cfg_over = {}
    if args.quick:
        args.base, args.corpus, args.val, args.n_eval, args.components, args.gains = "tiny", 8, 3, 1, "2,4", "1,2"
        args.max_new_tokens = 4
        cfg_over = {"steps": 1, "pack": 8, "n_train": 4, "k": 1, "max_len": 192}

    import torch
    from _common import RESULTS, console, markdown_table, show, write_markdown

    from lorafleet.base import load_base
    from lorafleet.config import Settings, quiet_libraries
    from lorafleet.evaluation.engine_backend import EngineBackend
    from lorafleet.evaluation.generation import generate_responses
    from lorafleet.instant import DEFAULT_SPEC, CorpusConfig, build_corpus, fit_generator, split_family
    from lorafleet.instant.generator import unflatten
    from lorafleet.serving.params import EngineConfig

    quiet_libraries()
    t_all = time.perf_counter()
    base = load_base(args.base)
    personas, _ = split_family(args.corpus, 12 if not args.quick else 2, seed=0)  # the same corpus as instant.py
    cfg = CorpusConfig.with_options(DEFAULT_SPEC, **cfg_over)
    cache = Path(args.cache) if args.cache else Settings.from_env().data_dir / "instant-corpus"
    corpus = build_corpus(base, personas, cfg, cache, say=console.print)
    multi = [i for i, p in enumerate(personas) if p.habits >= 2]
    val = multi[-args.val:]
    X, T, groups = corpus.rows()
    fit_rows = torch.nonzero(~torch.isin(groups, torch.tensor(val))).squeeze(1)
    vp = [personas[i] for i in val]
    vx = corpus.features[torch.tensor([2 * i for i in val])]  # row 2i: the description alone, the harder profile
    engine = EngineConfig(max_batch=64, max_active=64, max_cached=256, max_rank=DEFAULT_SPEC.rank,
                          max_prefill_tokens=4096)

    with EngineBackend(base, config=engine) as backend:
        def adherence(adapters) -> tuple[float, float]:
            prompts, ads, owner = [], [], []
            for i, (p, a) in enumerate(zip(vp, adapters, strict=True)):
                evals = p.data(cfg.n_train)[1][: args.n_eval]
                prompts += [[{"role": "user", "content": r["messages"][0]["content"]}] for r in evals]
                ads += [a] * len(evals)
                owner += [i] * len(evals)
            res = generate_responses(base, prompts, ads, max_new_tokens=args.max_new_tokens, batch_size=128,
                                     backend=backend)
            per = [[r for r, o in zip(res, owner, strict=True) if o == i] for i in range(len(vp))]
            return (statistics.mean(statistics.mean(p.check(r) for r in rs) for p, rs in zip(vp, per, strict=True)),
                    statistics.mean(statistics.mean(p.component_rate(r) for r in rs)
                                    for p, rs in zip(vp, per, strict=True)))

        trained = adherence([unflatten(corpus.thetas[i], corpus.layout, DEFAULT_SPEC) for i in val])
        rows = [["trained corpus adapters", "-", "-", "-", f"{trained[0]:.0%}", f"{trained[1]:.0%}", "100%"]]
        best = None
        for h in (int(x) for x in args.components.split(",")):
            gen = fit_generator(X[fit_rows], T[fit_rows], spec=DEFAULT_SPEC, layout=corpus.layout,
                                base_fingerprint=base.fingerprint, corpus_digest=corpus.digest, components=h,
                                groups=groups[fit_rows])
            pred = gen.predict(vx)
            rel = float(((pred - corpus.thetas[val]).pow(2).sum(1)
                         / (gen.mean - corpus.thetas[val]).pow(2).sum(1)).mean())
            for gain in (float(x) for x in args.gains.split(",")):
                theta = gen.mean + gain * (pred - gen.mean)
                s, c = adherence([unflatten(t, corpus.layout, DEFAULT_SPEC) for t in theta])
                rows.append(["generated (description)", str(gen.components), str(gen.info["lambda"]), f"{gain:g}",
                             f"{s:.0%}", f"{c:.0%}", f"{s / trained[0]:.0%}" if trained[0] else "-"])
                console.print(f"H={gen.components} gain={gain:g}: strict {s:.0%}, habit-level {c:.0%} "
                              f"(relative weight error {rel:.3f})")
                if best is None or s > best[0]:
                    best = (s, gen.components, gain)
    headers = ["adapters", "components", "lambda", "gain", "strict adherence", "habit-level", "of trained (strict)"]
    show("validation corpus personas", headers, rows)
    verdict = (f"best: {best[1]} components, gain {best[2]:g} ({best[0]:.0%} strict vs {trained[0]:.0%} for the "
               "trained adapters)")
    console.print(verdict)
    out = Path(args.out) if args.out else RESULTS / ("instant_tune_quick.md" if args.quick else "instant_tune.md")
    setup = (f"base `{base.name}`; corpus {len(personas)} personas (digest `{corpus.digest[:16]}…`, the corpus of "
             f"benchmarks/instant.py); {len(val)} multi-habit corpus personas held out of every fit here, "
             f"{args.n_eval} held-out prompts each, greedy, {args.max_new_tokens} new tokens, through the serving "
             f"engine; generators fitted on the other {len(personas) - len(val)} personas (both profile rows), lambda "
             f"picked by the fit's own persona-grouped validation; generated from the description alone; total "
             f"{time.perf_counter() - t_all:.0f} s")
    write_markdown(out, "Instant personal models: tuning the generator on corpus personas", [
        ("Setup", setup), ("Result", markdown_table(headers, rows)), ("Verdict", verdict)],
        notes="Strict = every habit of the persona shows in the answer; habit-level = share of its habits shown. "
              "The benchmark's held-out users (benchmarks/instant.py) are never used here.")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
