"""Trainer checkpoints as safetensors bytes (no pickle): weights, optimizer state, sampler position.

Stored content-addressed in the registry's blob store, so any worker sharing the store can resume.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

META_KEY = "lorafleet.checkpoint"


def weights_of(adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A detached copy of an adapter's trainable ``(A, B)`` tensors, for a checkpoint or a snapshot."""
    return {n: (A.detach().clone(), B.detach().clone()) for n, (A, B) in adapter.weights.items()}


def load_weights(adapter, weights: dict) -> None:
    """Copy checkpointed ``(A, B)`` tensors into an adapter's (trainable) tensors in place."""
    with torch.no_grad():
        for n, (A, B) in weights.items():
            adapter.weights[n][0].copy_(A)
            adapter.weights[n][1].copy_(B)


def checkpoint_to_bytes(state: dict) -> bytes:
    """Serialize :meth:`MultiTenantTrainer.state_dict` output."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (A, B) in state["weights"].items():
        tensors[f"w|{name}|A"] = A.contiguous()
        tensors[f"w|{name}|B"] = B.contiguous()
    opt = state["optimizer"]
    scalars: dict[str, dict] = {}
    for pid, st in opt["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"o|{pid}|{key}"] = value.contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {
        "param_groups": opt["param_groups"],
        "scalars": scalars,
        **{k: state[k] for k in ("step", "cursor", "order", "epoch", "losses")},
    }
    return st_save(tensors, metadata={META_KEY: json.dumps(meta)})


def checkpoint_from_bytes(data: bytes) -> dict:
    tensors = st_load(data)
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8 : 8 + n])["__metadata__"][META_KEY])
    weights: dict[str, list] = {}
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, a, b = key.split("|")
        if kind == "w":
            weights.setdefault(a, [None, None])[0 if b == "A" else 1] = value
        else:
            opt_state.setdefault(int(a), {})[b] = value
    for pid, scalars in meta["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(scalars)
    return {
        "weights": {k: (v[0], v[1]) for k, v in weights.items()},
        "optimizer": {"state": opt_state, "param_groups": meta["param_groups"]},
        **{k: meta[k] for k in ("step", "cursor", "order", "epoch", "losses")},
    }
