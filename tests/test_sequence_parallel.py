"""Sequence parallelism (train.sequence_parallel_size): shards made by the collator, dealt to whole groups,
and real `accelerate launch` runs that must equal runs without it (distlora.sequence_parallel)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, base_config, launch, load_adapter, max_abs_diff, read_metrics, write_config
from distlora import data as D

# fp32 on CPU, 3 steps at lr 1e-3: what separates an exact run from its reference is summation order
# (attention per head on another rank, the loss summed in pieces). Measured here: losses within 7.2e-7,
# eval losses within 5e-7, first gradients within 6e-7 absolute (of ~2), grad norms within 1.9e-6 (of ~8),
# adapters within 1.2e-7. 1e-5 is
# the bound, an order of magnitude above that noise; the variants are off by 0.5-1.3 in the
# gradients and 2.7e-3 in the adapter (the variant test asserts 100x and 10x the bound).
TOL = 1e-5
SEQ = 128  # row width; the data holds examples longer than half of it


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """Completions with masked prompts of 4..100 characters (the tiny tokenizer: one token each), so
    examples run from ~12 to ~125 tokens, many longer than half a 128-token row, and the two halves of a
    row hold different numbers of target tokens (the prompt is masked, the completion is not)."""
    rng = random.Random(7)
    d = tmp_path_factory.mktemp("sp-data")

    def rows(n):
        out = []
        for _ in range(n):
            p = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(4, 100)))
            c = "".join(rng.choice("0123456789 ") for _ in range(rng.randint(3, 22)))
            out.append({"prompt": p, "completion": c})
        return out

    for name, n in (("train", 21), ("eval", 7)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    return d


def sp_config(tiny, long_data, out, packed: bool, sp: int = 1, micro: int = 2, accum: int = 2, **train):
    return base_config(
        tiny, out,
        data={"train": str(long_data / "train.jsonl"), "eval": str(long_data / "eval.jsonl"), "max_seq_len": SEQ,
              "packing": packed},
        train={"micro_batch_size": micro, "gradient_accumulation_steps": accum, "max_steps": 3, "lr": 1e-3,
               "sequence_parallel_size": sp, **train},
    )


def run(tmp_path, name, nproc, cfg, env=None, check=True):
    path = write_config(tmp_path / name / "c.yaml", cfg)
    return launch(nproc, path, env={"DISTLORA_TEST_FIRST_GRADS": "1", **(env or {})}, check=check)


def differences(a, b) -> dict:
    """Largest differences between two runs: per-step train loss, eval loss, first-step gradients, adapter."""
    ma, mb = read_metrics(a), read_metrics(b)
    train_a, train_b = ([r for r in m if "loss" in r] for m in (ma, mb))
    eval_a, eval_b = ([r["eval_loss"] for r in m if "eval_loss" in r] for m in (ma, mb))
    assert [r["target_tokens"] for r in train_a] == [r["target_tokens"] for r in train_b]
    assert [r["examples"] for r in train_a] == [r["examples"] for r in train_b]
    diff = {
        "loss": max(abs(x["loss"] - y["loss"]) for x, y in zip(train_a, train_b, strict=True)),
        "eval": max(abs(x - y) for x, y in zip(eval_a, eval_b, strict=True)),
        "grad_norm": max(abs(x["grad_norm"] - y["grad_norm"]) for x, y in zip(train_a, train_b, strict=True)),
        "adapter": max_abs_diff(load_adapter(a / "adapter"), load_adapter(b / "adapter")),
    }
    ga, gb = (torch.load(d / "first-grads-rank0.pt") for d in (a, b))
    if ga and gb:  # DeepSpeed keeps reduced gradients in its partitions: no p.grad to compare (grad_norm is)
        assert ga.keys() == gb.keys()
        diff["grads"] = max(float((ga[k] - gb[k]).abs().max()) for k in ga)
    return diff


# ------------------------------------------------------------------------------------- collator, sampler


@pytest.mark.parametrize("packed", [False, True])
def test_shards_put_back_together_are_the_batch_with_labels_shifted_over_the_row(packed):
    """Each shard: its slice of the tokens and global positions, labels reaching one token into the next
    shard; targets and lengths over the shards counted once; segment bounds of the full row on each."""
    rng = random.Random(3)
    exs = [{"input_ids": [rng.randint(5, 90) for _ in range(n)], "labels": [-100] * 3 + list(range(n - 3)), "id": i}
           for i, n in enumerate([37, 9, 20, 41])]
    batch = [[exs[0], exs[1]], [exs[2], exs[3]]] if packed else exs
    inner = D.PackedCollator(0) if packed else D.Collator(0)
    full = inner(batch)
    n = 3
    shards = [D.SequenceShard(inner, n, k, 0)(batch) for k in range(n)]
    ids = torch.cat([s["input_ids"] for s in shards], dim=1)
    rows = full["input_ids"].reshape(1, -1) if packed else full["input_ids"]
    width = rows.shape[1]
    assert ids.shape[1] % n == 0 and ids.shape[1] - width < n  # padded to a multiple of n, no more
    assert torch.equal(ids[:, :width], rows) and (ids[:, width:] == 0).all()
    labels_full = (full["labels"].reshape(1, -1) if packed else full["labels"])
    for k, s in enumerate(shards):
        a = k * s["input_ids"].shape[1]
        want = torch.cat([labels_full, torch.full((labels_full.shape[0], n + 1), -100)], dim=1)
        assert torch.equal(s["labels"], want[:, a : a + s["input_ids"].shape[1] + 1])  # one label into the next shard
        assert s["host"]["sp_bounds"][-1] == ids.numel()
    pos = torch.cat([s["position_ids"] for s in shards], dim=1)[:, :width]
    assert torch.equal(pos, full["position_ids"].reshape(1, -1) if packed else torch.arange(width).expand(len(exs), -1))
    assert sum(s["host"]["targets"] for s in shards) == full["host"]["targets"]
    assert [s["host"]["lengths"] for s in shards] == [full["host"]["lengths"], [], []]
    if packed:
        assert shards[0]["host"]["sp_bounds"][:-1] == full["host"]["cu_seq_lens"]


def test_a_group_gets_the_same_micro_batches_and_the_groups_every_example_once():
    """2 data-parallel x 2 sequence-parallel ranks, dealt as accelerate deals (yield i to rank i % 4)."""
    s = D.GlobalBatchSampler(13, micro=2, accum=2, world=2, seed=1, shuffle=True, sp=2)
    plain = D.GlobalBatchSampler(13, micro=2, accum=2, world=2, seed=1, shuffle=True)
    got = list(s)
    assert len(got) == len(s) == 2 * len(plain)
    per_rank = [got[r::4] for r in range(4)]
    assert per_rank[0] == per_rank[1] and per_rank[2] == per_rank[3]
    assert per_rank[0] == list(plain)[0::2] and per_rank[2] == list(plain)[1::2]


# ------------------------------------------------------------------------------------- real launches


@pytest.fixture(scope="module")
def reference(tiny, long_data, tmp_path_factory):
    """One process, no sequence parallelism, padded and packed (each its own run)."""
    tmp = tmp_path_factory.mktemp("sp-ref")
    outs = {}
    for packed in (False, True):
        out = tmp / f"ref-{packed}" / "out"
        run(tmp, f"ref-{packed}", 1, sp_config(tiny, long_data, out, packed))
        outs[packed] = out
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sequence_parallel_2_on_2_processes_equals_one_process(tiny, long_data, tmp_path, reference, packed):
    """Packed: with gradient checkpointing (each layer's all-to-all run again in backward) and the chunked
    loss (a shard's targets 16 at a time) against a reference that uses neither."""
    out = tmp_path / "sp" / "out"
    cfg = sp_config(tiny, long_data, out, packed, sp=2, **({"loss_chunk_size": 16} if packed else {}))
    cfg["model"]["gradient_checkpointing"] = packed
    run(tmp_path, "sp", 2, cfg)
    diff = differences(reference[packed], out)
    print(f"sp=2 vs 1 process ({'packed' if packed else 'padded'}): {diff}")
    assert max(diff.values()) < TOL, diff


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero2", "fsdp2"])
def test_sequence_parallel_on_zero2_and_fsdp2_equals_one_process(tiny, long_data, tmp_path, reference, backend):
    """The same attention and loss scale under DeepSpeed (which averages gradients over all ranks, knowing
    nothing of the groups) and FSDP2 (reduce-scatter over all ranks), packed."""
    out = tmp_path / "sp" / "out"
    cfg = sp_config(tiny, long_data, out, True, sp=2, backend=backend)
    ds = ROOT / "configs" / "accelerate" / "cpu_deepspeed_zero2.yaml" if backend == "zero2" else None
    launch(2, write_config(tmp_path / "sp" / "c.yaml", cfg), env={"DISTLORA_TEST_FIRST_GRADS": "1"}, config_file=ds)
    diff = differences(reference[True], out)
    print(f"sp=2 on {backend} vs 1 process: {diff}")
    assert max(diff.values()) < TOL, diff


@pytest.mark.slow
@pytest.mark.parametrize("variant,packed", [("per_rank_norm", False), ("stock_ulysses", True)])
def test_inexact_variants_fail_the_comparison(tiny, long_data, tmp_path, reference, variant, packed):
    """Each rank normalising by its own target tokens, and stock Ulysses' one causal attention over a
    packed row, are caught by the comparison above."""
    out = tmp_path / "v" / "out"
    run(tmp_path, "v", 2, sp_config(tiny, long_data, out, packed, sp=2), env={"DISTLORA_TEST_SP_VARIANT": variant})
    diff = differences(reference[packed], out)
    print(f"variant {variant}: {diff}")
    assert diff["grads"] > 100 * TOL and diff["grad_norm"] > 100 * TOL and diff["adapter"] > 10 * TOL, diff


@pytest.mark.slow
def test_2_data_parallel_x_2_sequence_parallel_equals_2_process_ddp_and_resumes_exactly(tiny, long_data, tmp_path):
    """4 processes (2 x 2) against 2 processes of plain DDP, same global batch; the 4-process run is stopped
    after a step (SIGUSR1 on one rank), checkpoints, and the same command resumes it to the same end."""
    ddp = tmp_path / "ddp" / "out"
    run(tmp_path, "ddp", 2, sp_config(tiny, long_data, ddp, True, accum=1, max_steps=4, save_every=2))
    out = tmp_path / "sp" / "out"
    cfg = sp_config(tiny, long_data, out, True, sp=2, accum=1, max_steps=4, save_every=2)
    stopped = run(tmp_path, "sp", 4, cfg, env={"DISTLORA_FAULT": "rank3:step1:usr1"}, check=False)
    assert "distlora: stopped at step 2/4" in stopped.stdout + stopped.stderr, stopped.stderr[-3000:]
    assert not (out / "adapter").exists()
    run(tmp_path, "sp", 4, cfg)
    diff = differences(ddp, out)
    print(f"2 x 2 vs 2-process DDP, stopped and resumed: {diff}")
    assert max(diff.values()) < TOL, diff
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("procs,sp,field", [(3, 2, "does not divide the 3 processes"),
                                            (3, 3, "does not divide the model's 4 attention heads")])
def test_launcher_refuses_before_launch_naming_the_field(tiny, long_data, tmp_path, procs, sp, field):
    cfg = write_config(tmp_path / "c.yaml", sp_config(tiny, long_data, tmp_path / "out", False, sp=sp))
    res = subprocess.run([sys.executable, "-m", "distlora", "launch", "--config", str(cfg), "--cpu",
                          "--processes-per-node", str(procs), "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"train.sequence_parallel_size: {sp} {field}" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_attention_implementation_it_cannot_use_is_a_config_error(tiny, long_data, tmp_path):
    from distlora import config as C

    raw = sp_config(tiny, long_data, tmp_path / "out", False, sp=2)
    raw["model"]["attn_implementation"] = "eager"
    with pytest.raises(C.ConfigError) as err:
        C.load(write_config(tmp_path / "c.yaml", raw))
    assert "model.attn_implementation: 'eager' with train.sequence_parallel_size=2" in err.value.render()


# ------------------------------------------------------------------------------------- the attention alone


def _attention_worker(rank, port, out):
    import torch.distributed as dist
    import torch.nn.functional as F
    from types import SimpleNamespace

    from distlora import sequence_parallel as SP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    SP.init(rank, 2, 2)
    errs = [e for kv_heads in (2, 1) for e in _attention_errors(SP, F, SimpleNamespace, rank, kv_heads)]
    torch.save(errs, f"{out}-{rank}.pt")
    dist.destroy_process_group()


def _attention_errors(SP, F, SimpleNamespace, rank, kv_heads):
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 4, 12, 8
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, kv_heads, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)  # a weighting, so gradients differ per position
    bounds = [0, 5, 12, 19, 24]  # the 2 rows of 12 read as one row: 0-5, 5-12 in row 0; 0-7, 7-12 in row 1
    s = t // 2
    mine = [x[:, :, rank * s : (rank + 1) * s].clone().requires_grad_() for x in (q, k, v)]
    out_local, _ = SP.sp_attention_forward(SimpleNamespace(is_causal=True), *mine, None, sp_bounds=bounds)
    (out_local * w[:, rank * s : (rank + 1) * s]).sum().backward()
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = []
    for r in range(b):
        for a, e in ((0, 5), (5, 12)) if r == 0 else ((0, 7), (7, 12)):
            qq, kk, vv = (x[r : r + 1, :, a:e] for x in full)
            kk, vv = (x.repeat_interleave(h // kv_heads, dim=1) for x in (kk, vv))
            ref.append((r, a, e, F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).transpose(1, 2)))
    out_ref = torch.zeros(b, t, h, d, dtype=torch.float64)
    for r, a, e, o in ref:
        out_ref[r : r + 1, a:e] = o
    (out_ref * w).sum().backward()
    errs = [float((out_local - out_ref[:, rank * s : (rank + 1) * s]).abs().max())]
    return errs + [float((m.grad - f.grad[:, :, rank * s : (rank + 1) * s]).abs().max()) for m, f in zip(mine, full)]


def test_sp_attention_equals_per_segment_attention_on_the_whole_rows(tmp_path):
    """Two gloo ranks, each with half of two rows' tokens: output and the gradients of q, k and v on each
    shard equal causal attention per segment of the whole rows (float64: ~1e-16 apart; 1e-12 leaves
    room for summation order only). 2 kv heads are split over the ranks; 1 kv head takes the repeated path."""
    import torch.multiprocessing as mp

    from conftest import free_port

    mp.spawn(_attention_worker, args=(free_port(), str(tmp_path / "errs")), nprocs=2)
    errs = [e for r in range(2) for e in torch.load(tmp_path / f"errs-{r}.pt")]
    assert max(errs) < 1e-12, errs


# ------------------------------------------------------------------------------------- the memory plan


def test_plan_holds_one_gpus_share_of_the_row_and_offers_more_ranks_as_a_fix(tiny, long_data, tmp_path):
    """Activations and logits of N ranks at N x L tokens are one rank's at L (packed sdpa: no [L, L] term
    either way), the model state unchanged; a run that does not fit is offered the smallest N that does."""
    from distlora import config as C
    from distlora.plan import estimate, model_shape, resolve_memory

    def cfg(sp, seq):
        raw = sp_config(tiny, long_data, tmp_path / "out", True, sp=sp, micro=1, loss_chunk_size=0)
        raw["data"]["max_seq_len"] = seq
        raw["model"]["gradient_checkpointing"] = False
        return C.load(write_config(tmp_path / f"c{sp}-{seq}.yaml", raw))

    shape = model_shape(cfg(1, 512))
    one, four = (estimate(cfg(sp, 512 * sp), 4, "ddp", shape, loss_chunk=0) for sp in (1, 4))
    assert four.rows == one.rows  # every row, bytes exactly
    assert estimate(cfg(4, 4 * 512 + 1), 4, "ddp", shape, loss_chunk=0).rows["activations"] > one.rows["activations"]
    long = cfg(1, 4 * 512)
    need = {sp: estimate(cfg(sp, 4 * 512), 4, "ddp", shape, loss_chunk=0).total(False) for sp in (1, 2, 4)}
    assert need[1] > need[2] > need[4]
    mem = resolve_memory(long, on_gpu=True, gpus=4, device_bytes=int((need[2] + need[1]) / 2 / 0.9), shape=shape)
    assert ("train.sequence_parallel_size=2", need[2]) in mem.fixes, mem.fixes
