"""Training memory mechanisms: the chunked vocabulary projection and activation checkpointing change no value."""

import pytest
import torch
import torch.nn.functional as F

from lorafleet.adapters import LoraAdapter, LoraSpec
from lorafleet.base import load_base
from lorafleet.training.data import dataset_from_records
from lorafleet.training.losses import head_logprobs
from lorafleet.training.step import StepOptionError, checkpointed_layers, packed_forward
from lorafleet.training.trainer import MultiTenantTrainer, TrainConfig


def _adapter(base, seed, dropout=0.0):
    a = LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all", dropout=dropout), seed=seed,
                           init="random")
    for n, (A, B) in list(a.weights.items()):
        a.weights[n] = (A.requires_grad_(True), B.requires_grad_(True))
    return a


def _grads(adapters):
    out = [t.grad.clone() for a in adapters for ab in a.weights.values() for t in ab]
    for a in adapters:
        for ab in a.weights.values():
            for t in ab:
                t.grad = None
    return out


def test_chunked_head_logprobs_equal_the_full_log_softmax_values_and_gradients(tiny_base):
    model = tiny_base.model
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, model.config.hidden_size, generator=g)
    targets = torch.randint(0, model.config.vocab_size, (11,), generator=g)
    results = []
    for chunk in (3, 11, 1000):  # uneven chunks, one exact chunk, one chunk larger than the input
        h = hidden.clone().requires_grad_(True)
        logp = head_logprobs(model, h, targets, chunk=chunk)
        (logp * torch.arange(1.0, 12.0)).sum().backward()
        results.append((logp.detach(), h.grad))
    h = hidden.clone().requires_grad_(True)
    ref = F.log_softmax(model.get_output_embeddings()(h).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    (ref * torch.arange(1.0, 12.0)).sum().backward()
    for logp, grad in results:
        torch.testing.assert_close(logp, ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, h.grad, atol=1e-5, rtol=1e-5)
    assert head_logprobs(model, hidden[:0], targets[:0]).shape == (0,)
    with pytest.raises(ValueError, match="positive number of tokens"):
        head_logprobs(model, hidden, targets, chunk=0)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_checkpointing_on_equals_off_losses_and_adapter_gradients(precision):
    base = load_base("tiny", precision=precision)
    users = [_adapter(base, 1, dropout=0.1), _adapter(base, 2)]  # dropout: the recompute must draw the same mask
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (30, 25, 40, 12)]
    labels = [[-100] * 5 + r[5:] for r in rows]
    layers = base.model.get_decoder().layers
    calls = {"n": 0}
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1)) for layer in layers]
    runs = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        calls["n"] = 0
        logp, count = packed_forward(base, users, [0, 1, 0, 1], rows, labels, checkpoint=mode)
        forward_calls = calls["n"]
        (-logp / count).sum().backward()
        runs[mode] = (logp.detach(), _grads(users), forward_calls, calls["n"] - forward_calls)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(runs["on"][0], runs["off"][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(runs["on"][1], runs["off"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert runs["off"][3] == 0 and runs["on"][3] > 0  # checkpointing recomputed layers inside the backward
    assert all("forward" not in layer.__dict__ for layer in layers)  # the model is untouched outside the block


def test_auto_checkpoints_only_large_passes_with_gradients(tiny_base, monkeypatch):
    from lorafleet.training import step  # noqa: PLC0415 - patches the threshold of this module

    used = []
    real = step.checkpointed_layers

    def spy(model):
        used.append(True)
        return real(model)

    monkeypatch.setattr(step, "checkpointed_layers", spy)
    user = _adapter(tiny_base, 3)
    rows, labels = [[5, 6, 7, 8]] * 2, [[-100, 6, 7, 8]] * 2
    packed_forward(tiny_base, [user], [0, 0], rows, labels)  # 8 tokens: below the threshold
    monkeypatch.setattr(step, "CHECKPOINT_MIN_TOKENS", 8)
    packed_forward(tiny_base, [user], [0, 0], rows, labels, grad=False)  # no gradients: nothing to save
    assert used == []
    packed_forward(tiny_base, [user], [0, 0], rows, labels)
    assert used == [True]


def test_bad_checkpoint_values_are_clear_errors(tiny_base):
    with pytest.raises(StepOptionError, match="auto, on, off"):
        MultiTenantTrainer(tiny_base, checkpoint="sometimes")
    with pytest.raises(StepOptionError, match="auto, on, off"):
        packed_forward(tiny_base, [None], [0], [[5, 6]], [[-100, 6]], checkpoint=2)
    with pytest.raises(StepOptionError, match="decoder with a list of layers"):
        with checkpointed_layers(torch.nn.Linear(2, 2)):
            pass


def test_trainer_with_checkpointing_trains_like_without():
    records = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"answer {i}!"}]}
               for i in range(4)]
    curves = {}
    for mode in ("off", "on"):
        base = load_base("tiny")
        trainer = MultiTenantTrainer(base, checkpoint=mode)
        for u in range(2):
            trainer.add(f"u{u}", LoraAdapter.create(base, LoraSpec(rank=4, alpha=8, target_modules="all"), seed=u),
                        dataset_from_records(records, "sft"), TrainConfig(steps=4, lr=0.05, batch_size=2))
        curves[mode] = [trainer.step() for _ in range(4)]
    for on, off in zip(curves["on"], curves["off"], strict=True):
        assert on == pytest.approx(off, abs=1e-5)
    assert curves["on"][-1]["u0"] < curves["on"][0]["u0"]
