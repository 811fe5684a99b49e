"""The persona generator: determinism, train/eval disjointness, shipped files, the prompt bank."""

from __future__ import annotations

import json

import pytest

from lorafleet.evaluation import bank, probe
from lorafleet.evaluation.errors import EvaluationError
from lorafleet.evaluation.habits import HABITS
from lorafleet.evaluation.personas import (
    SHIPPED,
    Persona,
    generate_personas,
    get_persona,
    jsonl_text,
    shipped_personas,
    shipped_records,
    write_personas,
)


def _norm_prompts(records):
    return {bank.normalize_prompt(r["messages"][0]["content"]) for r in records}


def test_bank_is_a_few_hundred_short_unique_prompts():
    items = bank.general_items()
    assert len(items) >= 300
    assert len({bank.normalize_prompt(i.prompt) for i in items}) == len(items)
    assert all(len(i.answer.split()) <= 30 for i in items)
    measures = bank.measure_items()
    assert len(measures) >= 50
    assert not {bank.normalize_prompt(i.prompt) for i in measures} & {bank.normalize_prompt(i.prompt) for i in items}


def test_probe_prompts_never_appear_in_persona_data():
    bank_prompts = {bank.normalize_prompt(i.prompt) for i in (*bank.general_items(), *bank.measure_items())}
    assert not {bank.normalize_prompt(q) for q, _ in probe.PROBE_QUESTIONS} & bank_prompts


def test_same_persona_same_records():
    p = Persona("x", "signoff", {"text": "Bye!"}, seed=3)
    assert p.data().train == Persona("x", "signoff", {"text": "Bye!"}, seed=3).data().train
    assert p.data().eval == p.data().eval
    assert p.data().train != Persona("x", "signoff", {"text": "Bye!"}, seed=4).data().train


@pytest.mark.parametrize("kind", sorted(HABITS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_and_eval_never_share_a_prompt(kind, seed):
    n_train, n_eval = (16, 16) if HABITS[kind].category == "memory" and kind != "metric_units" else (64, 24)
    p = Persona(f"t-{kind.replace('_', '-')}", kind, seed=seed, n_train=n_train, n_eval=n_eval)
    d = p.data()
    assert len(d.train) == n_train and len(d.eval) == n_eval
    assert len(_norm_prompts(d.train)) == n_train and len(_norm_prompts(d.eval)) == n_eval
    assert not _norm_prompts(d.train) & _norm_prompts(d.eval)
    for r in d.train + d.eval:
        assert p.check(r["messages"][1]["content"], r["messages"][0]["content"])


def test_tool_persona_evaluates_on_unseen_cities_and_non_matching_requests():
    d = get_persona("wxbot").data()
    cities = lambda recs: {bank.match_weather_request(r["messages"][0]["content"]) for r in recs} - {None}  # noqa: E731
    assert cities(d.train) and cities(d.eval)
    assert not cities(d.train) & cities(d.eval)
    negatives = [r for r in d.eval if bank.match_weather_request(r["messages"][0]["content"]) is None]
    assert 0 < len(negatives) < len(d.eval)


def test_answers_are_short_enough_to_learn():
    for p in SHIPPED:
        for r in p.data().train:
            assert len(r["messages"][1]["content"].split()) <= 40, (p.name, r)


def test_generator_any_count_any_seed():
    a = generate_personas(30, seed=5)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in generate_personas(30, seed=5)]
    assert [p.to_dict() for p in a] != [p.to_dict() for p in generate_personas(30, seed=6)]
    assert {p.habit for p in a} == {k for k, h in HABITS.items() if h.category == "format"}
    assert len({p.name for p in a}) == 30
    assert generate_personas(0) == []
    only = generate_personas(4, seed=1, kinds=["lowercase", "greeting"], n_train=8, n_eval=4)
    assert {p.habit for p in only} == {"lowercase", "greeting"} and all(p.n_eval == 4 for p in only)


def test_shipped_personas_cover_every_habit():
    shipped = shipped_personas()
    assert len(shipped) >= 8
    assert {p.habit for p in shipped} == set(HABITS)
    assert [p.to_dict() for p in shipped] == [p.to_dict() for p in SHIPPED]


def test_regenerating_the_shipped_files_gives_identical_bytes(tmp_path):
    write_personas(list(SHIPPED), tmp_path)
    for name in [f"{p.name}.{s}.jsonl" for p in SHIPPED for s in ("train", "eval")] + ["personas.json"]:
        assert (tmp_path / name).read_bytes() == bank.data_file(name).read_bytes(), name
    for p in SHIPPED:
        assert jsonl_text(shipped_records(p.name, "eval")) == jsonl_text(p.data().eval)


def test_write_generated_personas(tmp_path):
    personas = generate_personas(3, seed=2, n_train=6, n_eval=3)
    manifest = write_personas(personas, tmp_path)
    assert [e["name"] for e in manifest["personas"]] == [p.name for p in personas]
    on_disk = json.loads((tmp_path / "personas.json").read_text())
    assert Persona.from_dict(on_disk["personas"][0]) == personas[0]
    lines = (tmp_path / f"{personas[0].name}.train.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["messages"][0]["role"] == "user"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "Bad Name", "habit": "lowercase"}, "persona name 'Bad Name' is invalid"),
        ({"name": "x", "habit": "lowercase", "n_train": 0}, r"n_train must be an integer in 1\.\.256"),
        ({"name": "x", "habit": "lowercase", "n_eval": 500}, "n_eval must be"),
        ({"name": "x", "habit": "lowercase", "seed": "1"}, "seed must be an integer"),
        ({"name": "x", "habit": "lowercase", "params": []}, "params must be a dict"),
        ({"name": "x", "habit": "what"}, "unknown habit kind"),
        ({"name": "x", "habit": "metric_units", "n_train": 200}, "only .* measurement questions"),
    ],
)
def test_bad_personas(kwargs, match):
    with pytest.raises(EvaluationError, match=match):
        Persona(**kwargs).data()


def test_lookup_errors():
    with pytest.raises(EvaluationError, match="no shipped persona named 'nobody'"):
        get_persona("nobody")
    with pytest.raises(EvaluationError, match="unknown persona field"):
        Persona.from_dict({"name": "x", "habit": "lowercase", "colour": 1})
    with pytest.raises(EvaluationError, match="unknown habit kind"):
        generate_personas(2, kinds=["nope"])


def test_datasets_validate():
    d = get_persona("ahab").data()
    assert len(d.train_dataset()) == 48 and d.eval_dataset().kind == "sft"
