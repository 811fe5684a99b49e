"""Training data formats: validation with line numbers, digests, assistant-only labels."""

import json

import pytest

from lorafleet.training.data import IGNORE, DataError, dataset_from_records, load_jsonl, tokenize_pair, tokenize_sft

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_and_digest(tmp_path):
    p = _write(tmp_path, [json.dumps(GOOD), "", json.dumps(GOOD)])
    ds = load_jsonl(p)
    assert len(ds) == 2 and len(ds.digest) == 64
    assert ds.digest == dataset_from_records([GOOD, GOOD], "sft").digest
    assert ds.digest != dataset_from_records([GOOD], "sft").digest


@pytest.mark.parametrize(
    ("lines", "kind", "match"),
    [
        ([json.dumps(GOOD), "{broken"], "sft", r"d.jsonl:2: malformed JSON"),
        ([json.dumps({"text": "x"})], "sft", r":1: an SFT example has exactly one key 'messages'"),
        ([json.dumps({"messages": []})], "sft", "non-empty list"),
        ([json.dumps({"messages": [{"role": "robot", "content": "x"}]})], "sft", "role 'robot'"),
        ([json.dumps({"messages": [{"role": "user", "content": "x"}]})], "sft", "no non-empty assistant message"),
        ([json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]})], "sft",
         "content must be a string"),
        ([json.dumps([1, 2])], "sft", "expected a JSON object"),
        (["", "  "], "sft", "the dataset is empty"),
        ([json.dumps({"prompt": "p", "chosen": "a"})], "dpo", "keys 'prompt', 'chosen', 'rejected'"),
        ([json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"})], "dpo", "identical"),
        ([json.dumps({"prompt": "", "chosen": "a", "rejected": "b"})], "dpo", "'prompt' must be"),
    ],
)
def test_bad_files(tmp_path, lines, kind, match):
    with pytest.raises(DataError, match=match):
        load_jsonl(_write(tmp_path, lines), kind)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_assistant_only_labels(tmp_path):
    from lorafleet.base import load_base

    tok = load_base("tiny").tokenizer
    record = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q1"},
                           {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                           {"role": "assistant", "content": "a2"}]}
    ex = tokenize_sft(tok, record, 512)
    learned = tok.decode([t for t in ex.labels if t != IGNORE])
    assert learned == "a1<|im_end|>\na2<|im_end|>\n"
    prompt = tok.apply_chat_template(record["messages"][:2], add_generation_prompt=True, tokenize=False)
    assert ex.input_ids[: len(tok(prompt)["input_ids"])] == tok(prompt)["input_ids"]
    pair = tokenize_pair(tok, {"prompt": "p", "chosen": "yes", "rejected": "no"}, 512)
    assert tok.decode(pair.chosen[pair.prompt_len:]) == "yes<|im_end|>"
