"""next_token_logprobs (the Tinker convention: targets aligned with positions) equals the full-logits reference."""

import torch
import torch.nn.functional as F

from lorafleet.training.losses import next_token_logprobs


def test_equals_log_softmax_of_the_full_logits_and_zero_outside_the_mask(tiny_base):
    model = tiny_base.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (3, 7), generator=g)  # (B, T)
    targets = torch.randint(0, 200, (3, 7), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a shorter row (right padding)
    with torch.no_grad():
        got = next_token_logprobs(model, ids, mask, targets)  # (B, T)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    want = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[1, 5:] == 0).all() and (got[1, :5] < 0).all()
