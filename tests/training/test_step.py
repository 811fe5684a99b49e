"""The one packed multi-user step (training/step.py) that the trainer and the Tinker service share: rows of several
users in one forward score as each user's rows alone, shared parents are one slot, and each user's loss only
reaches that user's adapter."""

import torch

from lorafleet.adapters import LoraAdapter, LoraSpec
from lorafleet.adapters.stack import AdapterStack
from lorafleet.training.losses import next_token_logprobs
from lorafleet.training.step import backward_sum, packed_forward, pad_rows


def _adapter(base, rank, seed, targets="all"):
    a = LoraAdapter.create(base, LoraSpec(rank=rank, alpha=2 * rank, target_modules=targets), seed=seed, init="random")
    for n, (A, B) in list(a.weights.items()):
        a.weights[n] = (A.requires_grad_(True), B.requires_grad_(True))
    return a


def test_pad_rows_pads_right_with_the_given_values():
    ids, lab, mask = pad_rows([[5, 6, 7], [8]], [[-100, 6, 7], torch.tensor([9])], pad_id=1, label_pad=-100)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert lab.tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packed_rows_score_as_alone_and_each_loss_reaches_only_its_adapter(tiny_base):
    parent = _adapter(tiny_base, 4, 1)
    alice, bob = _adapter(tiny_base, 2, 2, "attention"), _adapter(tiny_base, 8, 3, "mlp")
    users = [alice, AdapterStack((parent, bob)), None]  # a plain adapter, a stack, the base alone
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (7, 4, 9, 5)]
    owners = [0, 1, 2, 1]
    targets = [r[1:] + [3] for r in rows]
    packed = packed_forward(tiny_base, users, owners, rows, targets, score=next_token_logprobs, pad_id=0,
                            label_pad=0, train=False)
    for b, (row, k) in enumerate(zip(rows, owners, strict=True)):
        alone = packed_forward(tiny_base, [users[k]], [0], [row], [targets[b]], score=next_token_logprobs,
                               pad_id=0, label_pad=0, grad=False, train=False)
        assert torch.allclose(packed[b, : len(row)], alone[0], atol=1e-5)
    assert backward_sum([packed[0].sum()])  # alice's rows only
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for ab in alice.weights.values() for t in ab)
    assert all(t.grad is None or not t.grad.any() for ab in bob.weights.values() for t in ab)  # exactly zero
    assert not backward_sum([])
