"""``lorafleet bench scale-down`` / ``scale-up``: the smoke runs CI does (tiny model, seconds), the summary logic,
and bad input refused with exit code 2."""

from __future__ import annotations

import math
import sys

import pytest
from typer.testing import CliRunner

from lorafleet.bench.scale import Format, ScaleSettings, examples_to_reach, smallest_keeping, summarize_scale_down
from lorafleet.cli import app
from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.metrics import wilson_interval

runner = CliRunner()


def test_scale_down_smoke(tmp_path):
    out = tmp_path / "down"
    res = runner.invoke(app, ["bench", "scale-down", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = (out / "scale_down.md").read_text()
    for name in ("lora-r1-all", "lora-r8-all", "vera-r4-attention"):
        assert f"| {name} | fp16 |" in text
    assert "| vera-r4-attention | q4 |" in text and "| lora-r1-all | q4 |" not in text  # codecs on chosen formats
    for png in ("scale_down.png", "scale_down_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_scale_up_smoke(tmp_path):
    out = tmp_path / "up"
    res = runner.invoke(app, ["bench", "scale-up", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = (out / "scale_up.md").read_text()
    assert "| random-init(tiny-llama:0) |" in text and "| tiny-llama:0 |" in text
    assert (out / "scale_up.png").read_bytes()[:4] == b"\x89PNG"


def test_a_base_that_cannot_load_is_reported_not_fatal(tmp_path):
    res = runner.invoke(app, ["bench", "scale-up", "--quick", "--bases", "/nonexistent/model.gguf",
                              "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "/nonexistent/model.gguf" in (tmp_path / "scale_up.md").read_text().split("could not be measured")[1]


@pytest.mark.parametrize(("args", "match"), [
    (["scale-down", "--quick", "--formats", "lora-8-all"], "FAMILY-rRANK-TARGETS"),
    (["scale-down", "--quick", "--codecs", "int3"], "unknown codec"),
    (["scale-down", "--quick", "--seeds", "0"], "seeds must be"),
    (["scale-down", "--quick", "--personas", "nobody"], "nobody"),
    (["scale-up", "--quick", "--checkpoints", "3,1"], "checkpoints must be increasing"),
    (["scale-up", "--quick", "--checkpoints", "a"], "comma list"),
])
def test_bad_input_exits_2_with_the_reason(args, match, tmp_path):
    res = runner.invoke(app, ["bench", *args, "--out", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert match in res.output
    assert not any(tmp_path.iterdir())  # nothing written


def test_without_matplotlib_it_stops_before_training_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the optional `plots` extra not installed
    for command in ("scale-down", "scale-up"):
        res = runner.invoke(app, ["bench", command, "--quick", "--out", str(tmp_path)])
        assert res.exit_code == 2, res.output
        assert "pip install 'lorafleet[plots]'" in res.output
    assert not any(tmp_path.iterdir())


def test_format_parse_round_trips():
    for text in ("lora-r1-all", "lora-r16-mlp", "vera-r16-attention"):
        assert Format.parse(text).name == text
    with pytest.raises(EvaluationError):
        Format.parse("ia3-r1-all")


def _run(fmt, codec, seed, adherence, nbytes, persona="p", category="format"):
    family, rank, targets = fmt.split("-")
    return {"format": fmt, "family": family, "rank": int(rank[1:]), "targets": targets, "codec": codec,
            "persona": persona, "category": category, "seed": seed, "bytes": nbytes, "parameters": nbytes // 2, "adherence": adherence,
            "eval_loss": 1.0, "base_adherence": 0.0, "base_eval_loss": 2.0}


def test_smallest_format_keeping_90_percent_of_rank_8():
    runs = [_run("lora-r8-all", "fp16", s, a, 1000) for s, a in enumerate((1.0, 0.8, 0.9))]  # mean 0.9
    runs += [_run("lora-r1-all", "q4", s, a, 100) for s, a in enumerate((0.9, 0.8, 0.7))]  # 0.8 = 89%: not kept
    runs += [_run("lora-r1-all", "int8", s, a, 200) for s, a in enumerate((0.9, 0.8, 0.8))]  # 0.833 = 93%: kept
    runs += [_run("vera-r16-attention", "fp16", s, 0.0, 50) for s in range(3)]
    summary = summarize_scale_down(runs, 10)
    assert [o["bytes"] for o in summary] == sorted(o["bytes"] for o in summary)
    best = smallest_keeping(summary)
    assert (best["format"], best["codec"]) == ("lora-r1-all", "int8")
    ref = next(o for o in summary if o["format"] == "lora-r8-all")
    assert math.isclose(ref["spread"], 0.0816, abs_tol=1e-3)  # population sd of 1.0, 0.8, 0.9
    assert ref["ci"] == pytest.approx(wilson_interval(27, 30))  # 10 + 8 + 9 of 3 x 10 answers, pooled


def test_wilson_interval():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 8) == pytest.approx((0.0, 0.3244), abs=1e-4)  # never a negative bound
    assert wilson_interval(16, 16)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_summary_splits_format_and_memory_personas():
    runs = [_run("lora-r8-all", "fp16", s, 1.0, 1000, persona="ahab") for s in range(2)]
    runs += [_run("lora-r8-all", "fp16", s, 0.25, 1000, persona="veggie", category="memory") for s in range(2)]
    (row,) = summarize_scale_down(runs, 16)
    assert (row["format_adherence"], row["memory_adherence"], row["adherence"]) == (1.0, 0.25, 0.625)
    runs[0].pop("category")  # a file saved before categories were kept: looked up from the shipped persona
    assert summarize_scale_down(runs, 16)[0]["format_adherence"] == 1.0


def test_render_redoes_the_report_from_the_saved_json(tmp_path):
    out, again = tmp_path / "down", tmp_path / "again"
    assert runner.invoke(app, ["bench", "scale-down", "--quick", "--personas", "ahab,veggie", "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["bench", "render", str(out / "scale_down.json"), "--out", str(again)])
    assert res.exit_code == 0, res.output
    first, redone = (out / "scale_down.md").read_text(), (again / "scale_down.md").read_text()
    assert "report redone from the saved numbers" in redone and "report redone" not in first
    head = first.split("## Result")[0].splitlines()
    assert all(line in redone for line in head if line.startswith(("- date", "- command")))  # the run's own origin
    assert first.split("## Result")[1] == redone.split("## Result")[1]  # same numbers, same tables
    assert "| veggie | memory |" in redone
    up = tmp_path / "up"
    assert runner.invoke(app, ["bench", "scale-up", "--quick", "--out", str(up)]).exit_code == 0
    res = runner.invoke(app, ["bench", "render", str(up / "scale_up.json")])
    assert res.exit_code == 0, res.output
    assert "report redone" in (up / "scale_up.md").read_text()


@pytest.mark.parametrize(("content", "match"), [
    (None, "cannot read"), ("{not json", "cannot read"), ('{"runs": []}', "not a scale_down.json"),
    ('[1, 2]', "not a scale_down.json"), ('{"runs": [], "settings": {"seeds": 0}}', "seeds must be"),
])
def test_render_refuses_a_file_it_did_not_write(tmp_path, content, match):
    path = tmp_path / "in" / "scale_down.json"
    path.parent.mkdir()
    if content is not None:
        path.write_text(content)
    res = runner.invoke(app, ["bench", "render", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert match in res.output
    assert not (tmp_path / "out").exists()


def test_examples_to_reach_80_percent():
    curve = [{"examples": e, "adherence": a, "per_persona": {"p": {"adherence": [a]}}}
             for e, a in ((2, 0.25), (4, 0.8), (8, 1.0))]
    assert examples_to_reach(curve) == 4
    assert examples_to_reach(curve, persona="p") == 4
    assert examples_to_reach(curve[:1]) is None


def test_settings_validate():
    with pytest.raises(EvaluationError, match="checkpoints"):
        ScaleSettings(steps=4, checkpoints=(2, 8))
    assert ScaleSettings(steps=30).eval_steps == (5, 10, 20, 30)
