"""Training on top of a stack: the parents are applied frozen through the operator, only the person's adapter
learns, a stacked step equals a plain step on a base with the parents merged in, and the worker records the
parent revisions it trained on."""

import copy

import pytest
import torch

from lorafleet.adapters import LoraAdapter, LoraSpec, to_bytes
from lorafleet.registry import Provenance, Registry
from lorafleet.training.data import dataset_from_records
from lorafleet.training.jobs import JobQueue
from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig
from lorafleet.training.worker import Worker


def sft_records(tag: str, n: int = 6):
    return [{"messages": [{"role": "user", "content": f"question {i} {tag}"},
                          {"role": "assistant", "content": f"answer {i} from {tag}!"}]} for i in range(n)]


def _adapter(base, rank, seed, targets="all", dropout=0.0):
    spec = LoraSpec(rank=rank, alpha=2 * rank, target_modules=targets, dropout=dropout)
    return LoraAdapter.create(base, spec, seed=seed, init="random")


def _weights(adapter):
    return {n: (A.detach().clone(), B.detach().clone()) for n, (A, B) in adapter.weights.items()}


def _max_diff(a, b):
    return max(max((a[n][0] - b[n][0]).abs().max().item(), (a[n][1] - b[n][1]).abs().max().item()) for n in a)


def _merge_into(base, adapters):
    """Add the adapters' deltas into the base's own weights (undone by the returned function)."""
    saved = {}
    with torch.no_grad():
        for a in adapters:
            for name in a.weights:
                linear = base.model.get_submodule(name).base
                saved.setdefault(name, linear.weight.detach().clone())
                linear.weight += a.delta_weight(name)

    def restore():
        with torch.no_grad():
            for name, w in saved.items():
                base.model.get_submodule(name).base.weight.copy_(w)
    return restore


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_stacked_step_equals_plain_step_on_the_merged_base_and_parents_stay_frozen(tiny_base, method):
    org, team = _adapter(tiny_base, 4, 1, dropout=0.3), _adapter(tiny_base, 2, 2, "attention")
    person = _adapter(tiny_base, 8, 3, "mlp")
    if method == "sft":
        data = dataset_from_records(sft_records("alice"), "sft")
    else:
        data = dataset_from_records([{"prompt": f"hi {i}", "chosen": f"hello {i}", "rejected": f"bye {i}"}
                                     for i in range(4)], "dpo")
    # SGD: Adam divides by sqrt(v), which turns float rounding of near-zero gradients into visible steps
    cfg = TrainConfig(method=method, steps=3, lr=0.05, batch_size=3, optimizer="sgd", grad_clip=0.0)
    org_before, team_before = _weights(org), _weights(team)

    stacked = MultiTenantTrainer(tiny_base)
    stacked.add("alice", copy.deepcopy(person), data, cfg, parents=[org, team])
    losses = [stacked.step()["alice"] for _ in range(3)]

    restore = _merge_into(tiny_base, [org, team])  # the reference: parents merged into the base
    try:
        plain = MultiTenantTrainer(tiny_base)
        plain.add("alice", copy.deepcopy(person), data, cfg)
        want = [plain.step()["alice"] for _ in range(3)]
    finally:
        restore()
    assert losses == pytest.approx(want, abs=1e-5)
    assert _max_diff(_weights(stacked.users["alice"].adapter), _weights(plain.users["alice"].adapter)) < 1e-5
    assert _max_diff(_weights(org), org_before) == 0.0 and _max_diff(_weights(team), team_before) == 0.0
    assert _max_diff(_weights(stacked.users["alice"].adapter), _weights(person)) > 0.0


def test_users_sharing_a_parent_share_its_slot_and_too_deep_is_refused(tiny_base):
    org = _adapter(tiny_base, 4, 1)
    trainer = MultiTenantTrainer(tiny_base)
    cfg = TrainConfig(steps=2, lr=0.01, batch_size=2)
    for i, name in enumerate(["alice", "bob"]):
        trainer.add(name, _adapter(tiny_base, 2, 10 + i), dataset_from_records(sft_records(name), "sft"), cfg,
                    parents=[org])
    assert trainer.users["alice"].parents[0] is trainer.users["bob"].parents[0]
    with pytest.raises(ValueError, match="exceed 3 levels"):
        trainer.add("carol", _adapter(tiny_base, 2, 9), dataset_from_records(sft_records("c"), "sft"), cfg,
                    parents=[org, org, org])


def test_worker_trains_on_the_recorded_parents_and_provenance_names_them(tiny_base, tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "blobs"))
    try:
        org = _adapter(tiny_base, 4, 1)
        reg.create_adapter("acme/_org/support")
        org_rev = reg.commit("acme/_org/support", to_bytes(org), Provenance(base_fingerprint=tiny_base.fingerprint))
        reg.set_alias("acme/_org/support", "live", org_rev.number)
        queue = JobQueue(reg)
        refs = ["acme/alice/assistant", "acme/bob/assistant"]
        for ref in refs:
            reg.create_adapter(ref, parent="acme/_org/support")
            queue.submit(ref, dataset_from_records(sft_records(ref), "sft"), LoraSpec(rank=2, alpha=4),
                         TrainConfig(steps=2, lr=0.01, batch_size=2))
        # the parent moves after submit: the queued jobs keep the revision they were submitted on
        org2 = reg.commit("acme/_org/support", to_bytes(_adapter(tiny_base, 4, 5)),
                          Provenance(base_fingerprint=tiny_base.fingerprint))
        reg.set_alias("acme/_org/support", "live", org2.number)
        worker = Worker(reg, tiny_base)
        assert len(worker.run()) == 2 and worker.global_steps == 2
        for ref in refs:
            rev = reg.resolve(f"{ref}@candidate")
            parents = rev.provenance.hyperparams["stack_parents"]
            assert [(p["address"], p["digest"]) for p in parents] == [(org_rev.address, org_rev.digest)]
        assert worker._parents.keys() <= {org_rev.digest}
    finally:
        reg.close()
