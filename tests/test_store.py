"""The token store and the array-based data path: the numpy packer makes exactly the plan of the list
packer it replaced (kept here as the reference), the samplers read a lengths array, a cached store
reads back the records a fresh tokenization makes, parallel tokenization equals serial, and two
processes map one store without copying it (RssAnon/Pss, not VmRSS: see
shared/reference/cpu-distributed-facts.md)."""

from __future__ import annotations

import bisect
import random

import numpy as np
import pytest
import torch

from distlora import data as D


def reference_pack_rows(order, lengths, capacity):
    """The list-based best-fit-decreasing packer as it was before the numpy one (commit f296a8d)."""
    rows, free = [], []  # free: sorted (free tokens, row index)
    for i in sorted(order, key=lambda j: -lengths[j]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
        else:
            r, room = len(rows), capacity
            rows.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_numpy_packer_makes_exactly_the_reference_plan(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 7, 300, 5000])
    capacity = rng.choice([16, 64, 160, 2048])
    # few distinct lengths (many ties) or many; some exactly the capacity
    hi = rng.choice([capacity // 4, capacity])
    lengths = [rng.randint(1, max(1, hi)) for _ in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    assert D.pack_rows(order, lengths, capacity) == reference_pack_rows(order, lengths, capacity)
    sub = order[: n // 2]  # a subset of the examples, in shuffled order
    assert D.pack_rows(sub, lengths, capacity) == reference_pack_rows(sub, lengths, capacity)


def test_packed_sampler_rows_equal_reference_every_epoch():
    rng = random.Random(3)
    lengths = [rng.randint(3, 120) for _ in range(2000)]
    s = D.PackedBatchSampler(lengths, 128, 2, 2, 2, seed=9, shuffle=True)
    for epoch in range(3):
        s.position(epoch, 0)
        g = torch.Generator().manual_seed(9 * 100_003 + epoch)
        perm = torch.randperm(len(lengths), generator=g).tolist()
        ref = reference_pack_rows(perm, lengths, 128)
        g = torch.Generator().manual_seed(9 * 100_003 + epoch + 1_000_000_007)
        ref = [ref[i] for i in torch.randperm(len(ref), generator=g).tolist()]
        assert s.rows() == ref
        pad = [[-1]] * (s.steps_per_epoch * s.global_batch - s.n)
        assert [row for mb in s for row in mb] == ref + pad


def test_too_long_example_named_as_before():
    with pytest.raises(ValueError, match="example 2 has 9 tokens, more than the row capacity 8"):
        D.pack_rows([2, 1, 0, 3], [3, 9, 9, 1], 8)
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        D.PackedBatchSampler([3, 9, 9, 1], 8, 1, 1, 1, 0, True)
