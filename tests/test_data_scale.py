"""Per-rank data memory at scale (issue 14): what a rank holds per example is either mapped from files
(the store's int32 lengths, the packing plan saved next to the store) or its own share of an epoch's
order, and a launch checks the cache key without reading the data files again."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard

from distlora import data as D
from distlora import datacache
from distlora.store import LENGTHS, StoreWriter, TokenStore, ensure_lengths


def _store(path, lengths) -> TokenStore:
    w = StoreWriter(path)
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = np.arange(int(lengths.sum()), dtype=np.int32) % 1000
    w.add(ids, ids, lengths)
    w.close()
    return TokenStore(path)


def _dealt(sampler, procs: int, p: int) -> list:
    """What accelerate's prepare hands process p of `procs` (the backends' settings: no even_batches)."""
    return list(BatchSamplerShard(sampler, procs, p, split_batches=False, even_batches=False))


@pytest.mark.parametrize("kind", ["plain", "grouped", "packed"])
@pytest.mark.parametrize("world,sp", [(1, 1), (2, 1), (3, 1), (2, 2)])
def test_each_process_gets_from_its_share_exactly_what_accelerate_deals_it(kind, world, sp):
    """A sampler told its rank keeps only that process's micro batches; through accelerate's sharding every
    process gets exactly what it gets from the sampler that holds the whole order, at every epoch and
    resume position (the whole order's own tests prove it exactly-once and resumable)."""
    lengths = np.random.default_rng(world * 10 + sp).integers(1, 100, 997)
    micro, accum = 2, 3

    def make(rank):
        if kind == "packed":
            return D.PackedBatchSampler(lengths, 128, micro, accum, world, 5, True, sp, rank=rank)
        return D.GlobalBatchSampler(len(lengths), micro, accum, world, 5, True,
                                    lengths if kind == "grouped" else None, sp, rank=rank)

    whole = make(None)
    for epoch, start in ((0, 0), (1, 2)):
        whole.position(epoch, start)
        for p in range(world * sp):
            mine = make(p)
            mine.position(epoch, start)
            got = _dealt(mine, world * sp, p)
            assert len(mine) == len(whole) and len(got) == len(_dealt(whole, world * sp, p)) > 0
            assert got == _dealt(whole, world * sp, p), (epoch, start, p)


def test_a_rank_holds_only_its_share_of_an_epoch(tmp_path):
    """Started on a mapped store with its saved plan, a rank of two holds, while it iterates an epoch,
    its half of the epoch's examples and its rows' bounds, int32: ~3 bytes an example (numpy's
    allocations as tracemalloc counts them), where the whole epoch's int64 arrays alone were 16."""
    n = 200_000
    store = _store(tmp_path / "s", np.random.default_rng(0).integers(1, 33, n))
    loaders = {rank: D.make_loader(store, 0, 4, 1, 2, 0, True, pack=64, rank=rank)[0] for rank in (None, 0)}
    held = {}
    for rank, loader in loaders.items():
        tracemalloc.start()
        it = iter(loader)
        next(it)
        held[rank] = tracemalloc.get_traced_memory()[0] / n
        tracemalloc.stop()
        del it
    rows = loaders[0].batch_sampler.n
    # the share: n/2 examples x 4 bytes (int32) + n_rows/2 rows x (4 bytes row id + 4 bytes start) = this
    share = (n / 2 * 4 + rows / 2 * 8) / n
    print(f"\nbytes held per example: rank 0 of 2 {held[0]:.2f} (its share {share:.2f}), whole order {held[None]:.2f}")
    assert held[0] < share + 0.5  # 0.5 B/example (100 kB here): the batch, Python objects, allocator slack
    assert held[None] > 1.8 * held[0]  # the whole order is twice the share


@pytest.mark.parametrize("capacities", [(128, 200), (200, 128)])
def test_packing_plan_saved_per_capacity_mapped_and_equal_to_a_fresh_one(tmp_path, capacities):
    lengths = np.random.default_rng(1).integers(1, 120, 3000)
    store = _store(tmp_path / "s", lengths)
    perm = np.random.default_rng(2).permutation(len(lengths))
    for capacity in capacities:  # the second capacity must not reuse the first one's plan
        fresh = D.PackPlan(lengths, capacity)
        for _ in range(2):  # saved on the first call, mapped on the second
            plan = D.PackPlan.for_store(store, capacity)
            assert isinstance(plan.slot_order, np.memmap) and plan.n_rows == fresh.n_rows
            for a, b in zip(plan.rows_for(perm), fresh.rows_for(perm)):
                np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in store.path.glob("pack-*")) == [f"pack-{c}" for c in sorted(capacities)]


def test_packer_above_uint16_capacities_makes_the_reference_plan():
    """rows_for sorts by a uint16 key below 65536 tokens a row and by int64 above: both the list packer's plan."""
    from test_store import reference_pack_rows

    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 70_000, 400).tolist()
    order = rng.permutation(400).tolist()
    assert D.pack_rows(order, lengths, 70_000) == reference_pack_rows(order, lengths, 70_000)


def test_a_store_without_lengths_gets_them_once_and_maps_them(tmp_path, monkeypatch):
    lengths = np.random.default_rng(4).integers(1, 50, 500)
    path = _store(tmp_path / "s", lengths).path
    (path / LENGTHS).unlink()  # a store written before lengths.npy existed
    old = TokenStore(path)
    np.testing.assert_array_equal(old.lengths, lengths)
    assert not isinstance(old.lengths, np.memmap)  # derived in memory
    import distlora.store as store_mod

    def read_only(*_a, **_k):
        raise PermissionError("read-only")

    monkeypatch.setattr(store_mod, "save_atomic", read_only)
    assert not ensure_lengths(path) and not (path / LENGTHS).exists()
    monkeypatch.undo()
    assert ensure_lengths(path)
    new = TokenStore(path)
    assert isinstance(new.lengths, np.memmap) and new.lengths.dtype == np.int32
    np.testing.assert_array_equal(new.lengths, lengths)


def test_data_file_hash_remembered_under_its_stat_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    import hashlib
    import time

    monkeypatch.setattr(datacache, "MEMO_SETTLE_S", 0.2)
    reads = []
    sha = datacache._sha_file
    monkeypatch.setattr(datacache, "_sha_file", lambda p: reads.append(p) or sha(p))
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n')
    root = tmp_path / "cache"
    root.mkdir()
    first = datacache.FileHashes(root)
    assert first.sha256(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert not first.added  # written just now (the racy window): hashed, not remembered
    time.sleep(0.3)
    memo = datacache.FileHashes(root)
    digest = memo.sha256(str(f))
    memo.save()
    reads.clear()
    assert datacache.FileHashes(root).sha256(str(f)) == digest and reads == []  # a stat, no read
    # same size, mtime set back: only the ctime (which cannot be set back) tells the change
    st = os.stat(f)
    f.write_text('{"prompt": "x", "completion": "y"}\n')
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    again = datacache.FileHashes(root).sha256(str(f))
    assert again == hashlib.sha256(f.read_bytes()).hexdigest() != digest and reads == [os.path.realpath(f)]
