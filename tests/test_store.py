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


# ------------------------------------------------------------------------------- tokenizing in parallel


def test_parallel_tokenization_equals_serial_and_names_bad_rows(tiny, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from conftest import base_config, write_config
    from distlora import config as C

    rows = [{"prompt": f"Q: {i}+{i}?" * (1 + i % 5), "completion": f" {2 * i}"} for i in range(300)]
    raw = base_config(tiny, tmp_path / "o", data={"eval": None, "max_seq_len": 24})
    cfg = C.load(write_config(tmp_path / "c.yaml", raw), check_model=False)
    tok = AutoTokenizer.from_pretrained(tiny / "model")
    renderer = D.Renderer(tok, "completion", "prompt", "completion", cfg.data, True, "right")
    monkeypatch.setattr(D, "CHUNK", 16)
    monkeypatch.setattr(D, "PARALLEL_MIN_ROWS", 32)
    serial, parallel = D.DataStats(), D.DataStats()
    one = D.tokenize_rows(rows, renderer, cfg.data, serial, "s", procs=1)
    two = D.tokenize_rows(rows, renderer, cfg.data, parallel, "s", procs=2)
    assert one == two and vars(serial) == vars(parallel) and serial.truncated > 0
    # the per-row path (no batch API; truncation right, examples without a trained token dropped)
    expected = [{"input_ids": t.input_ids[:24], "labels": t.labels[:24]} for t in map(renderer, rows)]
    assert one == [r for r in expected if any(x != D.IGNORE for x in r["labels"][1:])]
    bad = rows[:200] + [{"prompt": "p"}] + rows[200:]
    with pytest.raises(D.DataError, match=r"^s, example 200: format 'completion' needs field\(s\) \['completion'\]"):
        D.tokenize_rows(bad, renderer, cfg.data, D.DataStats(), "s", procs=2)


# ------------------------------------------------------------------------------- two ranks, one store

_CHILD = r"""
import json, os, sys, time
from pathlib import Path

def mem():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "VmRSS"):
            out[k] = int(v.split()[0])
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1])
    return out

from distlora.store import TokenStore
import numpy as np
before = mem()
s = TokenStore(Path(sys.argv[1]))
total = 0
for a in range(0, s.n_tokens, 1 << 20):  # touch every page of both token files
    total += int(s.input_ids[a:a + (1 << 20)].sum()) + int(s.labels[a:a + (1 << 20)].sum())
lengths = s.lengths
def barrier(name):  # both processes reach `name` before either goes on
    Path(f"{sys.argv[2]}.{name}.{os.getpid()}").write_text(name)
    deadline = time.time() + 60
    while len(list(Path(sys.argv[2]).parent.glob(f"{Path(sys.argv[2]).name}.{name}.*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)

barrier("mapped")
after = mem()
barrier("measured")  # neither unmaps the store (exits) before the other has measured
print(json.dumps({"before": before, "after": after, "total": total, "n": len(s)}))
"""


def test_two_processes_map_one_store_without_copying(tmp_path):
    """Each process touches every token of a 64 MB store: its anonymous memory stays flat (the pages are
    the shared page cache's), VmRSS grows by the whole store in each, and Pss, which splits shared pages
    among their users, shows each process charged about half of it while both hold it."""
    import json
    import os
    import subprocess
    import sys

    from distlora.store import StoreWriter

    n_tok, n_ex = 8 << 20, 1 << 16
    w = StoreWriter(tmp_path / "store")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150_000, n_tok, dtype=np.int32)
    w.add(ids, ids, np.full(n_ex, n_tok // n_ex, dtype=np.int64))
    w.close()
    store_mb = 2 * n_tok * 4 / 2**20
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(D.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "store"), str(tmp_path / "ready")],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    for o in outs:
        grow = {k: (o["after"][k] - o["before"][k]) / 1024 for k in o["after"]}
        print({k: f"{v:.1f} MB" for k, v in grow.items()}, f"store {store_mb:.0f} MB")
        assert o["n"] == n_ex and o["total"] == 2 * int(ids.astype(np.int64).sum())
        assert grow["RssAnon"] < 0.1 * store_mb, grow  # no private copy
        assert grow["VmRSS"] > 0.9 * store_mb, grow  # every page really mapped and read
        assert grow["Pss"] < 0.75 * store_mb, grow  # shared with the other process
