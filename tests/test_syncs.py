"""Host reads of device values per optimizer step (on CUDA each one is a device-to-host sync that stalls the
host until the GPU queue drains): distlora's own code reads the device exactly once per step (the grad norm
with the step's sums); everything else counted is transformers' mask builder, inside the model's forward.

Counted by tests/hooks' HostReads from the window's fetch to its log row. Proven able to fail: with the
window's target count read back as `int(...)` per micro batch, or the non-finite vote `.item()`-ed between
forward and backward (the loop before this change), the distlora count per step is 2-4, not 1."""

from __future__ import annotations

import json

import pytest
from conftest import CPU_DDP, base_config, launch, run_inprocess, write_config

# transformers 5.24's mask builder, per forward: padded rows read the padding mask twice
# (masking_utils._ignore_causal_mask_sdpa: fast_all); packed rows once (find_packed_sequence_indices)
LIBRARY = "transformers/masking_utils.py"


def _cfg(tiny, tmp_path, name, **sections):
    raw = base_config(tiny, tmp_path / name / "out")
    raw["train"].update(max_steps=3, gradient_accumulation_steps=2, micro_batch_size=2, log_every=2, eval_every=0)
    for section, values in sections.items():
        raw[section].update(values)
    return write_config(tmp_path / name / "c.yaml", raw)


def _ours(where_per_step):
    return [[w for w in step if LIBRARY not in w] for step in where_per_step]


@pytest.mark.parametrize("variant", [
    {},  # padded rows, plain loss
    {"data": {"packing": True}},
    {"train": {"loss_chunk_size": 16}},  # target positions selected with the host's count: no nonzero
], ids=["padded", "packed", "chunked"])
def test_one_host_read_per_step(tiny, tmp_path, variant):
    from distlora_test_hooks import HostReads

    cfg = _cfg(tiny, tmp_path, "run", **variant)
    reads = HostReads().install()
    try:
        assert run_inprocess(cfg) == 0
    finally:
        reads.uninstall()
    assert len(reads.steps) == 3
    assert _ours(reads.where) == [["tolist distlora/loop.py:" + reads.where[0][-1].rsplit(":", 1)[1]]] * 3, reads.where
    # the library's: at most 2 per forward (the second only when a row has padding), 2 forwards per step
    assert all(sum(LIBRARY in w for w in step) <= 4 for step in reads.where), reads.where


@pytest.mark.slow  # ~30-50 s: keeps `make test` near 15 minutes
def test_one_host_read_per_step_ddp(tiny, tmp_path):
    """Two gloo processes: the collectives add no host read; the ranks agree on everything from one read."""
    cfg = _cfg(tiny, tmp_path, "ddp")
    launch(2, cfg, env={"DISTLORA_TEST_HOST_READS": "1"}, config_file=CPU_DDP)
    for rank in range(2):
        rec = json.loads((tmp_path / "ddp" / "out" / f"host-reads-rank{rank}.json").read_text())
        assert len(rec["steps"]) == 3
        assert all(len(step) == 1 and step[0].startswith("tolist distlora/loop.py") for step in _ours(rec["where"])), rec
