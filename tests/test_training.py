"""The training loop, proven by comparison on 1 and 2 real CPU processes (gloo DDP).

Tolerances: runs are fp32 with dropout 0 where parity is claimed. Measured on this machine:
1 vs 2 processes differ only by summation order (~1e-8, shared/reference/cpu-distributed-facts.md);
1e-5 leaves room for thread-count effects and fails loudly for a normalisation bug (a per-micro-batch
mean is off by 3.4e-4 in the first step's grad norm: tests/test_promises.py,
test_accumulated_gradient_is_the_token_mean_of_the_window).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import N_SMALL, base_config, launch, load_adapter, max_abs_diff, read_metrics, run_inprocess, write_config

N_TRAIN = N_SMALL
PARITY = dict(lora={"r": 4, "alpha": 8, "dropout": 0.0}, train={"max_steps": None, "epochs": 2, "log_every": 1})


def _cfg(tiny, tmp, small_data, name, **train):
    raw = base_config(tiny, tmp / name / "out", **PARITY)
    raw["data"]["train"] = str(small_data)
    raw["train"].update(train)
    return write_config(tmp / name / "c.yaml", raw)


@pytest.fixture(scope="module")
def two_proc(tiny, small_data, tmp_path_factory):
    """2 processes x micro 2 x accumulation 1, with example-id tracing."""
    tmp = tmp_path_factory.mktemp("two")
    cfg = _cfg(tiny, tmp, small_data, "c", micro_batch_size=2)
    launch(2, cfg, env={"DISTLORA_TRACE_IDS": "1", "DISTLORA_TEST_BASE_CHECKSUM": "1"})
    return tmp / "c" / "out"


def test_parity_1proc_accum_and_2proc(tiny, small_data, tmp_path, two_proc):
    """Same global batch (4), shuffling on, variable lengths: (a) 1 x micro 4, (b) 1 x micro 2 x accum 2,
    (c) 2 processes x micro 2 give the same adapter within 1e-5."""
    a = _cfg(tiny, tmp_path, small_data, "a", micro_batch_size=4)
    b = _cfg(tiny, tmp_path, small_data, "b", micro_batch_size=2, gradient_accumulation_steps=2)
    assert run_inprocess(a) == 0 and run_inprocess(b) == 0
    ad_a = load_adapter(tmp_path / "a" / "out" / "adapter")
    ad_b = load_adapter(tmp_path / "b" / "out" / "adapter")
    ad_c = load_adapter(two_proc / "adapter")
    assert max_abs_diff(ad_a, ad_b) < 1e-5
    assert max_abs_diff(ad_a, ad_c) < 1e-5
    # the runs did train: the adapter moved far beyond the tolerance
    assert max(float(v.abs().max()) for k, v in ad_a.items() if "lora_B" in k) > 1e-2
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / "out") if "loss" in r]
    lc = [r["loss"] for r in read_metrics(two_proc) if "loss" in r]
    assert len(la) == len(lc) == 2 * 10 and max(abs(x - y) for x, y in zip(la, lc)) < 1e-5
    # eval loss: gathered per example, identical for 1 and 2 processes
    ea = [r["eval_loss"] for r in read_metrics(tmp_path / "a" / "out") if "eval_loss" in r]
    ec = [r["eval_loss"] for r in read_metrics(two_proc) if "eval_loss" in r]
    assert abs(ea[-1] - ec[-1]) < 1e-6


def test_ranks_in_sync_and_adapter_only_allreduced(tiny, two_proc):
    summary = json.loads((two_proc / "summary.json").read_text())
    ranks = summary["per_rank"]
    assert len(ranks) == 2
    assert ranks[0]["adapter_checksum"] == ranks[1]["adapter_checksum"]
    base = [json.loads((two_proc / f"base-checksum-rank{r}.json").read_text()) for r in range(2)]
    for b in base:  # frozen base untouched, the same on both ranks
        assert b["start"] == b["end"] == base[0]["start"] != 0
    adapter = load_adapter(two_proc / "adapter")
    adapter_bytes = sum(v.numel() * 4 for v in adapter.values())  # fp32 gradients of the LoRA params only
    rows = [r for r in read_metrics(two_proc) if "loss" in r]
    assert {r["comm_bytes"] for r in rows} == {adapter_bytes}


def test_accumulation_skips_sync_on_micro_steps(tiny, small_data, tmp_path):
    """2 processes x accumulation 2: still one all-reduce of the adapter gradients per optimizer step."""
    cfg = _cfg(tiny, tmp_path, small_data, "acc", micro_batch_size=1, gradient_accumulation_steps=2, max_steps=3)
    launch(2, cfg)
    out = tmp_path / "acc" / "out"
    adapter_bytes = sum(v.numel() * 4 for v in load_adapter(out / "adapter").values())
    assert {r["comm_bytes"] for r in read_metrics(out) if "loss" in r} == {adapter_bytes}


def test_exactly_once_across_two_processes(two_proc):
    ids_per_step: dict[int, list[int]] = {}
    for rank in (0, 1):
        for line in (two_proc / f"trace-ids-rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            ids_per_step.setdefault(row["step"], []).extend(row["ids"])
    steps_per_epoch = 10  # ceil(37 / global batch 4)
    for epoch in range(2):
        ids = [i for s in range(1 + epoch * steps_per_epoch, 1 + (epoch + 1) * steps_per_epoch) for i in ids_per_step[s]]
        real = [i for i in ids if i >= 0]
        assert sorted(real) == list(range(N_TRAIN)), "every example exactly once per epoch"
        assert ids.count(-1) == 4 * steps_per_epoch - N_TRAIN  # padding examples fill the last global batch
    rows = [r for r in read_metrics(two_proc) if "loss" in r]
    assert sum(r["examples"] for r in rows) == 2 * N_TRAIN


def test_gradient_checkpointing_same_adapter_on_2_processes(tiny, small_data, tmp_path, two_proc):
    cfg = _cfg(tiny, tmp_path, small_data, "gc", micro_batch_size=2)
    launch(2, cfg, "model.gradient_checkpointing=true")
    assert max_abs_diff(load_adapter(tmp_path / "gc" / "out" / "adapter"), load_adapter(two_proc / "adapter")) < 1e-6


def _resume_pair(tiny, small_data, tmp_path, run):
    """Straight 2K steps (checkpoint at K) vs a fresh output dir holding only that checkpoint, resumed."""
    k = 4
    straight = _cfg(tiny, tmp_path, small_data, "straight", micro_batch_size=2, max_steps=2 * k, save_every=k)
    run(straight, "lora.dropout=0.2")
    ckpt = tmp_path / "straight" / "out" / "checkpoints" / f"step-{k:08d}"
    resumed_out = tmp_path / "resumed" / "out"
    (resumed_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed_out / "checkpoints" / ckpt.name)
    resumed = _cfg(tiny, tmp_path, small_data, "resumed", micro_batch_size=2, max_steps=2 * k, save_every=k)
    run(resumed, "lora.dropout=0.2")
    a = load_adapter(tmp_path / "straight" / "out" / "adapter")
    b = load_adapter(resumed_out / "adapter")
    assert all(torch.equal(a[key], b[key]) for key in a), f"not bitwise equal: {max_abs_diff(a, b)}"
    la = [r["loss"] for r in read_metrics(tmp_path / "straight" / "out") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(resumed_out) if "loss" in r]
    assert la[k:] == lb, "the resumed steps replay the same losses"


def test_resume_exact_1_process(tiny, small_data, tmp_path):
    _resume_pair(tiny, small_data, tmp_path, lambda c, *o: run_inprocess(c, *o) == 0 or pytest.fail("run failed"))


def test_resume_exact_2_processes(tiny, small_data, tmp_path):
    _resume_pair(tiny, small_data, tmp_path, lambda c, *o: launch(2, c, *o))


def test_learns_and_saved_adapter_reproduces_eval_loss(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distlora import config as C
    from distlora import data as D
    from distlora.model import load_tokenizer
    from distlora.loop import evaluate

    raw = base_config(tiny, tmp_path / "out", lora={"r": 8, "alpha": 16, "dropout": 0.0},
                      train={"max_steps": 60, "micro_batch_size": 8, "eval_at_start": True, "lr": 1e-2})
    path = write_config(tmp_path / "c.yaml", raw)
    assert run_inprocess(path) == 0
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "out") if "eval_loss" in r]
    assert evals[-1] < 0.7 * evals[0], evals

    # reload the saved adapter on a fresh base and recompute the eval loss
    from accelerate import Accelerator

    cfg = C.load(path)
    tok = load_tokenizer(cfg)
    _, eval_recs, _ = D.build_datasets(cfg, tok, log=lambda *_: None)
    base = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")
    loader, _ = D.make_loader(eval_recs, tok.pad_token_id, 8, 1, 1, 0, False)
    ev = evaluate(Accelerator(cpu=True), model, loader)
    assert abs(ev["eval_loss"] - evals[-1]) < 1e-6

    # merged model: plain transformers load gives the same logits
    from distlora.cli import merge

    merge(str(tmp_path / "out" / "adapter"), str(tiny / "model"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    x = torch.tensor([eval_recs[0]["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, model(x).logits, atol=1e-4)
