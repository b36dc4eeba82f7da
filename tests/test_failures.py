"""Failure paths as a user meets them (README "Exit codes"): the documented exit code, one clear
line, no traceback on the terminal, nothing overwritten by a run that does not start or has nothing
left to do."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, base_config, run_inprocess, write_config
from distlora.layout import complete_checkpoints


def _files(out: Path) -> dict[str, str]:
    """Digest of every file a rerun must leave alone (the logs of each launch and a used STOP file aside)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and "logs" not in p.parts and p.name != "STOP"}


# ------------------------------------------------------------------------------ stop requests


@pytest.mark.parametrize("how", ["stop_file", "SIGTERM", "SIGINT", "SIGUSR1"])
def test_stop_through_distlora_launch_exits_75_without_traceback(tiny, tmp_path, how):
    """`distlora launch --cpu --processes-per-node 2`, stopped by a STOP file, SIGTERM or SIGUSR1 to
    the launcher, or Ctrl-C (SIGINT to its whole process group, as a terminal sends it): exit 75, a
    checkpoint at the stop step, one line saying so, no traceback on the terminal; the full output in
    output_dir/logs/. Before: exit 1 after a FAILED traceback (STOP file, Ctrl-C)."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, out, train={"max_steps": 40, "log_every": 1}))
    args = [sys.executable, "-m", "distlora.cli", "launch", "--config", str(cfg), "--processes-per-node", "2", "--cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group, like a shell's foreground job
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            if how == "stop_file":
                (out / "STOP").touch()
            elif how == "SIGINT":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(getattr(signal, how))
            break
        time.sleep(0.1)
    try:
        shown, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 75, shown[-3000:]
    assert "Traceback" not in shown and "ChildFailedError" not in shown and "FAILED" not in shown, shown[-3000:]
    k = int(shown.split("stopped at step ")[1].split("/")[0])
    assert 0 < k < 40 and [d.name for d in complete_checkpoints(out)[0]] == [f"step-{k:08d}"]
    assert f"distlora: stopped on request at step {k}/40; rerun the same command to resume" in shown
    logs = list((out / "logs").glob("launch-*.log"))
    assert len(logs) == 1 and "stopped at step" in logs[0].read_text()
    assert (out / "launch" / "accelerate.yaml").is_file()  # the run started: its launch config is kept


# ------------------------------------------------------------------------------ a finished run, rerun


@pytest.mark.parametrize("save_every", [0, 3])
def test_rerun_of_a_finished_run_changes_nothing(tiny, tmp_path, capsys, save_every):
    """The same command again on a finished run (with or without a checkpoint at the last step): exit 0,
    one line saying the run is complete, and every file in output_dir byte for byte as it was (before:
    summary.json rewritten with zero tokens, a duplicate eval row)."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, out, train={"max_steps": 3, "save_every": save_every}))
    assert run_inprocess(cfg) == 0
    before = _files(out)
    capsys.readouterr()
    assert run_inprocess(cfg) == 0
    said = capsys.readouterr()
    assert f"distlora: {out} holds this run, finished (step 3/3" in said.err, said
    assert "nothing to do, nothing changed" in said.err
    assert _files(out) == before


# ------------------------------------------------------------------------------ resume with changes


def test_resume_names_changed_keys_and_refuses_a_new_schedule(tiny, tmp_path, capsys):
    """A checkpoint at step 3 of 6 (stopped by a STOP file); resumed with train.max_steps or train.lr
    changed: refused, naming the key, its old and new value and the two ways out, nothing written.
    With log_every changed and the same global batch on another micro x accumulation: resumed,
    each changed key named."""
    from distlora import hooks

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, out, train={"max_steps": 6, "save_every": 0}))
    def drop_stop(step, **_):
        if step == 3:
            (out / "STOP").touch()

    hooks.add("step", drop_stop)
    try:
        assert run_inprocess(cfg) == 75
    finally:
        hooks.remove("step", drop_stop)
    assert [d.name for d in complete_checkpoints(out)[0]] == ["step-00000003"]
    before = _files(out)
    for override, needle in (("train.max_steps=8", "train.max_steps: 6 -> 8"), ("train.lr=0.02", "train.lr: 0.01 -> 0.02")):
        capsys.readouterr()
        assert run_inprocess(cfg, override) == 1
        err = capsys.readouterr().err
        assert "another lr schedule" in err and needle in err, err
        assert "train.resume_weights_only=true" in err and "train.resume=never" in err
        assert _files(out) == before  # config.yaml, metrics, status: untouched by a run that did not start
    capsys.readouterr()
    assert run_inprocess(cfg, "train.log_every=2", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2") == 0
    said = capsys.readouterr().out
    assert "the run config changed since step-00000003:" in said, said
    for key in ("train.log_every: 1 -> 2", "train.micro_batch_size: 4 -> 2", "train.gradient_accumulation_steps: 1 -> 2"):
        assert key in said
    assert "resumed from" in said and json.loads((out / "status.json").read_text())["status"] == "complete"
