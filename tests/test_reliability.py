"""Reliability: stop on request, non-finite steps, failing ranks, full disk, bad data, kill -9 anywhere.

Every test runs the real trainer (in-process or under a real `accelerate launch` over gloo) and
compares against an uninterrupted run; faults are injected with DISTLORA_FAULT (tests/hooks/distlora_test_hooks.py).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (CPU_DDP, ROOT, base_config, free_port, launch, load_adapter, max_abs_diff, read_metrics,
                      run_inprocess, write_config)
from distlora import checkpoint

STEPS = 8


def _cfg(tiny, tmp: Path, name: str, dropout: float = 0.1, **train) -> Path:
    raw = base_config(tiny, tmp / name / "out", lora={"r": 4, "alpha": 8, "dropout": dropout},
                      train={"max_steps": STEPS, "micro_batch_size": 2, "save_every": 2, "log_every": 1, **train})
    return write_config(tmp / name / "c.yaml", raw)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted 2-process run every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    launch(2, _cfg(tiny, tmp, "ref"))
    return load_adapter(tmp / "ref" / "out" / "adapter")


def _launch_cmd(cfg: Path, nproc: int = 2, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
            "--num_processes", str(nproc), "--main_process_port", str(port or free_port()),
            "-m", "distlora.train", "--config", str(cfg)]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------- non-finite


def test_nonfinite_step_is_skipped_counted_and_agreed_across_ranks(tiny, tmp_path):
    """A NaN loss on rank 1 only, at step 3: both ranks skip that optimizer step (no hang, no divergence)."""
    cfg = _cfg(tiny, tmp_path, "nan", save_every=0)
    launch(2, cfg, env={"DISTLORA_FAULT": "rank1:step2:nan"})
    out = tmp_path / "nan" / "out"
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert rows[2]["loss"] is None and rows[2]["grad_norm"] is None
    assert all(r["loss"] is not None for i, r in enumerate(rows) if i != 2)
    ranks = json.loads((out / "summary.json").read_text())["per_rank"]
    assert ranks[0]["adapter_checksum"] == ranks[1]["adapter_checksum"]


def test_nonfinite_skipped_step_leaves_adapter_unchanged(tiny, tmp_path):
    """Skipping really skips: the adapter after a skipped step 2 equals the checkpoint after step 1."""
    cfg = _cfg(tiny, tmp_path, "skip", max_steps=2, save_every=1, lr_scheduler="constant", warmup_steps=0)
    from distlora_test_hooks import Faults

    fault = Faults("rank0:step1:nan").install()
    try:
        assert run_inprocess(cfg) == 0
    finally:
        fault.uninstall()
    out = tmp_path / "skip" / "out"
    after_1 = load_adapter(out / "checkpoints" / "step-00000001" / "adapter")
    assert _equal(load_adapter(out / "adapter"), after_1)


def test_nonfinite_abort(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, "abort", save_every=0, nonfinite="abort")
    res = launch(2, cfg, env={"DISTLORA_FAULT": "rank0:step1:nan"}, check=False)
    assert res.returncode != 0
    assert "non-finite loss at step 2" in res.stderr and "train.nonfinite=abort" in res.stderr
    assert "the update was not applied" in res.stderr


def test_nonfinite_abort_after_too_many_in_a_row(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, "many", save_every=0, nonfinite_max_in_a_row=2)
    fault = "rank0:step1:nan,rank0:step2:nan"
    res = launch(1, cfg, env={"DISTLORA_FAULT": fault}, check=False)
    assert res.returncode != 0 and "(2 in a row" in res.stderr


ZERO2 = ROOT / "configs" / "accelerate" / "cpu_deepspeed_zero2.yaml"
ZERO3 = ROOT / "configs" / "accelerate" / "cpu_deepspeed_zero3.yaml"
NAN_ON_RANK1_STEP3 = {"DISTLORA_FAULT": "rank1:step2:nan"}


def _nan_run(tiny, tmp: Path, name: str, config_file=None, **train) -> Path:
    """6 steps, accumulation 2, dropout 0 (so DDP and ZeRO runs are comparable), NaN loss on rank 1 in
    both micro batches of step 3."""
    cfg = _cfg(tiny, tmp, name, dropout=0.0, max_steps=6, gradient_accumulation_steps=2, save_every=0, **train)
    launch(2, cfg, env=NAN_ON_RANK1_STEP3, config_file=config_file, timeout=600)
    return tmp / name / "out"


@pytest.fixture(scope="module")
def nan_ddp(tiny, tmp_path_factory) -> Path:
    return _nan_run(tiny, tmp_path_factory.mktemp("nan_ddp"), "ddp")


@pytest.mark.parametrize("config_file", [ZERO2, ZERO3], ids=["zero2", "zero3"])
def test_nonfinite_window_is_skipped_under_deepspeed_like_ddp(config_file, tiny, tmp_path, nan_ddp):
    """DeepSpeed applies the update inside the last micro batch's backward, so the loop agrees on the
    window's losses across ranks before that backward and hands the engine a NaN gradient, which ZeRO
    discards (engine.was_step_applied() is False). The result must equal DDP's skip of the same step
    (proven to leave the adapter unchanged above) within the ZeRO-vs-DDP summation-order difference
    (~5e-8, tests/test_backends.py); a step applied with NaN would make every tensor NaN."""
    out = _nan_run(tiny, tmp_path, config_file.stem, config_file=config_file)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert rows[2]["loss"] is None and all(r["loss"] is not None for i, r in enumerate(rows) if i != 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == config_file.stem.split("_")[-1]
    assert max_abs_diff(load_adapter(nan_ddp / "adapter"), load_adapter(out / "adapter")) < 1e-5
    ddp_losses = [r["loss"] for r in read_metrics(nan_ddp) if "loss" in r]
    for a, b in zip(ddp_losses, [r["loss"] for r in rows]):
        assert (a is None and b is None) or abs(a - b) < 1e-5 * abs(a)


@pytest.mark.parametrize("config_file", [None, ZERO2], ids=["ddp", "zero2"])
def test_infinite_loss_with_finite_gradient_is_skipped(config_file, tiny, tmp_path, nan_ddp):
    """`inf` makes rank 1's loss +inf while its gradient stays finite: a check on the gradient norm alone
    would apply that step. Deciding on the loss before the update skips it, exactly as the NaN run."""
    cfg = _cfg(tiny, tmp_path, "inf", dropout=0.0, max_steps=6, gradient_accumulation_steps=2, save_every=0)
    res = launch(2, cfg, env={"DISTLORA_FAULT": "rank1:step2:inf"}, config_file=config_file, timeout=600)
    assert "non-finite loss at step 3: step skipped" in res.stdout + res.stderr
    out = tmp_path / "inf" / "out"
    assert [r["nonfinite_skipped"] for r in read_metrics(out) if "loss" in r] == [0, 0, 1, 1, 1, 1]
    assert max_abs_diff(load_adapter(nan_ddp / "adapter"), load_adapter(out / "adapter")) < 1e-5


def test_nonfinite_abort_under_deepspeed_applies_nothing(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, "dsabort", dropout=0.0, max_steps=6, save_every=0, nonfinite="abort")
    res = launch(2, cfg, env=NAN_ON_RANK1_STEP3, config_file=ZERO2, check=False, timeout=600)
    assert res.returncode != 0
    assert "non-finite loss at step 3" in res.stderr and "the update was not applied" in res.stderr


def test_deepspeed_json_that_would_apply_a_nan_step_is_refused(tiny, tmp_path, monkeypatch):
    """nonfinite=skip relies on ZeRO's inf/NaN check at the step; a JSON that turns it off is refused."""
    from distlora import config as C
    from distlora.backends.deepspeed import DeepSpeed

    conf = json.loads((ROOT / "configs" / "deepspeed" / "cpu_zero2.json").read_text())
    conf["bf16"]["check_grad_overflow"] = False
    conf["zero_optimization"]["compute_grad_norm"] = False
    (tmp_path / "ds.json").write_text(json.dumps(conf))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    cfg = C.load(_cfg(tiny, tmp_path, "dsjson"))
    problems = DeepSpeed.conflicts(cfg)
    assert sum("train.nonfinite: skip needs DeepSpeed to check gradients" in p for p in problems) == 2, problems
    cfg.train.nonfinite = "abort"
    assert not any("train.nonfinite" in p for p in DeepSpeed.conflicts(cfg))


# ------------------------------------------------------------------------------------ failing ranks


def test_failing_rank_ends_job_quickly_with_its_error(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, "fail", max_steps=200, save_every=0)
    t0 = time.time()
    res = subprocess.run(_launch_cmd(cfg), capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=_env(DISTLORA_FAULT="rank1:step3:raise"))
    assert res.returncode != 0 and time.time() - t0 < 60
    # plain accelerate launch keeps no log: each rank keeps its own, and the failing rank's line names it
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("distlora: rank 1 failed: ")]
    assert len(lines) == 1, res.stderr[-3000:]
    line = lines[0]
    assert line.startswith("distlora: rank 1 failed: InjectedFault: injected fault at step3 on rank 1 (log: "), line
    log = Path(line.split("(log: ")[1].rstrip(")"))
    assert log.parent == tmp_path / "fail" / "out" / "logs" and log.name.endswith("-rank1.log"), log
    assert "Traceback" in log.read_text() and line in log.read_text()
    rank0 = [f for f in log.parent.glob("train-*-rank0.log")]
    assert len(rank0) == 1 and "step" in rank0[0].read_text()


def test_failing_rank_on_second_machine_ends_both(tiny, tmp_path):
    """Two `accelerate launch` "machines" on loopback; rank 1 (machine 1) raises: both exit within 60 s."""
    cfg = _cfg(tiny, tmp_path, "two", max_steps=200, save_every=0)
    port = free_port()
    procs = []
    for machine in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
               "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(machine),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "-m", "distlora.train", "--config", str(cfg)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                      env=_env(DISTLORA_FAULT="rank1:step3:raise")))
    t0 = time.time()
    outs = [p.communicate(timeout=120) for p in procs]
    elapsed = time.time() - t0
    assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
    assert elapsed < 60, elapsed
    assert "rank 1 failed: InjectedFault" in outs[1][1]


# ------------------------------------------------------------------------------------- stop / SIGTERM


def test_sigterm_checkpoints_and_rerun_finishes_identically(tiny, tmp_path, reference):
    """SIGTERM to `accelerate launch` (as a scheduler or Ctrl-C would): the agent forwards it, the
    workers agree on a step, write a complete checkpoint and exit 75; the same command resumes."""
    cfg = _cfg(tiny, tmp_path, "term", save_every=0)
    out = tmp_path / "term" / "out"
    cmd = _launch_cmd(cfg)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=_env(DISTLORA_FAULT="rank*:step*:slow"))
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 1:
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert "distlora: stopped at step" in stderr, stderr[-3000:]
    # What the user sees (measured, torch 2.13): the agent re-raises the signal as SignalException and
    # `accelerate launch` exits 1; the workers had already written the checkpoint and exited 75.
    assert p.returncode == 1 and "SignalException" in stderr, (p.returncode, stderr[-3000:])
    stopped = checkpoint.latest(out)
    assert stopped is not None and 1 <= checkpoint.read_state(stopped)["step"] < STEPS
    launch(2, cfg)
    assert _equal(load_adapter(out / "adapter"), reference)


def test_stop_file_checkpoints_and_exits_75(tiny, tmp_path, reference):
    cfg = _cfg(tiny, tmp_path, "stopfile", save_every=0)
    out = tmp_path / "stopfile" / "out"
    out.mkdir(parents=True)
    p = subprocess.Popen(_launch_cmd(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=_env(DISTLORA_FAULT="rank*:step*:slow"))
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 1:
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    (out / "STOP").touch()
    _, stderr = p.communicate(timeout=120)
    assert "exitcode  : 75" in stderr and "stop file" in stderr, stderr[-3000:]
    launch(2, cfg)
    assert not (out / "STOP").exists()
    assert _equal(load_adapter(out / "adapter"), reference)


# ------------------------------------------------------------------------------------------ disk full


def test_disk_full_mid_write_keeps_previous_checkpoint(tiny, tmp_path):
    """RLIMIT_FSIZE with SIGXFSZ ignored: writes past the limit fail with EFBIG partway through a file.
    The limit (48 KiB) lets the 32 KiB adapter through and stops optimizer.pt (~66 KiB) mid-write."""
    cfg = _cfg(tiny, tmp_path, "full", save_every=2, dropout=0.0)
    out = tmp_path / "full" / "out"
    from distlora import hooks

    def stop_at_4(step, **_):  # an 8-step run stopped after step 4 (a changed max_steps would not resume):
        if step == 3:  # asked before step 4, agreed with its counts, taken after it
            (out / "STOP").touch()

    hooks.add("step", stop_at_4)
    try:
        assert run_inprocess(cfg, "train.max_steps=8") == 75  # checkpoints 2 and 4, no limit
    finally:
        hooks.remove("step", stop_at_4)
    assert (out / "checkpoints" / "step-00000004" / "optimizer.pt").stat().st_size > 48 * 1024

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))

    res = subprocess.run([sys.executable, "-m", "distlora.train", "--config", str(cfg), "train.max_steps=8"],
                         capture_output=True, text=True, cwd=ROOT, preexec_fn=limit, timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "could not write checkpoint step-00000006" in res.stderr and "MiB free there" in res.stderr
    assert "unexpected pos" in res.stderr  # torch's zip writer saw the short write: it failed mid-file
    assert "the previous checkpoint (step-00000004) is intact" in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert checkpoint.is_complete(out / "checkpoints" / "step-00000004")
    # and the run resumes from it once space is back
    assert run_inprocess(cfg, "train.max_steps=8") == 0
    assert checkpoint.read_state(checkpoint.latest(out))["step"] == 8


# ------------------------------------------------------------------------------------------ bad data


BAD_DATA = [
    ("malformed.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', r"malformed.jsonl:2: malformed JSON"),
    ("latin1.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n',
     r"latin1.jsonl:2: not UTF-8"),
    ("fields.jsonl", b'{"question": "a", "reply": "b"}\n', r"cannot tell the format from the fields \['question', 'reply'\]"),
    ("empty.jsonl", b"\n\n", r"empty.jsonl' holds no examples"),
    ("masked.jsonl", b'{"prompt": "' + b"x" * 80 + b'", "completion": "b"}\n',
     (r"no usable examples \(train data: 0 examples; truncated 1 \(right 1, left 0\), dropped 0 too long, "
      r"dropped 1 with no trained token\)")),
    ("array.jsonl", b'[1, 2]\n', r"array.jsonl:1: each line must be a JSON object"),
]


@pytest.mark.parametrize("name,content,message", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_is_named(tiny, tmp_path, capsys, name, content, message):
    import re

    f = tmp_path / name
    f.write_bytes(content)
    raw = base_config(tiny, tmp_path / "out", data={"train": str(f), "eval": None, "format": "auto"})
    assert run_inprocess(write_config(tmp_path / "c.yaml", raw)) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------- world-size change


@pytest.mark.slow  # ~30-50 s: keeps `make test` near 15 minutes
def test_resume_on_other_world_size_same_global_batch(tiny, tmp_path, reference):
    """Checkpoint from 2 processes x micro 2, resumed on 1 process x micro 2 x accumulation 2."""
    cfg = _cfg(tiny, tmp_path, "ws", dropout=0.0)
    launch(2, cfg, "train.max_steps=4")  # note: a different max_steps changes the schedule; only weights matter here
    ref_cfg = _cfg(tiny, tmp_path, "ws_ref", dropout=0.0)
    launch(2, ref_cfg)
    out, ref_out = tmp_path / "ws" / "out", tmp_path / "ws_ref" / "out"
    shutil.rmtree(out)
    shutil.copytree(ref_out / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004")
    assert run_inprocess(cfg, "train.gradient_accumulation_steps=2") == 0
    assert max_abs_diff(load_adapter(out / "adapter"), load_adapter(ref_out / "adapter")) < 1e-5
    # a different global batch is refused, naming the fix
    res = launch(1, cfg, "train.resume=" + str(ref_out / "checkpoints" / "step-00000004"), check=False)
    assert res.returncode != 0 and "global batch 4" in res.stderr and "this run has 2" in res.stderr


@pytest.mark.parametrize("override,needle", [
    ("train.seed=43", "train.seed: 42 -> 43"),
    ("data.packing=true", "packed row tokens): 0 -> 64"),
    ("data.group_by_length=true", "data.group_by_length: False -> True"),
], ids=["seed", "packing", "group_by_length"])
def test_resume_with_another_data_order_is_refused(tiny, tmp_path, capsys, override, needle):
    """Same global batch, but the steps would hold other examples: refused by name, unless weights only."""
    cfg = _cfg(tiny, tmp_path, "order", dropout=0.0, max_steps=2, save_every=1)
    assert run_inprocess(cfg, "train.max_steps=1") == 0
    capsys.readouterr()
    assert run_inprocess(cfg, override) != 0
    err = capsys.readouterr().err
    assert "was trained on another data order" in err and needle in err, err[-2000:]
    ckpt = tmp_path / "order" / "out" / "checkpoints" / "step-00000001"
    assert run_inprocess(cfg, override, f"train.resume={ckpt}", "train.resume_weights_only=true") == 0


# ----------------------------------------------------------------------------------------- kill loop


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants (torchrun starts workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass

NAMED_POINTS = ["save.after_adapter", "save.after_optimizer", "save.after_scheduler", "save.before_marker",
                "save.before_rename", "rotate.before_delete"]


@pytest.mark.slow
@pytest.mark.parametrize("trial", NAMED_POINTS + [f"random{i}" for i in range(6)])
def test_kill_anywhere_then_rerun_gives_same_adapter(tiny, tmp_path, reference, trial):
    cfg = _cfg(tiny, tmp_path, "kill", keep_last=1)
    out = tmp_path / "kill" / "out"
    if trial.startswith("random"):
        rng = random.Random(trial)
        p = subprocess.Popen(_launch_cmd(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                             env=_env(DISTLORA_FAULT="rank*:step*:slow"))
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").exists() or not read_metrics(out):  # training has begun
            assert time.time() < deadline and p.poll() is None
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 4.0))  # 8 steps of >= 0.5 s: lands anywhere in training or saving
        _kill_tree(p.pid)  # the launcher and every worker at once, as a scheduler's kill -9 of the job
        p.communicate()
        phase = "finished before the kill" if (out / "adapter").exists() else (
            f"after step {checkpoint.read_state(checkpoint.latest(out))['step']} checkpoint"
            if checkpoint.latest(out) else "before the first checkpoint")
    else:
        # the second checkpoint (step 4) dies at this point; for rotation that is deleting step 2
        skip = 0 if trial == "rotate.before_delete" else 1  # let the step-2 save through
        res = launch(2, cfg, env={"DISTLORA_FAULT": f"rank0:{trial}@{skip}:kill"}, check=False)
        assert res.returncode != 0
        done, partial = checkpoint.complete_checkpoints(out)
        steps = [checkpoint.read_state(d)["step"] for d in done]
        phase = f"{trial}: complete {steps}, partial {[p.name for p in partial]}"
        if trial == "rotate.before_delete":
            assert steps == [2, 4] and not partial, phase  # the new one is complete before the old one goes
        else:
            assert steps == [2], phase  # the interrupted step-4 save never looks complete
    print(f"{trial}: {phase}")
    expected = checkpoint.latest(out)  # the newest COMPLETE checkpoint: the only one resume may take
    res = launch(2, cfg)
    resumed = [line.split("resumed from ")[1].split(" at step")[0]
               for line in (res.stderr + res.stdout).splitlines() if "resumed from" in line]
    assert resumed == ([] if expected is None else [str(expected)]), (resumed, expected)
    assert _equal(load_adapter(out / "adapter"), reference), trial


def test_output_dir_not_shared_between_machines_is_refused(tiny, tmp_path):
    """Two "machines" whose output_dir resolves to different directories (a relative path, different
    working directories: what node-local disks look like) are refused at start, naming the rank."""
    raw = base_config(tiny, Path("out"), train={"max_steps": 2})
    cfg = write_config(tmp_path / "c.yaml", raw)
    port = free_port()
    procs = []
    for machine in (0, 1):
        cwd = tmp_path / f"node{machine}"
        cwd.mkdir()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
               "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(machine),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "-m", "distlora.train", "--config", str(cfg)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                      env=_env(PYTHONPATH=str(ROOT))))
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert "rank(s) [1] do not see train.output_dir=out as rank 0 does" in outs[0][1] + outs[1][1]
    assert not (tmp_path / "node0" / "out" / "checkpoints").exists()


def test_rotation_keeps_newest_and_best_and_only_complete(tmp_path):
    """keep_last=2 over five complete checkpoints whose eval losses make step 2 the best: 4, 5 and
    the best (2) stay; an incomplete directory never counts as one of the kept."""
    root = checkpoint.ckpt_root(tmp_path)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, None)]:
        d = checkpoint.step_dir(tmp_path, step)
        d.mkdir(parents=True)
        (d / checkpoint.STATE).write_text(json.dumps({"step": step, "eval_loss": loss}))
        (d / checkpoint.MARKER).write_text(json.dumps({"step": step, "files": {checkpoint.STATE: (d / checkpoint.STATE).stat().st_size}}))
    (root / "step-00000006").mkdir()  # a half-written one (no marker)
    checkpoint.rotate(tmp_path, keep_last=2)
    done, partial = checkpoint.complete_checkpoints(tmp_path)
    assert [d.name for d in done] == ["step-00000002", "step-00000004", "step-00000005"]
    assert [p.name for p in partial] == ["step-00000006"]


def test_resume_refuses_other_lora_shape_and_weights_only_takes_the_adapter(tiny, tmp_path, capsys):
    cfg = _cfg(tiny, tmp_path, "shape", dropout=0.0, max_steps=2, save_every=2)
    assert run_inprocess(cfg) == 0
    ckpt = tmp_path / "shape" / "out" / "checkpoints" / "step-00000002"
    capsys.readouterr()
    # another rank: refused, naming what changed
    assert run_inprocess(cfg, "lora.r=8", f"train.resume={ckpt}") == 1
    err = capsys.readouterr().err
    assert "lora: step-00000002 holds an adapter of another shape (r: 4 -> 8)" in err
    # another global batch: refused, unless weights only
    assert run_inprocess(cfg, "train.micro_batch_size=4", f"train.resume={ckpt}") == 1
    assert "train.resume_weights_only=true" in capsys.readouterr().err
    other = tmp_path / "other"
    assert run_inprocess(cfg, "train.micro_batch_size=4", f"train.resume={ckpt}", "train.resume_weights_only=true",
                         f"train.output_dir={other}", "train.eval_at_start=true") == 0
    assert "(weights only)" in capsys.readouterr().out
    rows = read_metrics(other)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # a fresh schedule from step 0
    before = json.loads((tmp_path / "shape" / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows[0]["eval_loss"] == pytest.approx(before["eval_loss"], abs=1e-6)  # it started from that adapter
