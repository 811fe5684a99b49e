"""The multi-tenant trainer: isolation, equivalence with per-user steps, DPO, resumable state."""

import copy

import pytest
import torch

from lorafleet.adapters import LoraAdapter, LoraSpec
from lorafleet.training.data import dataset_from_records
from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig, sft_eval_loss


def sft_records(tag: str, n: int = 6):
    return [{"messages": [{"role": "user", "content": f"question {i} {tag}"},
                          {"role": "assistant", "content": f"answer {i} from {tag}!"}]} for i in range(n)]


def dpo_records(n: int = 4):
    return [{"prompt": f"say hi {i}", "chosen": f"hello there {i}", "rejected": f"go away {i}"} for i in range(n)]


def _adapter(base, rank, seed, targets="all"):
    return LoraAdapter.create(base, LoraSpec(rank=rank, alpha=2 * rank, target_modules=targets), seed=seed, init="random")


def _snapshot(adapter):
    return {n: (A.detach().clone(), B.detach().clone()) for n, (A, B) in adapter.weights.items()}


def _max_diff(a, b):
    return max(max((a[n][0] - b[n][0]).abs().max().item(), (a[n][1] - b[n][1]).abs().max().item()) for n in a)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_multi_user_step_equals_per_user_steps(tiny_base, optimizer):
    cfg = TrainConfig(steps=3, lr=0.05, batch_size=3, optimizer=optimizer, grad_clip=0.0)
    users = {"alice": (2, "attention"), "bob": (4, "mlp"), "carol": (8, "all")}
    packed = MultiTenantTrainer(tiny_base)
    alone = {}
    for i, (name, (rank, targets)) in enumerate(users.items()):
        a = _adapter(tiny_base, rank, i, targets)
        packed.add(name, copy.deepcopy(a), dataset_from_records(sft_records(name), "sft"), cfg)
        t = MultiTenantTrainer(tiny_base)
        t.add(name, copy.deepcopy(a), dataset_from_records(sft_records(name), "sft"), cfg)
        alone[name] = t
    for _ in range(3):
        packed_losses = packed.step()
        for name, t in alone.items():
            assert abs(t.step()[name] - packed_losses[name]) < 1e-5
    for name, t in alone.items():
        assert _max_diff(_snapshot(packed.users[name].adapter), _snapshot(t.users[name].adapter)) < 1e-5


def test_step_never_changes_another_users_weights(tiny_base):
    trainer = MultiTenantTrainer(tiny_base)
    cfg = TrainConfig(steps=5, lr=0.05, batch_size=2)
    for i, name in enumerate(["alice", "bob"]):
        trainer.add(name, _adapter(tiny_base, 4, i), dataset_from_records(sft_records(name), "sft"), cfg)
    bob_before = _snapshot(trainer.users["bob"].adapter)
    alice_before = _snapshot(trainer.users["alice"].adapter)
    trainer.step(["alice"])
    assert _max_diff(_snapshot(trainer.users["bob"].adapter), bob_before) == 0.0
    assert _max_diff(_snapshot(trainer.users["alice"].adapter), alice_before) > 0.0
    assert trainer.users["bob"].step == 0 and trainer.users["alice"].step == 1


def test_sft_loss_goes_down_and_eval_loss_improves(tiny_base):
    trainer = MultiTenantTrainer(tiny_base)
    data = dataset_from_records(sft_records("zed"), "sft")
    trainer.add("zed", _adapter(tiny_base, 8, 0), data, TrainConfig(steps=30, lr=5e-3, batch_size=4))
    before = sft_eval_loss(tiny_base, trainer.users["zed"].adapter, data)
    losses = [trainer.step()["zed"] for _ in range(30)]
    after = sft_eval_loss(tiny_base, trainer.users["zed"].adapter, data)
    assert losses[-1] < losses[0] and after < before
    assert not trainer.active()


def test_dpo_prefers_chosen(tiny_base):
    from lorafleet.adapters import LoraHost, StackedWeights
    from lorafleet.training.data import tokenize_pair
    from lorafleet.training.losses import sequence_logprob
    from lorafleet.training.step import pad_rows

    trainer = MultiTenantTrainer(tiny_base)
    data = dataset_from_records(dpo_records(), "dpo")
    adapter = LoraAdapter.create(tiny_base, LoraSpec(rank=4, target_modules="all"), seed=0)  # starts as the base
    trainer.add("dee", adapter, data, TrainConfig(method="dpo", steps=15, lr=5e-3, batch_size=4, beta=0.5))
    first = trainer.step()["dee"]
    assert abs(first - 0.6931) < 1e-3  # policy == reference at step 0: loss = log 2
    for _ in range(14):
        last = trainer.step()["dee"]
    assert last < first

    pair = tokenize_pair(tiny_base.tokenizer, data.records[0], 256)
    rows = [pair.chosen, pair.rejected]
    labels = [[-100] * pair.prompt_len + r[pair.prompt_len:] for r in rows]
    ids, lab, mask = pad_rows(rows, labels, tiny_base.tokenizer.pad_token_id)
    host = LoraHost.attach(tiny_base.model)
    with torch.no_grad():
        ref = sequence_logprob(tiny_base.model(input_ids=ids, attention_mask=mask).logits, lab)
        with host.route(StackedWeights([adapter]), [0, 0]):
            pol = sequence_logprob(tiny_base.model(input_ids=ids, attention_mask=mask).logits, lab)
    assert (pol[0] - ref[0]) - (pol[1] - ref[1]) > 0


def test_mixed_sft_and_dpo_users_in_one_step(tiny_base):
    trainer = MultiTenantTrainer(tiny_base)
    trainer.add("s", _adapter(tiny_base, 2, 0), dataset_from_records(sft_records("s"), "sft"), TrainConfig(steps=2))
    trainer.add("d", _adapter(tiny_base, 2, 1), dataset_from_records(dpo_records(), "dpo"),
                TrainConfig(method="dpo", steps=2))
    assert set(trainer.step()) == {"s", "d"}


def test_state_dict_resume_equals_uninterrupted(tiny_base):
    cfg = TrainConfig(steps=6, lr=0.01, batch_size=4)
    data = dataset_from_records(sft_records("r", n=5), "sft")
    start = _adapter(tiny_base, 4, 3)
    full = MultiTenantTrainer(tiny_base)
    full.add("r", copy.deepcopy(start), data, cfg)
    while full.active():
        full.step()
    part = MultiTenantTrainer(tiny_base)
    part.add("r", copy.deepcopy(start), data, cfg)
    for _ in range(3):
        part.step()
    state = copy.deepcopy(part.state_dict("r"))
    resumed = MultiTenantTrainer(tiny_base)
    resumed.add("r", copy.deepcopy(start), data, cfg)
    resumed.load_state_dict("r", state)
    while resumed.active():
        resumed.step()
    assert _max_diff(_snapshot(full.users["r"].adapter), _snapshot(resumed.users["r"].adapter)) < 1e-6


def test_truncation_is_counted(tiny_base):
    long = [{"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}]}]
    ok = sft_records("t", n=2)
    trainer = MultiTenantTrainer(tiny_base)
    track = trainer.add("t", _adapter(tiny_base, 2, 0), dataset_from_records(ok + long, "sft"),
                        TrainConfig(steps=1, max_len=64))
    assert track.report.dropped == [2]  # truncation cut off the whole answer: reported, not trained on
    long2 = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 300}]}]
    track2 = trainer.add("t2", _adapter(tiny_base, 2, 0), dataset_from_records(long2, "sft"), TrainConfig(steps=1, max_len=64))
    assert track2.report.truncated == 1 and track2.report.examples == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"method": "ppo"}, "method"), ({"steps": 0}, "steps"), ({"lr": 0}, "lr"), ({"optimizer": "lion"}, "optimizer")],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_labelled_logprobs_equals_full_logits_path(tiny_base):
    from lorafleet.training.data import tokenize_sft
    from lorafleet.training.losses import labelled_logprobs, shifted_token_logprobs
    from lorafleet.training.step import pad_rows

    items = [tokenize_sft(tiny_base.tokenizer, r, 256) for r in sft_records("eq", n=3)]
    ids, lab, mask = pad_rows([i.input_ids for i in items], [i.labels for i in items], tiny_base.tokenizer.pad_token_id)
    with torch.no_grad():
        full, full_mask = shifted_token_logprobs(tiny_base.model(input_ids=ids, attention_mask=mask).logits, lab)
        sums, counts = labelled_logprobs(tiny_base.model, ids, mask, lab)
    torch.testing.assert_close(sums, full.sum(dim=1), atol=1e-4, rtol=1e-5)
    assert counts.tolist() == full_mask.sum(dim=1).tolist()
