"""The profile embedding: the base's own mean-pooled hidden states of a user's description and examples.

:func:`profile_features` returns one float vector per profile::

    [ pool(description) | mean over examples of pool(example answer) | has_examples ]

``pool(text)`` = the mean over the text's tokens of the hidden states of the middle and the last layer,
concatenated (``2 * hidden`` numbers). A profile without examples has zeros in the example part and a 0 flag.
No chat template: the text is embedded as plain text, which is what the base reads a description as.
"""

from __future__ import annotations

import torch

from lorafleet.adapters import LoraHost
from lorafleet.instant.errors import InstantError

MAX_EXAMPLES = 8  # example conversations a profile may carry (the generator averages their embeddings)
MAX_PROFILE_CHARS = 2000
MAX_EXAMPLE_CHARS = 2000
EMBED_MAX_TOKENS = 128


def feature_dim(base) -> int:
    return 4 * base.config.hidden_size + 1


def check_profile(profile: str, examples: list[dict] | None = None) -> tuple[str, list[str]]:
    """Validate a profile and its examples; returns ``(description, example answer texts)``."""
    if not isinstance(profile, str) or not profile.strip():
        raise InstantError("the profile is empty: describe the user in a sentence (e.g. 'always ends with …')")
    if len(profile) > MAX_PROFILE_CHARS:
        raise InstantError(f"the profile is {len(profile)} characters; at most {MAX_PROFILE_CHARS}")
    examples = list(examples or [])
    if len(examples) > MAX_EXAMPLES:
        raise InstantError(f"{len(examples)} examples given; a generated adapter takes at most {MAX_EXAMPLES} "
                           "(train the adapter on more)")
    answers = []
    for i, r in enumerate(examples):
        msgs = r.get("messages") if isinstance(r, dict) else None
        if not isinstance(msgs, list):
            raise InstantError(f"example {i + 1} is not a chat record {{'messages': [...]}}")
        said = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"]
        if not said or not isinstance(said[-1], str) or not said[-1].strip():
            raise InstantError(f"example {i + 1} has no non-empty assistant turn")
        if len(said[-1]) > MAX_EXAMPLE_CHARS:
            raise InstantError(f"example {i + 1}'s answer is over {MAX_EXAMPLE_CHARS} characters")
        answers.append(said[-1])
    return profile.strip(), answers


@torch.no_grad()
def pool_texts(base, texts: list[str], batch: int = 16) -> torch.Tensor:
    """``(len(texts), 2 * hidden)``: mean-pooled middle + last hidden states of each text (the bare base)."""
    tok, model = base.tokenizer, base.model
    model.train(False)
    layers = model.config.num_hidden_layers
    out = []
    host = LoraHost.attach(model)
    for i in range(0, len(texts), batch):
        chunk = texts[i: i + batch]
        enc = [tok(t, add_special_tokens=False)["input_ids"][:EMBED_MAX_TOKENS] or [tok.eos_token_id] for t in chunk]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, : len(e)] = torch.tensor(e)
            mask[j, : len(e)] = 1
        with host.route(None, None):  # the bare base, whatever adapters are attached
            hs = model(input_ids=ids.to(base.device), attention_mask=mask.to(base.device),
                       output_hidden_states=True).hidden_states
        m = mask.to(base.device).unsqueeze(-1).float()
        pooled = [(hs[k] * m).sum(1) / m.sum(1) for k in (layers // 2, layers)]
        out.append(torch.cat(pooled, dim=-1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 4 * base.config.hidden_size)


def profile_features(base, profile: str, examples: list[dict] | None = None) -> torch.Tensor:
    """The generator's input for one profile (validated; see the module docstring)."""
    return profile_features_many(base, [(profile, examples)])[0]


def profile_features_many(base, profiles: list[tuple[str, list[dict] | None]]) -> torch.Tensor:
    """``(len(profiles), feature_dim)`` for several profiles, embedded in shared batches."""
    checked = [check_profile(p, ex) for p, ex in profiles]
    texts = [d for d, _ in checked] + [a for _, answers in checked for a in answers]
    pooled = pool_texts(base, texts)
    n, h2 = len(checked), pooled.shape[1]
    feats = torch.zeros(n, 2 * h2 + 1)
    cursor = n
    for i, (_, answers) in enumerate(checked):
        feats[i, :h2] = pooled[i]
        if answers:
            feats[i, h2: 2 * h2] = pooled[cursor: cursor + len(answers)].mean(0)
            feats[i, -1] = 1.0
            cursor += len(answers)
    return feats
