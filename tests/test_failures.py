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


# SIGTERM in `make test`; the other three (~20 s each, the same path after the signal) with the slow tests
@pytest.mark.parametrize("how", [pytest.param("stop_file", marks=pytest.mark.slow), "SIGTERM",
                                 pytest.param("SIGINT", marks=pytest.mark.slow),
                                 pytest.param("SIGUSR1", marks=pytest.mark.slow)])
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
        if step == 2:  # asked before step 3, agreed with its counts, taken after it
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


# ------------------------------------------------------------------------------ before any worker starts


def _cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distlora.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture
def finished(tiny, tmp_path) -> tuple[Path, Path]:
    """A finished run (checkpoint at its last step) with the launch config of its launch."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, out, train={"max_steps": 3, "save_every": 3}))
    assert run_inprocess(cfg) == 0
    (out / "launch").mkdir()
    (out / "launch" / "accelerate.yaml").write_text("# the launch config of the finished run\n")
    return cfg, out


def test_bad_data_is_named_before_any_worker_starts(finished, tmp_path):
    """`distlora launch` with a malformed line 3: exit 2, one line `file:3: malformed JSON ...; fix: ...`,
    no traceback, no worker started, every file of the finished run in that output dir as it was.
    Before: exit 1 after ~13 s, the line buried under rank 1's gloo traceback, config.yaml and
    launch/accelerate.yaml replaced."""
    cfg, out = finished
    bad = tmp_path / "bad.jsonl"
    src = Path(_train_path(cfg)).read_text().splitlines()[:6]
    src[2] = src[2][:-3]  # line 3 cut short
    bad.write_text("\n".join(src) + "\n")
    before = _files(out)
    t0 = time.monotonic()
    res = _cli("launch", "--config", str(cfg), "--cpu", "--processes-per-node", "1", f"data.train={bad}")
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("distlora: data:")]
    assert len(lines) == 1 and f"{bad}:3: malformed JSON" in lines[0] and "fix: fix or remove that line" in lines[0]
    assert "Traceback" not in res.stderr + res.stdout and "accelerate launch" not in res.stdout
    assert time.monotonic() - t0 < 60 and _files(out) == before


def _train_path(cfg: Path) -> str:
    import yaml

    return yaml.safe_load(cfg.read_text())["data"]["train"]


def test_unreachable_hub_model_is_named_with_the_offline_setting(finished):
    """--check with a hub id that is not in the cache, under HF_HUB_OFFLINE=1: exit 2 naming the model
    field and the offline setting (before: "preflight ok")."""
    cfg, _ = finished
    res = _cli("launch", "--config", str(cfg), "--cpu", "--check", "model.name_or_path=no-such-org/no-such-model",
               env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "model.name_or_path: cannot read config.json of hub model 'no-such-org/no-such-model'" in res.stderr
    assert "HF_HUB_OFFLINE=1 is set" in res.stderr and "Traceback" not in res.stderr


def test_a_run_refused_by_its_workers_keeps_the_finished_runs_files(finished):
    """A resume the trainer refuses (another LoRA shape): exit 1 with the rank's one-line error and the
    log file's path, no traceback, and config.yaml and launch/accelerate.yaml of the finished run kept."""
    cfg, out = finished
    before = _files(out)
    res = _cli("launch", "--config", str(cfg), "--cpu", "--processes-per-node", "1", "lora.r=8")
    shown = res.stdout + res.stderr
    assert res.returncode == 1, shown[-3000:]
    assert "distlora: rank 0 failed: ResumeError: cannot resume from" in shown and "Traceback" not in shown
    log = shown.split("distlora: full log: ")[1].split()[0]
    assert Path(log).is_file() and "lora: step-00000003 holds an adapter of another shape" in Path(log).read_text()
    assert _files(out) == before


def test_failing_worker_shows_its_one_line_error_and_the_log(tiny, tmp_path):
    """An error on rank 1 at step 2 through `distlora launch`: exit 1, the rank's line repeated last with
    the log's path, no traceback on the terminal (the log keeps it)."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, out))
    res = _cli("launch", "--config", str(cfg), "--cpu", "--processes-per-node", "2",
               env={"DISTLORA_FAULT": "rank1:step1:raise"})
    shown = res.stdout + res.stderr
    assert res.returncode == 1, shown[-3000:]
    assert "Traceback" not in shown and "ChildFailedError" not in shown, shown[-3000:]
    last = res.stderr.strip().splitlines()[-2:]
    assert last[0] == "distlora: rank 1 failed: InjectedFault: injected fault at step1 on rank 1", last
    log = Path(last[1].split("distlora: full log: ")[1])
    assert "Traceback" in log.read_text()
    assert [p.name for p in log.parent.iterdir()] == [log.name]  # the workers keep no logs of their own here


# ------------------------------------------------------------------------------ portable adapters


def test_adapter_names_its_base_absolutely_and_is_group_readable(tiny, tmp_path, monkeypatch):
    """model.name_or_path given relative ('./model', from the assets' directory): adapter_config.json
    records the absolute path, and every saved file and directory is readable by the group, also
    under a umask of 077 (before: 'model' recorded as given; safetensors 0600)."""
    import stat

    monkeypatch.chdir(tiny)
    old = os.umask(0o077)
    try:
        out = tmp_path / "out"
        raw = base_config(tiny, out, train={"max_steps": 2, "save_every": 2})
        raw["model"]["name_or_path"] = "./model"
        assert run_inprocess(write_config(tmp_path / "c.yaml", raw)) == 0
    finally:
        os.umask(old)
    recorded = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tiny / "model").resolve())
    saved = [out / "adapter", *(out / "adapter").rglob("*"), *(out / "checkpoints").rglob("*")]
    assert len(saved) > 5 and all(p.stat().st_mode & stat.S_IRGRP for p in saved), \
        [p for p in saved if not p.stat().st_mode & stat.S_IRGRP][:3]


# ------------------------------------------------------------------------------ side commands


@pytest.mark.parametrize("case", ["merge_no_adapter", "plot_no_metrics", "preprocess_bad_data",
                                  "plan_unreachable", "slurm_no_sbatch", "version"])
def test_side_commands_end_with_one_line(case, tiny, tmp_path):
    """Each side command on bad input: one line naming the input and the fix, no traceback, a non-zero
    exit (before: tracebacks, and merge --out FILE said "written" and exited 0)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "out"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": \n')
    env = {}
    args, code, needle = {
        "merge_no_adapter": (["merge", "--adapter", str(tmp_path), "--base", str(tiny / "model"), "--out",
                              str(tmp_path / "m")], 2, f"distlora merge: --adapter: '{tmp_path}' holds no adapter_config.json"),
        "plot_no_metrics": (["plot", str(tmp_path)], 2, f"distlora plot: '{tmp_path}' has no metrics.jsonl"),
        "preprocess_bad_data": (["preprocess", "--config", str(cfg), f"data.train={bad}"], 2,
                                f"distlora preprocess: data: {bad}:2: malformed JSON"),
        "plan_unreachable": (["plan", "--config", str(cfg), "--gpus", "2", "model.name_or_path=no-such-org/no-such-model"],
                             2, "distlora plan: model.name_or_path: cannot read config.json of hub model"),
        "slurm_no_sbatch": (["slurm", "--config", str(cfg), "--gpus-per-node", "1", "--time", "1:00:00", "--submit"], 3,
                            "distlora slurm: cannot run sbatch"),
        "version": (["--version"], 0, "distlora 0.1.0"),
    }[case]
    if case == "plan_unreachable":
        env["HF_HUB_OFFLINE"] = "1"
    if case == "slurm_no_sbatch":
        env["PATH"] = str(Path(sys.executable).parent)  # no sbatch there
    res = _cli(*args, env=env)
    said = (res.stdout + res.stderr).strip()
    assert res.returncode == code and needle in said, (res.returncode, said[-2000:])
    assert "Traceback" not in said


def test_merge_refuses_a_file_as_output(tiny, tmp_path):
    """A real adapter, --out an existing file: exit 2 naming --out, the file untouched."""
    out = tmp_path / "out"
    assert run_inprocess(write_config(tmp_path / "c.yaml", base_config(tiny, out, train={"max_steps": 1}))) == 0
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    res = _cli("merge", "--adapter", str(out / "adapter"), "--base", str(tiny / "model"), "--out", str(a_file))
    assert res.returncode == 2 and f"distlora merge: --out: '{a_file}' is a file" in res.stderr, res.stderr[-2000:]
    assert a_file.read_text() == "x" and "merged model written" not in res.stdout


def test_preflight_fix_for_no_gpu_is_one_the_tool_accepts(tiny, tmp_path):
    """--check for GPUs on a machine without one: the fix named is the CPU launch, never
    `--gpus-per-node 0` (which the tool itself refuses)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "out"))
    res = _cli("launch", "--config", str(cfg), "--gpus-per-node", "2", "--check")
    assert res.returncode == 3 and "this machine has 0 GPU(s); fix: --cpu --processes-per-node N" in res.stderr, res.stderr
    assert "--gpus-per-node 0" not in res.stderr


def test_slurm_render_keeps_an_earlier_jobs_files_and_a_refused_one_writes_nothing(tiny, tmp_path):
    """`distlora slurm` into an output dir that holds an earlier job: the earlier accelerate config and
    script are kept beside the new ones (under their modification time), and a render it refuses
    (--time in a wrong format) writes nothing at all."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, out))
    shape = ["--nodes", "1", "--processes-per-node", "2", "--cpu"]
    assert _cli("slurm", "--config", str(cfg), *shape, "--time", "01:00:00").returncode == 0
    first = _files(out)
    res = _cli("slurm", "--config", str(cfg), *shape, "--time", "90 minutes")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("distlora slurm: --time")
    assert _files(out) == first  # refused: nothing written
    res = _cli("slurm", "--config", str(cfg), "--nodes", "2", "--processes-per-node", "1", "--cpu", "--time", "02:00:00")
    assert res.returncode == 0 and "previous versions kept as" in res.stderr
    now = _files(out)
    kept = {k: v for k, v in now.items() if k not in first}
    assert len(kept) == 2 and {first[k] for k in first} <= set(now.values()), (first.keys(), now.keys())
    assert now["launch/job.sbatch"] != first["launch/job.sbatch"]


def test_an_output_dir_that_cannot_be_made_is_one_line_on_every_rank(tiny, tmp_path):
    """Plain `accelerate launch` (2 processes) with train.output_dir under a regular file (as root a
    read-only directory cannot be made to fail; this is the same OSError path): every rank reports the
    main process's finding in one line, first; no distlora traceback and no other rank's transport error
    ("Connection closed by peer") bury it. Before: 75 lines, rank 0's traceback and rank 1's gloo error."""
    from conftest import launch

    (tmp_path / "afile").write_text("")
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "afile" / "out", train={"max_steps": 2}))
    res = launch(2, cfg, check=False, timeout=180)
    lines = (res.stderr + res.stdout).splitlines()
    want = f"CheckpointError: train.output_dir: cannot create {tmp_path / 'afile' / 'out'} (Not a directory)"
    assert res.returncode != 0 and sum(want in ln for ln in lines) == 2, res.stderr[-3000:]
    assert not any("Connection closed" in ln or "/distlora/" in ln for ln in lines), res.stderr[-3000:]


@pytest.mark.parametrize("too_long, hint", [("drop", "raise it, or set data.too_long: truncate"),
                                            ("truncate", "no example kept a trained token within data.max_seq_len=4")])
def test_a_max_seq_len_that_leaves_no_example_says_to_raise_it(tiny, tmp_path, capsys, too_long, hint):
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "out", data={"max_seq_len": 4, "too_long": too_long}))
    assert run_inprocess(cfg) != 0
    err = capsys.readouterr().err
    assert "no usable examples" in err and hint in err, err[-2000:]


def test_slurm_names_a_broken_data_file_before_the_job_queues(tiny, tmp_path):
    """`distlora slurm` (a login node: no torch, no tokenizer) reads every local data line: a malformed
    line is named with file:line and its fix, exit 2, and no script is written to wait in the queue."""
    rows = (tiny / "data" / "train.jsonl").read_text().splitlines()
    rows[6] = rows[6][:-1]  # line 7 loses its closing brace
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    raw = base_config(tiny, tmp_path / "out")
    raw["data"]["train"] = str(tmp_path / "bad.jsonl")
    cfg = write_config(tmp_path / "c.yaml", raw)
    res = _cli("slurm", "--config", str(cfg), "--nodes", "1", "--processes-per-node", "2", "--cpu", "--time", "01:00:00")
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and last.startswith(f"distlora slurm: data: {tmp_path / 'bad.jsonl'}:7: malformed JSON"), res.stderr
    assert "fix or remove that line" in last and not (tmp_path / "out").exists()
