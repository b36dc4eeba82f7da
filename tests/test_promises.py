"""Promises that only a test of the real code can keep: each test here went red when the promise was
broken on purpose in the production code (the break is named in each docstring).

- ranks agree on the stop step when only ONE rank is asked to stop;
- the lr schedule advances on a skipped non-finite step (cosine, so a lag changes the lr);
- the real trainer refuses a multi-process launch whose model accelerate did not wrap;
- checkpoints are atomic and rotation deletes only after the new one is published: a process exit at
  each named save point leaves only complete checkpoints under final names;
- the frozen base is unchanged by name, and the trainable tensors are exactly the adapter's keys;
- accumulation normalises by the window's tokens (the real loop's first-step grad norm);
- packed rows do not attend across examples (the production per-example NLL).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_config, launch, load_adapter, read_metrics, run_inprocess, write_config
from distlora import hooks
from distlora.layout import complete_checkpoints, latest, step_dir


def _cfg(tiny, tmp_path, name, **train) -> Path:
    raw = base_config(tiny, tmp_path / name / "out")
    raw["train"].update({"log_every": 1, **train})
    return write_config(tmp_path / name / "c.yaml", raw)


# ------------------------------------------------------------------------------ stop on one rank


def test_stop_asked_of_one_rank_stops_every_rank_at_the_same_step(tiny, tmp_path):
    """SIGUSR1 to rank 1 alone, before step 3: both ranks agree on it with step 3's counts and stop after step 3
    with one checkpoint there.
    Broken on purpose (each rank acting on its own vote): rank 1 stops alone, rank 0 waits in the next
    collective, the launch hangs past the timeout."""
    import signal

    from conftest import CPU_DDP, free_port

    cfg = _cfg(tiny, tmp_path, "one", max_steps=6)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "distlora.train", "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTLORA_FAULT": "rank1:step2:usr1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)  # its own group: a hung job is killed whole, workers too
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a stop asked of one rank hung the job: the ranks did not agree on the stop step")
    assert "distlora: stopped at step 3/6 (another rank was asked)" in out, out[-3000:]
    done, partial = complete_checkpoints(tmp_path / "one" / "out")
    assert [d.name for d in done] == ["step-00000003"] and not partial
    assert not (tmp_path / "one" / "out" / "adapter").exists()


# ------------------------------------------------------------------------------ lr on a skipped step


def test_lr_schedule_advances_on_a_skipped_step(tiny, tmp_path):
    """Cosine schedule, a NaN loss at step 3 (skipped): every logged lr equals the schedule at its step
    index. Broken on purpose (scheduler stepped only on applied updates): steps 4-6 lag by one."""
    from distlora import config as C
    from distlora.loop import make_scheduler
    from distlora_test_hooks import Faults

    cfg = _cfg(tiny, tmp_path, "lr", max_steps=6, lr_scheduler="cosine", warmup_steps=1)
    fault = Faults("rank0:step2:nan").install()
    try:
        assert run_inprocess(cfg) == 0
    finally:
        fault.uninstall()
    rows = [r for r in read_metrics(tmp_path / "lr" / "out") if "loss" in r]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 1, 1, 1]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=C.load(cfg).train.lr)
    sched = make_scheduler(opt, C.load(cfg), 6)
    expected = []
    for _ in range(6):
        expected.append(sched.get_last_lr()[0])
        sched.step()
    assert len(set(expected)) == 6  # every step has its own lr: a lag of one step is visible
    assert [r["lr"] for r in rows] == expected


# ------------------------------------------------------------------------------ unsynchronised launch


def test_trainer_refuses_a_launch_whose_gradients_would_not_be_synchronised(tiny, tmp_path):
    """A real 2-process launch of the trainer where accelerate returns the model unwrapped (test hook
    DISTLORA_TEST_NO_WRAP): every rank refuses before the first step. Broken on purpose (the
    check_wrapped call removed from Backend.prepare): the run trains and exits 0."""
    cfg = _cfg(tiny, tmp_path, "nowrap", max_steps=2)
    res = launch(2, cfg, env={"DISTLORA_TEST_NO_WRAP": "1"}, check=False, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-2000:]
    assert "not wrapped for distributed training" in out and "gradients would not be synchronised" in out
    assert "distlora: rank 0 failed: DistributedSetupError" in out or "distlora: rank 1 failed: DistributedSetupError" in out
    assert not (tmp_path / "nowrap" / "out" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "nowrap" / "out")


# ------------------------------------------------------------------------------ atomic save, rotation


SAVE_POINTS = ["save.after_optimizer", "save.after_adapter", "save.after_scheduler", "save.before_marker",
               "save.before_rename"]


@pytest.mark.parametrize("point", [*SAVE_POINTS, "rotate.before_delete"])
def test_exit_at_each_save_point_leaves_only_complete_checkpoints(tiny, tmp_path, point):
    """One process, save_every 1, keep_last 1; the process exits (os._exit) at `point` during the
    second save. Inside the writer: no directory under a final name but complete ones, the step-1
    checkpoint intact and newest. At rotation: the new checkpoint is already published (nothing
    temporary left) when the old one is deleted. Broken on purpose: writing straight into step-N
    leaves an incomplete step-00000002; rotating before publishing deletes with step 3 unpublished."""
    cfg = _cfg(tiny, tmp_path, "atomic", max_steps=4, save_every=1, keep_last=1)
    skip = 0 if point.startswith("rotate") else 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTLORA_FAULT": f"rank0:{point}@{skip}:exit"}
    res = subprocess.run([sys.executable, "-m", "distlora.train", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=120, env=env, cwd=ROOT)
    assert res.returncode == 1, res.stderr[-2000:]
    out = tmp_path / "atomic" / "out"
    done, partial = complete_checkpoints(out)
    root = step_dir(out, 1).parent
    final_names = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert final_names == [d.name for d in done], (final_names, partial)
    assert all(p.name.startswith(".tmp-") for p in partial), partial  # only the unpublished temporary name
    if point.startswith("rotate"):
        assert [d.name for d in done] == ["step-00000001", "step-00000002"]
        assert not [p for p in root.iterdir() if p.name.startswith(".")]  # published before any delete
    else:
        assert [d.name for d in done] == ["step-00000001"] and latest(out) == step_dir(out, 1)
    assert not (out / "adapter").exists()


# ------------------------------------------------------------------------------ frozen base


def test_frozen_base_unchanged_by_name_and_trainable_names_are_the_adapter(tiny, tmp_path):
    """After training (in-process, the real loop), every non-LoRA tensor equals the base's safetensors
    tensor of the same name bitwise, and the trainable parameters are exactly the saved adapter's keys.
    Broken on purpose (a norm weight left trainable in distlora/model.py): that weight moves and is
    not in the adapter."""
    from safetensors.torch import load_file

    cfg = _cfg(tiny, tmp_path, "frozen", max_steps=3)
    seen = {}

    def grab(backend, **_):
        model = backend.unwrap()
        seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}

    hooks.add("run_end", grab)
    try:
        assert run_inprocess(cfg) == 0
    finally:
        hooks.remove("run_end", grab)
    base = load_file(str(tiny / "model" / "model.safetensors"))
    params = seen["params"]
    frozen = {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): t
              for n, t in params.items() if ".lora_" not in n}
    assert frozen.keys() <= base.keys() | {"lm_head.weight"}, sorted(frozen.keys() - base.keys())[:5]
    assert len(frozen) >= len(base)
    changed = [n for n, t in frozen.items() if n in base and not torch.equal(t, base[n])]
    assert not changed, changed[:5]
    adapter = load_adapter(tmp_path / "frozen" / "out" / "adapter")
    assert {n.replace(".default", "") for n in seen["trainable"]} == set(adapter)
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0  # it trained


# ------------------------------------------------------------------------------ token-mean accumulation


def test_accumulated_gradient_is_the_token_mean_of_the_window(tiny, small_data, tmp_path):
    """The real loop, one optimizer step on the same global batch of 4 variable-length examples:
    micro 4 x accumulation 1 and micro 2 x accumulation 2 log the same pre-clip gradient norm and
    loss (bound 1e-5: summation order only). Broken on purpose (each micro batch divided
    by its own target tokens, the per-micro-batch mean): the norms differ by 3.4e-4 and 3.7e-3 relative."""
    norms, losses = {}, {}
    for name, micro, accum in (("full", 4, 1), ("accum", 2, 2)):
        raw = base_config(tiny, tmp_path / name / "out", lora={"r": 4, "alpha": 8, "dropout": 0.0})
        raw["data"]["train"] = str(small_data)
        raw["train"].update(micro_batch_size=micro, gradient_accumulation_steps=accum, max_steps=2, log_every=1)
        assert run_inprocess(write_config(tmp_path / name / "c.yaml", raw)) == 0
        rows = [r for r in read_metrics(tmp_path / name / "out") if "loss" in r]
        norms[name], losses[name] = [r["grad_norm"] for r in rows], [r["loss"] for r in rows]
    for a, b in zip(norms["full"], norms["accum"]):  # step 2: lora_B is no longer 0, both factors count
        assert abs(a - b) / a < 1e-5, (norms, losses)
    assert max(abs(a - b) for a, b in zip(losses["full"], losses["accum"])) < 1e-5


# ------------------------------------------------------------------------------ packing isolation


def test_packed_example_nll_does_not_see_the_other_examples(tiny, tmp_path):
    """Through the production per-example loss (distlora.loss.example_nll) on a row packed by the
    production collator: changing example A leaves example B's NLL unchanged (measured 0.0), and B packed
    equals B alone (within 1e-5 relative); the same row with continuous position ids does change it,
    so the check can see leakage. Broken on purpose (use_cache=True in example_nll, the KV-cache trap
    that turns off transformers' packed-sequence detection): B's NLL changes with A."""
    from test_packing import _setup

    from distlora import data as D
    from distlora.loss import example_nll

    model, tok, recs, _, _ = _setup(tiny, tmp_path, "sdpa")
    a, b = recs[0], recs[1]
    a2 = dict(a, input_ids=[a["input_ids"][0]] + [(t + 7) % 90 + 6 for t in a["input_ids"][1:]])
    packed = D.PackedCollator(tok.pad_token_id)
    model.eval()

    def nll_of_b(first, continuous=False):
        batch = packed([[first, b]])
        if continuous:
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
        with torch.no_grad():
            nll, _ = example_nll(model, batch)
        return float(nll[batch["ids"].tolist().index(b["id"])])

    with torch.no_grad():
        alone = float(example_nll(model, D.Collator(tok.pad_token_id)([b]))[0][0])
    assert nll_of_b(a) == nll_of_b(a2)
    assert abs(nll_of_b(a) - alone) / alone < 1e-5
    assert abs(nll_of_b(a, True) - nll_of_b(a2, True)) / alone > 1e-3
