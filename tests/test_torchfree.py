"""The torch-free layer: the checkpoint layout's one disk formula and one global-batch check (used
by the launcher's preflight and by the trainer alike), and launchers that render without torch.
"""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest

from conftest import base_config, write_config
from distlora import config as C
from distlora import layout

MIB = 2**20
T = 1_000_000  # trainable parameters: a checkpoint of 12 MB + the overhead

# (case, keep_last, save_every, max_steps, checkpoints counted)
DISK = [
    ("no-checkpoints", 3, 0, 100, 0),
    ("keep-3", 3, 10, 100, 5),  # + the best by eval loss + the one being written
    ("keep-all-known-steps", None, 10, 100, 11),
    ("keep-all-unknown-steps", None, 10, None, layout.UNBOUNDED_KEPT),
]


@pytest.mark.parametrize("keep_last,save_every,max_steps,kept", [c[1:] for c in DISK], ids=[c[0] for c in DISK])
def test_disk_need(keep_last, save_every, max_steps, kept):
    ckpt = layout.checkpoint_bytes(T)
    assert ckpt == 16 * T + layout.CHECKPOINT_OVERHEAD  # adapter, 2 moments, DeepSpeed's master: fp32 each
    assert layout.disk_need(ckpt, keep_last, save_every, max_steps) == (kept * ckpt + ckpt // 3, kept)


@pytest.mark.parametrize("keep_last,save_every,max_steps,kept", [c[1:] for c in DISK], ids=[c[0] for c in DISK])
def test_launcher_and_trainer_agree_on_the_disk_needed(tiny, tmp_path, monkeypatch, keep_last, save_every, max_steps,
                                                        kept):
    """One byte short of layout.disk_need: both the launcher's preflight and the trainer's check_room
    refuse; exactly enough: neither does."""
    from distlora import launch

    out = tmp_path / "o"
    cfg = C.load(write_config(tmp_path / "c.yaml", base_config(tiny, out, train={
        "keep_last": keep_last, "save_every": save_every, "max_steps": max_steps})), check_model=False)
    out.mkdir()
    monkeypatch.setattr(launch, "lora_param_count", lambda cfg: T)
    need, _ = layout.disk_need(layout.checkpoint_bytes(T), keep_last, save_every, max_steps)
    Usage = namedtuple("Usage", "total used free")
    for free, refused in ((need - 1, True), (need, False)):
        monkeypatch.setattr(shutil, "disk_usage", lambda path, free=free: Usage(2 * need, need, free))
        trainer = layout.check_room(out, T, keep_last, save_every, max_steps)
        problems, notes = launch.preflight(cfg, launch.Shape(1, 1, cpu=True), main_port=None)
        launcher = [p for p in problems if p.startswith("disk:")]
        assert (trainer is not None, bool(launcher)) == (refused, refused), (free, need, trainer, problems, notes)
        if refused:
            assert trainer.startswith("train.output_dir:") and f"{kept} checkpoint(s)" in trainer
            assert f"({kept} checkpoints of" in launcher[0] and "fix: free space" in launcher[0]


# (case, global batch written, micro, accumulation, processes, the fix named or None = resumable)
GLOBAL_BATCH = [
    ("equal", 8, 4, 1, 2, None),
    ("fewer-processes", 8, 4, 1, 1, "train.gradient_accumulation_steps=2"),
    ("not-divisible", 8, 3, 1, 1, "raise gradient_accumulation_steps"),
    ("more-accumulation", 4, 2, 4, 1, "train.gradient_accumulation_steps=2"),
    ("two-processes", 16, 4, 1, 2, "train.gradient_accumulation_steps=2"),
]


@pytest.mark.parametrize("written,micro,accum,dp,fix", [c[1:] for c in GLOBAL_BATCH], ids=[c[0] for c in GLOBAL_BATCH])
def test_one_global_batch_check_for_launcher_and_trainer(tiny, tmp_path, written, micro, accum, dp, fix):
    """The launcher's preflight (resume: auto, the newest checkpoint) and the trainer's resume_problems
    report the same line: the global batch, this run's, and the fix."""
    from distlora import launch

    out = tmp_path / "o"
    cfg = C.load(write_config(tmp_path / "c.yaml", base_config(tiny, out, train={
        "micro_batch_size": micro, "gradient_accumulation_steps": accum, "save_every": 0})), check_model=False)
    ckpt = layout.step_dir(out, 3)
    ckpt.mkdir(parents=True)
    state = {"step": 3, "global_batch": written, "dp_size": 2, "model": cfg.model.name_or_path,
             "lora_shape": layout.lora_shape(cfg)}
    (ckpt / layout.STATE).write_text(json.dumps(state))
    (ckpt / layout.MARKER).write_text(json.dumps({"step": 3, "files": {layout.STATE: (ckpt / layout.STATE).stat().st_size}}))
    assert layout.latest(out) == ckpt and layout.read_state(ckpt) == state

    trainer = [msg for msg, _ in layout.resume_problems(state, ckpt, cfg, micro * accum * dp, dp)]
    problems, _ = launch.preflight(cfg, launch.Shape(1, dp, cpu=True), main_port=None)
    launcher = [p for p in problems if "global batch" in p]
    if fix is None:
        assert trainer == [] and launcher == [], (trainer, launcher)
        return
    assert len(trainer) == 1 and launcher == trainer, (trainer, launcher)
    line = trainer[0]
    assert line.startswith(f"train: {ckpt.name} was written with global batch {written}")
    assert f"this run has {micro * accum * dp} = {micro} x {accum} x {dp}" in line
    assert fix in line and "train.resume=never" in line and "\n" not in line


# ------------------------------------------------------------------------------ launchers without torch
HEAVY = ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "safetensors",
         "distlora.model", "distlora.checkpoint", "distlora.backends", "distlora.loop")
PROBE = ("import json, sys, time\nt0 = time.perf_counter()\nfrom distlora.cli import main\nrc = main(sys.argv[2:])\n"
         "json.dump({'rc': rc, 'seconds': time.perf_counter() - t0, 'modules': sorted(sys.modules)}, open(sys.argv[1], 'w'))")
TARGETS = "lora.target_modules=[q_proj,v_proj]"  # a list: the config check that needs the model (not done here)
# (case, arguments after `distlora`, a line the output must hold)
RENDER = [
    ("launch-dry-run", ["launch", "--dry-run", "--gpus-per-node", "8"], "accelerate launch"),
    ("launch-dry-run-cpu-fsdp2", ["launch", "--dry-run", "--cpu", "--processes-per-node", "2", "--backend", "fsdp2",
                                  TARGETS], "train.backend=fsdp2"),
    ("launch-dry-run-2-nodes-zero3", ["launch", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--backend",
                                      "zero3"], "# node 1:"),
    ("slurm", ["slurm", "--time", "1:00:00", "--gpus-per-node", "8", TARGETS], "sbatch "),
    ("slurm-2-nodes-fsdp2", ["slurm", "--time", "1:00:00", "--nodes", "2", "--gpus-per-node", "4", "--backend", "fsdp2"],
     "sbatch "),
]


@pytest.mark.parametrize("args,needle", [c[1:] for c in RENDER], ids=[c[0] for c in RENDER])
def test_launchers_render_without_torch(tiny, tmp_path, args, needle):
    """`distlora launch --dry-run` and `distlora slurm` (login nodes) import no torch, transformers,
    peft, accelerate or DeepSpeed, and render in well under a second here (printed; the bound is
    loose because other tests share these 2 cores)."""
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT

    cfg = write_config(tmp_path / "run.yaml", base_config(tiny, tmp_path / "out"))
    report = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", PROBE, str(report), *args[:1], "--config", str(cfg), *args[1:]],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    got = json.loads(report.read_text())
    heavy = sorted(m for m in got["modules"] if m.split(".")[0] in HEAVY or m in HEAVY)
    print(f"{' '.join(args[:1])}: {wall:.2f} s wall (interpreter included), {got['seconds']:.2f} s in distlora; "
          f"{len(got['modules'])} modules")
    assert got["rc"] == 0 and heavy == [], heavy[:20]
    assert needle in res.stdout + res.stderr, res.stdout + res.stderr
    if TARGETS in args:  # the check that needs the model is left to where the model is, and says so
        assert "lora.target_modules is checked against the model where it loads" in res.stderr
    if args[0] == "slurm":
        script = (tmp_path / "out" / "launch" / "job.sbatch").read_text()
        assert ("train.backend=fsdp2" in script) == ("fsdp2" in args)
    assert wall < 10 and got["seconds"] < 5


# (case, train.backend in the run config, --backend, processes, the problem's start or None)
BACKEND_CHECK = [
    ("auto-follows", "auto", "zero3", 8, None),
    ("same", "fsdp2", "fsdp2", 2, None),
    ("single-one-process", "single", "ddp", 1, None),
    ("single-many", "single", "ddp", 2, "train.backend: single runs one process, this launch starts 2; fix:"),
    ("other", "zero3", "fsdp2", 2, "train.backend: the run config says zero3, the launch --backend fsdp2; fix: --backend zero3"),
]


@pytest.mark.parametrize("run_backend,backend,world,problem", [c[1:] for c in BACKEND_CHECK],
                         ids=[c[0] for c in BACKEND_CHECK])
def test_backend_of_run_config_and_launch_agree(tiny, tmp_path, capsys, run_backend, backend, world, problem):
    from distlora import launch

    path = write_config(tmp_path / "run.yaml", base_config(tiny, tmp_path / "out", train={"backend": run_backend}))
    cfg = C.load(path, check_model=False)
    got = launch.backend_problem(cfg, launch.Shape(1, world, backend, cpu=True))
    assert (got is None) if problem is None else got.startswith(problem) and "\n" not in got, got
    if problem is not None:  # and the launcher refuses before writing anything (exit 2, one line)
        with pytest.raises(SystemExit) as exc:
            launch.main(["--config", str(path), "--cpu", "--processes-per-node", str(world), "--backend", backend,
                         "--dry-run"])
        assert exc.value.code == 2 and capsys.readouterr().err == f"distlora: {got}\n"
        assert not (tmp_path / "out").exists()


# (case, backend, CPU processes, accelerate distributed_type, overrides added to the run config)
CPU_BACKENDS = [
    ("ddp", "ddp", 2, "MULTI_GPU", []),
    ("fsdp2", "fsdp2", 2, "MULTI_GPU", ["train.backend=fsdp2"]),
    ("fsdp2-one-process", "fsdp2", 1, "NO", ["train.backend=fsdp2"]),
    ("zero2", "zero2", 2, "DEEPSPEED", []),
]


@pytest.mark.parametrize("backend,procs,dtype,added", [c[1:] for c in CPU_BACKENDS], ids=[c[0] for c in CPU_BACKENDS])
def test_cpu_launch_of_each_backend(tiny, tmp_path, monkeypatch, backend, procs, dtype, added):
    """--cpu: FSDP2 is the plain multi-process config (like DDP) + train.backend=fsdp2, and preflight
    no longer refuses it."""
    from distlora import launch

    monkeypatch.chdir(launch.Path(__file__).resolve().parents[1])  # configs/deepspeed/ is found from the repo root
    monkeypatch.setattr(launch, "lora_param_count", lambda cfg: T)
    shape = launch.Shape(1, procs, backend, cpu=True)
    rows = {k: v for k, v, _ in launch.accelerate_config(shape)}
    assert rows["distributed_type"] == dtype and "fsdp_config" not in rows
    cmd = launch.launch_command(shape, "acc.yaml", "run.yaml", ["train.seed=1"], main_port=None)
    assert cmd[cmd.index("-m"):] == ["-m", "distlora.train", "--config", "run.yaml", *added, "train.seed=1"]
    cfg = C.load(write_config(tmp_path / "run.yaml", base_config(tiny, tmp_path / "out")), check_model=False)
    problems, _ = launch.preflight(cfg, shape, main_port=None)
    assert problems == []


# ------------------------------------------------------------------------------ the memory rule without torch
MEMORY_PROBE = """import json, sys
from distlora import config as C
from distlora.plan import ModelShape, resolve_memory
cfg = C.load(sys.argv[2], check_model=False)
shape = ModelShape(**json.loads(sys.argv[3]))
out = [resolve_memory(cfg, on_gpu=True, gpus=2, device_bytes=int(d), shape=shape) for d in sys.argv[4:]]
json.dump({"records": [m.record() for m in out], "problems": [m.problem() for m in out],
           "modules": sorted(sys.modules)}, open(sys.argv[1], "w"))
"""


def test_memory_rule_without_torch(tiny, tmp_path):
    """distlora.plan.resolve_memory, given the model's shape (counted once, on the meta device, by the
    caller), resolves the auto settings and checks the fit without importing torch, and gives what it
    gives in this (torch-importing) process."""
    import dataclasses
    import subprocess
    import sys

    from distlora.plan import model_shape, resolve_memory

    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o"))
    cfg = C.load(path)
    shape = model_shape(cfg)
    off = resolve_memory(cfg, on_gpu=True, gpus=2, device_bytes=2**50, shape=shape).plan.total(False)
    devices = [2 * off, off, 1024]  # fits; fits with checkpointing on; fits nothing
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "r.json"), str(path),
                          json.dumps(dataclasses.asdict(shape)), *map(str, devices)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    assert not [m for m in got["modules"] if m.split(".")[0] in HEAVY or m in HEAVY], got["modules"]
    here = [resolve_memory(cfg, on_gpu=True, gpus=2, device_bytes=d, shape=shape) for d in devices]
    assert got["records"] == [m.record() for m in here] and got["problems"] == [m.problem() for m in here]
    assert [r["gradient_checkpointing"] for r in got["records"]] == [False, True, True]
    assert got["problems"][:2] == [None, None] and "no single change fits, combine: " in got["problems"][2]
    assert "train.micro_batch_size=1 (" in got["problems"][2] and "train.sequence_parallel_size=2 (" in got["problems"][2]


def test_config_changes_leave_out_accumulation_derived_from_a_kept_global_batch():
    """A resume on fewer processes under train.global_batch_size changes the derived accumulation only:
    not a change of the run's config to report. Set by hand (no global batch), it is one."""
    from distlora import layout

    def cfg(accum, global_batch):
        return {"train": {"gradient_accumulation_steps": accum, "global_batch_size": global_batch, "lr": 1e-4}}

    assert layout.config_changes(cfg(1, 8), cfg(2, 8)) == []
    assert layout.config_changes(cfg(1, None), cfg(2, None)) == [("train.gradient_accumulation_steps", 1, 2)]
    assert layout.config_changes(cfg(1, 8), cfg(1, 16)) == [("train.global_batch_size", 8, 16)]
