"""The operator's fast paths equal its plain-loop reference; mixed batches equal each row alone in peft."""

import copy

import pytest
import torch
from peft import PeftModel

from lorafleet.adapters import LoraAdapter, LoraHost, LoraSpec, SlotTable, StackedWeights, save_peft
from lorafleet.adapters.operator import _gather_bmm, _segmented, lora_delta, lora_delta_reference


def _random_tables(S=5, ranks=(1, 3, 8, 2, 5), d_in=12, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    A = torch.zeros(S, r_max, d_in)
    B = torch.zeros(S, d_out, r_max)
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, d_in, generator=g)
        B[s, :, :r] = torch.randn(d_out, r, generator=g)
    scaling = torch.rand(S, generator=g) + 0.5
    return A, B, scaling


@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize(
    "slots",
    [
        [0, 1, 2, 3, 4],
        [-1, -1, -1],
        [2, -1, 2, 2, 0, -1, 4, 2],
        [[0, 1], [-1, 2], [3, -1], [-1, -1]],  # stacks: two levels summed
        [1] * 12,  # many rows, one adapter: the grouped path
    ],
)
def test_fast_paths_match_reference(T, slots):
    A, B, scaling = _random_tables()
    slots = torch.tensor(slots)
    x = torch.randn(slots.shape[0], T, A.shape[2])
    ref = lora_delta_reference(x, A, B, scaling, slots)
    got = lora_delta(x, A, B, scaling, slots)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("idx", [[3, 0, 3, 4, 0, 0, 1], [0, 0, 1, 1, 1, 4], [2], [4, 3, 2, 1, 0]])
def test_segmented_and_gather_agree(idx):
    A, B, scaling = _random_tables()
    idx = torch.tensor(idx)
    x = torch.randn(idx.shape[0], 6, A.shape[2])
    torch.testing.assert_close(_segmented(x, A, B, scaling, idx), _gather_bmm(x, A, B, scaling, idx), atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_own_adapter():
    A1 = torch.randn(1, 2, 12, requires_grad=True)
    A2 = torch.randn(1, 2, 12, requires_grad=True)
    B1 = torch.randn(1, 10, 2, requires_grad=True)
    B2 = torch.randn(1, 10, 2, requires_grad=True)
    A, B = torch.cat([A1, A2]), torch.cat([B1, B2])
    x = torch.randn(3, 4, 12)
    out = lora_delta(x, A, B, torch.ones(2), torch.tensor([0, 0, -1]))
    out.sum().backward()
    assert A1.grad.abs().sum() > 0 and B1.grad.abs().sum() > 0
    assert A2.grad is None or A2.grad.abs().sum() == 0
    assert B2.grad is None or B2.grad.abs().sum() == 0


SPECS = [
    LoraSpec(rank=2, alpha=4, target_modules="attention"),
    LoraSpec(rank=4, alpha=8, target_modules="mlp"),
    LoraSpec(rank=8, alpha=16, target_modules="all"),
]


@pytest.fixture(scope="module")
def three_adapters(tiny_base):
    return [LoraAdapter.create(tiny_base, spec, seed=i + 1, init="random") for i, spec in enumerate(SPECS)]


def _peft_logits(plain_model, adapter, ids, tmp_path):
    model = copy.deepcopy(plain_model)
    if adapter is not None:
        save_peft(adapter, tmp_path)
        model = PeftModel.from_pretrained(model, tmp_path)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("table_kind", ["stacked", "slot_table"])
def test_mixed_batch_equals_each_row_alone_in_peft(tiny_base, plain_tiny_model, three_adapters, tmp_path, table_kind):
    host = LoraHost.attach(tiny_base.model)
    if table_kind == "stacked":
        table = StackedWeights(three_adapters)
    else:
        table = SlotTable(host, num_slots=4, max_rank=8)
        for slot, adapter in enumerate(three_adapters):
            table.load(slot, adapter)
    slots = [0, -1, 1, 2, 0, -1, 2]
    ids = torch.randint(3, 250, (len(slots), 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), host.route(table, slots):
        mixed = tiny_base.model(ids).logits
    with torch.no_grad():
        base_only = tiny_base.model(ids).logits
    for row, slot in enumerate(slots):
        adapter = three_adapters[slot] if slot >= 0 else None
        ref = _peft_logits(plain_tiny_model, adapter, ids[row : row + 1], tmp_path / f"r{row}")
        assert (mixed[row : row + 1] - ref).abs().max().item() <= 1e-5
        if adapter is not None:  # the adapter does change the output (the test can fail)
            assert (mixed[row] - base_only[row]).abs().max().item() > 1e-3


def test_slot_table_reload_and_clear(tiny_base, three_adapters):
    host = LoraHost.attach(tiny_base.model)
    table = SlotTable(host, num_slots=2, max_rank=8)
    ids = torch.randint(3, 250, (1, 5))
    with torch.no_grad():
        base_only = tiny_base.model(ids).logits
        table.load(0, three_adapters[2])
        with host.route(table, [0]):
            first = tiny_base.model(ids).logits
        table.load(0, three_adapters[0])  # same slot, other adapter: the old one is gone
        with host.route(table, [0]):
            second = tiny_base.model(ids).logits
        table.clear(0)
        with host.route(table, [0]):
            cleared = tiny_base.model(ids).logits
    assert (first - second).abs().max() > 1e-3
    torch.testing.assert_close(cleared, base_only)


def test_route_is_scoped(tiny_base, three_adapters):
    host = LoraHost.attach(tiny_base.model)
    ids = torch.randint(3, 250, (1, 5))
    with torch.no_grad():
        before = tiny_base.model(ids).logits
        with host.route(StackedWeights(three_adapters), [2]):
            pass
        after = tiny_base.model(ids).logits
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("idx", [[3, 0, 3, 4, 0, 0, 1], [0, 0, 1, 1, 1, 4], [2], [4, 3, 2, 1, 0], [1] * 9])
@pytest.mark.parametrize("T", [1, 3])
def test_padded_and_gather_agree(idx, T):
    """The decode path (rows in padded per-slot groups, each adapter read once) equals the per-row gather, for
    the whole-table plan and the few-of-many-slots plan ([2], [1] * 9 over 5 slots) alike."""
    from lorafleet.adapters.operator import _padded_bmm, _Plan  # noqa: PLC0415 - private helpers under test

    A, B, scaling = _random_tables()
    idx = torch.tensor(idx)
    x = torch.randn(idx.shape[0], T, A.shape[2])
    plan = _Plan(idx, A.shape[0])
    u = idx.unique().numel()
    # one adapter: a view of its slot; many: the whole table; few of many: those slots copied once
    assert (isinstance(plan.pick, slice), plan.pick is None) == (u == 1, u > 1 and 3 * u >= A.shape[0])
    torch.testing.assert_close(_padded_bmm(x, A, B, scaling, plan), _gather_bmm(x, A, B, scaling, idx),
                               atol=1e-5, rtol=1e-5)


def test_one_plan_serves_every_projection_of_a_routing():
    """A routing's plans are shared by projections of different shapes and equal the reference for each."""
    g = torch.Generator().manual_seed(5)
    slots = torch.tensor([[2, -1], [0, 1], [-1, 3], [2, 2], [4, -1]])
    plans: dict = {}
    for d_in, d_out in ((12, 10), (7, 19)):
        A = torch.randn(5, 3, d_in, generator=g)
        B = torch.randn(5, d_out, 3, generator=g)
        scaling = torch.rand(5, generator=g) + 0.5
        x = torch.randn(5, 1, d_in, generator=g)
        got = lora_delta(x, A, B, scaling, slots, plans=plans)
        torch.testing.assert_close(got, lora_delta_reference(x, A, B, scaling, slots), atol=1e-5, rtol=1e-5)
    assert len(plans) == 2  # one per level, computed once


@pytest.mark.parametrize("slots", [
    [[1]] * 6,  # one adapter for every row: the identity placement, weights as a view
    [[0], [1], [2], [3], [4], [0], [1], [2], [3], [4]],  # every slot twice, unsorted: one gather, no padding
    [[3], [0], [3], [-1], [0], [0]],  # some base rows: index_add into the base output
    [[2, 4], [0, -1], [-1, 3], [2, 2], [-1, -1]],  # stacks (two levels)
])
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("uniform", [True, False])
def test_lora_add_equals_base_plus_reference(slots, T, uniform):
    """lora_add (the serving path: the shared scaling folded into one add per level) equals y + the reference, and
    leaves y itself unchanged; for one-token rows and for compact prompts, uniform and mixed scalings."""
    from lorafleet.adapters.operator import lora_add  # noqa: PLC0415 - the serving entry under test

    A, B, scaling = _random_tables()
    if uniform:
        scaling = torch.full_like(scaling, 2.0)
    slots = torch.tensor(slots)
    x = torch.randn(slots.shape[0], T, A.shape[2])
    y = torch.randn(slots.shape[0], T, B.shape[1])
    before = y.clone()
    with torch.no_grad():
        got = lora_add(y, x, A, B, scaling, slots, plans={})
    torch.testing.assert_close(got, y + lora_delta_reference(x, A, B, scaling, slots), atol=1e-5, rtol=1e-5)
    assert torch.equal(y, before)
