"""The KV slab keeps every row's tokens right-aligned at ``pos`` through joins, leaves and relocations."""

from __future__ import annotations

import random

import torch

from lorafleet.serving.kv import KVSlab


def _row_values(slab: KVSlab, row: int) -> list[float]:
    n = slab.lens[row]
    return slab.k[0][row, 0, slab.pos - n : slab.pos, 0].tolist()


def _joiner(lengths: list[int], start_value: float) -> tuple[KVSlab, list[list[float]]]:
    """A prefill slab whose rows hold distinct values, left-padded to the longest."""
    width = max(lengths)
    src = KVSlab(2, len(lengths), 1, 2, capacity=width)
    src.count, src.lens, src.pos = len(lengths), list(lengths), width
    expected = []
    for i, n in enumerate(lengths):
        vals = [start_value + 100 * i + j for j in range(n)]
        for buf in (*src.k, *src.v):
            buf[i, 0, width - n : width, 0] = torch.tensor(vals)
        expected.append(vals)
    return src, expected


def test_random_joins_steps_and_leaves_keep_rows_intact():
    rng = random.Random(0)
    slab = KVSlab(2, 8, 1, 2, capacity=8)
    rows: list[list[float]] = []  # expected cached values per row
    counter = 1000.0
    for _ in range(300):
        op = rng.random()
        if op < 0.25 and slab.count < 8:
            lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 8 - slab.count))]
            src, expected = _joiner(lengths, counter)
            counter += 1000
            slab.insert(src, list(range(len(lengths))))
            rows.extend(expected)
        elif op < 0.4 and slab.count:
            gone = rng.sample(range(slab.count), rng.randint(1, slab.count))
            moves = slab.remove(gone)
            for src_row, dst_row in moves:
                rows[dst_row] = rows[src_row]
            del rows[slab.count :]
        elif slab.count:
            mask, positions = slab.begin_decode()
            n = slab.count
            assert positions[:, 0].tolist() == slab.lens
            assert mask.shape == (n, 1, 1, slab.width + 1)
            assert mask[:, 0, 0].sum(-1).tolist() == [x + 1 for x in slab.lens]  # own tokens + the new one
            new = torch.tensor([counter + i for i in range(n)])
            key = torch.zeros(n, 1, 1, 2)
            key[:, 0, 0, 0] = new
            slab.write(0, key, key)
            slab.write(1, key, key)
            slab.end_decode()
            for i in range(n):
                rows[i].append(counter + i)
            counter += 100
        assert slab.count == len(rows)
        for i in range(slab.count):
            assert _row_values(slab, i) == rows[i]
    assert slab.relocations > 0


def test_prefill_mask_never_has_an_empty_row():
    slab = KVSlab(1, 3, 1, 2, capacity=6)
    slab.count, slab.lens = 3, [6, 2, 1]
    mask, positions = slab.prefill_chunk(0, 6, torch.tensor([0, 4, 5]))
    assert bool(mask.any(-1).all())
    assert positions[1].tolist() == [0, 0, 0, 0, 0, 1]
    # a real query sees exactly its causal, unpadded keys
    assert mask[1, 0, 5].tolist() == [False, False, False, False, True, True]
