"""One packed multi-user step over the shared base: the trainer and the Tinker service both step through here.

Rows of several users are padded into one batch and go through one forward over the resident base, row ``b``
through its owner's adapter (or stack of frozen parents + adapter) via the shared operator; the caller turns the
rows' log-probs into each user's loss, and :func:`backward_sum` takes one backward over their sum. A user's
parameters only touch that user's rows, so each adapter receives exactly the gradient of its own loss — the
same update as a step taken alone.

- :class:`~lorafleet.training.trainer.MultiTenantTrainer`: SFT (per-row labelled log-probs, :func:`labelled_logprobs`)
  and DPO (a policy pass, and a reference pass through the frozen parents only), one optimizer step per user.
- ``api/tinker/core.py``: each forward_backward op's datums (per-token :func:`~lorafleet.training.losses.next_token_logprobs`, Tinker's
  cross_entropy / importance_sampling), micro-batched by padded tokens; gradients accumulate until optim_step.

Activation checkpointing (``checkpoint``): a pass with gradients keeps every decoder layer's intermediate tensors
for the backward — on SmolLM2 ~1.6 MB per token (30 layers), 4 GB for 8 users x 4 rows of ~60 tokens. With
:func:`checkpointed_layers` only each layer's input is kept (~70 KB per token) and the layer runs again, one at a
time, inside the backward (~+1/3 compute). The recompute runs with the rows' adapter routing of the forward
(captured per layer call) and the same random state (adapter dropout), so losses and gradients equal the plain
pass (tested). ``"auto"`` (the default) turns it on from :data:`CHECKPOINT_MIN_TOKENS` padded tokens per pass.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from lorafleet.adapters import LoraAdapter, LoraHost
from lorafleet.adapters.stack import AdapterStack, route_rows
from lorafleet.errors import LorafleetError
from lorafleet.training.data import IGNORE
from lorafleet.training.losses import labelled_logprobs

__all__ = ["CHECKPOINT_MIN_TOKENS", "StepOptionError", "backward_sum", "checkpointed_layers", "pad_rows",
           "packed_forward", "resolve_checkpoint"]

# "auto" checkpoints the decoder layers of a pass with gradients from this many padded tokens (rows x width) on.
# Below it a pass's activations are small (SmolLM2: ~1.6 MB per token, ~0.8 GB at 512 tokens) and the recompute
# (~+1/3 of the step's compute) buys little; above it they grow to gigabytes (measured in
# docs/results/training.md).
CHECKPOINT_MIN_TOKENS = 512
CHECKPOINT_CHOICES = ("auto", "on", "off")


class StepOptionError(LorafleetError, ValueError):
    """A packed-step option (activation checkpointing) has a value outside its choices."""

    http_status, code = 422, "invalid_config"


def resolve_checkpoint(value: bool | str) -> str:
    """``"auto"``, ``"on"`` or ``"off"`` from a bool or one of those strings; anything else is a clear error."""
    if isinstance(value, bool):
        return "on" if value else "off"
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in CHECKPOINT_CHOICES:
        raise StepOptionError(f"activation checkpointing must be one of {', '.join(CHECKPOINT_CHOICES)} "
                              f"(or a bool), got {value!r}")
    return name


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


class _Checkpointing(threading.local):
    on = False


_THREAD = _Checkpointing()  # per thread: a serving thread sharing the base is never checkpointed
_INSTALL_LOCK = threading.Lock()
_INSTALLED: dict[int, list] = {}  # id(layers) -> [layers, users]


def _checkpointing_forward(layer: nn.Module, host: LoraHost | None):
    """An instance ``forward`` for ``layer``: the class forward, checkpointed in threads that asked for it."""
    inner = type(layer).forward

    def forward(*args, **kwargs):
        if not (_THREAD.on and torch.is_grad_enabled()):
            return inner(layer, *args, **kwargs)
        routing = host.routing if host is not None else None
        captured = (routing.slots, routing.table) if routing is not None else None

        def run(*a, **k):  # in the backward's recompute too: the rows' routing as it was in the forward
            if routing is None:
                return inner(layer, *a, **k)
            previous = (routing.slots, routing.table)
            routing.slots, routing.table = captured
            try:
                return inner(layer, *a, **k)
            finally:
                routing.slots, routing.table = previous

        return torch_checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module):
    """Within the block, in this thread, every decoder layer of ``model`` runs checkpointed when gradients are on.

    The layers get an instance ``forward`` for the block's duration only (removed when the last user leaves;
    other threads run the class forward unchanged), so the model is untouched outside it (copies, state dict).
    A model without ``get_decoder().layers`` is a :class:`StepOptionError`.
    """
    layers = _decoder_layers(model)
    if layers is None:
        raise StepOptionError(f"activation checkpointing needs a decoder with a list of layers; "
                              f"{type(model).__name__} has none")
    host = getattr(model, "_lorafleet_host", None)
    with _INSTALL_LOCK:
        entry = _INSTALLED.get(id(layers))
        if entry is None:
            for layer in layers:
                layer.forward = _checkpointing_forward(layer, host)
            entry = _INSTALLED[id(layers)] = [layers, 0]
        entry[1] += 1
    before, _THREAD.on = _THREAD.on, True
    try:
        yield
    finally:
        _THREAD.on = before
        with _INSTALL_LOCK:
            entry[1] -= 1
            if entry[1] == 0:
                for layer in layers:
                    layer.__dict__.pop("forward", None)
                del _INSTALLED[id(layers)]


def pad_rows(rows: Sequence[Sequence[int]], labels: Sequence, pad_id: int,
             label_pad: int = IGNORE) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(ids, labels, mask)``, each ``(B, T)`` long: ``ids`` padded with ``pad_id``, ``labels``
    (token lists or tensors, at most each row's length) with ``label_pad``, ``mask`` 1 on each row's tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), label_pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.as_tensor(r)
        lab[i, : len(lb)] = torch.as_tensor(lb)
        mask[i, : len(r)] = 1
    return ids, lab, mask


def packed_forward(base, users: Sequence[LoraAdapter | AdapterStack | None], owners: Sequence[int],
                   rows: Sequence[Sequence[int]], labels: Sequence, *,
                   score: Callable[..., Tensor | tuple[Tensor, Tensor]] = labelled_logprobs,
                   pad_id: int | None = None, label_pad: int = IGNORE, grad: bool | None = None,
                   train: bool = True, checkpoint: bool | str = "auto"):
    """One forward over the shared base for rows of several users; returns ``score(model, ids, mask, labels)``.

    ``users``: what each user's rows are routed through (an adapter, a stack, or None for the base alone), in
    slot order: each distinct adapter is one slot of the pass's table (by identity; parents shared by several
    users are one slot). ``owners[b]``: the user of row ``b``. ``score``: :func:`labelled_logprobs` (per-row
    summed log-prob and label count, ``labels`` shifted with :data:`IGNORE`) or :func:`~lorafleet.training.losses.next_token_logprobs`
    (per-token, ``labels`` = the aligned targets). ``pad_id``: default the tokenizer's pad token. ``grad``: None
    keeps the caller's grad mode. ``train``: the table applies adapter dropout (a training-time regulariser).
    The base itself stays in eval mode (no base dropout): only adapter tensors learn. ``checkpoint``: activation
    checkpointing of the decoder layers (``"on"``/True, ``"off"``/False, ``"auto"``: on for a pass with gradients
    of at least :data:`CHECKPOINT_MIN_TOKENS` padded tokens whose model has decoder layers); the same values either way.
    """
    mode_name = resolve_checkpoint(checkpoint)
    base.model.train(False)
    table, user_slots = route_rows(users, train=train)
    slots = None if table is None else [user_slots[k] for k in owners]
    ids, lab, mask = pad_rows(rows, labels, base.tokenizer.pad_token_id if pad_id is None else pad_id, label_pad)
    device = base.device
    with_grad = torch.is_grad_enabled() if grad is None else grad
    if mode_name == "auto":
        mode_name = "on" if (with_grad and ids.numel() >= CHECKPOINT_MIN_TOKENS
                             and _decoder_layers(base.model) is not None) else "off"
    mode = contextlib.nullcontext() if grad is None else torch.set_grad_enabled(grad)
    host = LoraHost.attach(base.model)
    layers = checkpointed_layers(base.model) if mode_name == "on" and with_grad else contextlib.nullcontext()
    with mode, host.route(table, slots), layers:
        return score(base.model, ids.to(device), mask.to(device), lab.to(device))


def backward_sum(losses: Iterable[Tensor]) -> bool:
    """One backward over the sum of the users' losses (each adapter gets its own loss's gradient); False if none."""
    terms = list(losses)
    if not terms:
        return False
    torch.stack(terms).sum().backward()
    return True
