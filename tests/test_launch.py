"""`distlora launch`: the accelerate configs it writes, the commands it prints and runs, preflight.

Equality claims: every run here is fp32, dropout 0, 2 processes in total with 1 thread each
(OMP_NUM_THREADS=1, as conftest.launch). A 2-"machine" job (two accelerate launch invocations, one
process each) performs the same arithmetic in the same order as one machine with 2 processes: the
same global batch order, the same 2-rank gloo all-reduce. So the adapters must be bitwise equal,
and are (measured: max |diff| = 0.0); 1e-5 would already catch a broken data split or a missing
all-reduce (each changes the adapter by >1e-3 after one step, tests/test_training.py).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, base_config, free_port, launch, load_adapter, max_abs_diff, write_config

SHIPPED = {  # shipped file -> the launcher's shape arguments that write it
    "single_gpu.yaml": ["--nodes", "1", "--gpus-per-node", "1"],
    "multi_gpu.yaml": ["--nodes", "1", "--gpus-per-node", "8"],
    "multi_node.yaml": ["--nodes", "2", "--gpus-per-node", "8"],
    "deepspeed_zero2.yaml": ["--nodes", "1", "--gpus-per-node", "8", "--backend", "zero2"],
    "deepspeed_zero3.yaml": ["--nodes", "1", "--gpus-per-node", "8", "--backend", "zero3"],
    "fsdp2.yaml": ["--nodes", "1", "--gpus-per-node", "8", "--backend", "fsdp2"],
}
BACKEND_TYPE = {"zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "MULTI_GPU"}  # fsdp2: our own fully_shard
RUN_OVERRIDES = {"fsdp2": ["train.backend=fsdp2"]}  # what the launch adds to the run config, per backend


def cli(*args, cwd=ROOT, env=None, timeout=600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "distlora.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


def load_accelerate(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


@pytest.fixture(scope="module")
def run_cfg(tiny, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("launchcfg")
    return write_config(tmp / "run.yaml", base_config(tiny, tmp / "out"))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_accelerate_configs_are_the_launchers_output(name, run_cfg, tmp_path):
    res = cli("launch", "--config", str(run_cfg), *SHIPPED[name], "--accelerate-config",
              f"configs/accelerate/{name}", "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    written = tmp_path / "configs" / "accelerate" / name
    assert written.read_text() == (ROOT / "configs" / "accelerate" / name).read_text(), \
        f"configs/accelerate/{name} drifted from the launcher: regenerate it with `distlora launch {' '.join(SHIPPED[name])}`"
    conf = load_accelerate(written)
    nodes, per_node = int(SHIPPED[name][1]), int(SHIPPED[name][3])
    assert (conf.num_machines, conf.num_processes) == (nodes, nodes * per_node)
    backend = SHIPPED[name][SHIPPED[name].index("--backend") + 1] if "--backend" in SHIPPED[name] else None
    expected_type = BACKEND_TYPE[backend] if backend else ("NO" if nodes * per_node == 1 else "MULTI_GPU")
    assert conf.distributed_type.value == expected_type
    assert conf.mixed_precision in ("no", None)  # the run config owns precision (a DeepSpeed JSON must not set it)
    # the printed command uses that file and passes the run config untouched (fsdp2: + train.backend=fsdp2)
    cmds = [shlex.split(line) for line in res.stdout.splitlines() if line.startswith("accelerate launch")]
    assert len(cmds) == nodes
    for rank, cmd in enumerate(cmds):
        assert cmd[cmd.index("--config_file") + 1] == f"configs/accelerate/{name}"
        assert cmd[cmd.index("-m"):] == ["-m", "distlora.train", "--config", str(run_cfg), *RUN_OVERRIDES.get(backend, [])]
        if nodes > 1:
            assert cmd[cmd.index("--machine_rank") + 1] == str(rank)
            assert cmd[cmd.index("--num_machines") + 1] == "2" and "--main_process_ip" in cmd
            assert cmd[cmd.index("--rdzv_backend") + 1] == "static"


@pytest.mark.parametrize("backend,dtype", [("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED"), ("fsdp2", "MULTI_GPU")])
def test_backend_configs_load_in_accelerate(backend, dtype, run_cfg, tmp_path):
    res = cli("launch", "--config", str(run_cfg), "--nodes", "2", "--gpus-per-node", "4", "--backend", backend,
              "--accelerate-config", "acc.yaml", "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    conf = load_accelerate(tmp_path / "acc.yaml")
    assert conf.distributed_type.value == dtype and conf.num_processes == 8 and conf.num_machines == 2
    if dtype == "DEEPSPEED":
        assert conf.deepspeed_config["deepspeed_config_file"] == f"configs/deepspeed/{backend}.json"
        assert conf.deepspeed_config["zero3_init_flag"] is (backend == "zero3")
        # DeepSpeed refuses mixed_precision next to a JSON config; the JSON says "auto"
        assert "mixed_precision" not in yaml.safe_load((tmp_path / "acc.yaml").read_text())
    else:  # FSDP2: a plain multi-process config; the run config selects distlora's own fully_shard
        assert not conf.fsdp_config and conf.mixed_precision == "no"
        assert "train.backend: fsdp2" in (tmp_path / "acc.yaml").read_text().splitlines()[2]
    cmds = [shlex.split(line) for line in res.stdout.splitlines() if line.startswith("accelerate launch")]
    assert len(cmds) == 2 and all(c[c.index("-m"):][4:] == RUN_OVERRIDES.get(backend, []) for c in cmds), res.stdout


# ---------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """The plain 2-process single-machine run (conftest.launch, configs/accelerate/cpu_ddp.yaml)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp / "run.yaml", base_config(tiny, tmp / "out", train={"save_every": 3}))
    launch(2, cfg)
    return tmp / "out"


def test_single_node_launch_runs_it(tiny, reference, tmp_path):
    """`distlora launch --nodes 1 --processes-per-node 2 --cpu` runs the command it prints."""
    cfg = write_config(tmp_path / "run.yaml", base_config(tiny, tmp_path / "out", train={"save_every": 3}))
    res = cli("launch", "--config", str(cfg), "--nodes", "1", "--processes-per-node", "2", "--cpu")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    printed = [line for line in res.stdout.splitlines() if line.startswith("accelerate launch")]
    assert len(printed) == 1 and "--num_processes 2" in printed[0]
    assert "distlora: 2 process(es), backend ddp" in res.stdout + res.stderr
    a, b = load_adapter(reference / "adapter"), load_adapter(tmp_path / "out" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max |diff| {max_abs_diff(a, b)}"


def test_fsdp2_launch_on_cpu_equals_ddp(tiny, reference, tmp_path):
    """`distlora launch --cpu --processes-per-node 2 --backend fsdp2`: the plain config plus the run-config
    override that selects distlora's fully_shard, the class GPUs run; its adapter is DDP's, bitwise."""
    cfg = write_config(tmp_path / "run.yaml", base_config(tiny, tmp_path / "out", train={"save_every": 3}))
    res = cli("launch", "--config", str(cfg), "--nodes", "1", "--processes-per-node", "2", "--cpu", "--backend", "fsdp2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "2 process(es), backend fsdp2" in res.stdout + res.stderr
    a, b = load_adapter(reference / "adapter"), load_adapter(tmp_path / "out" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max |diff| {max_abs_diff(a, b)}"


def test_two_machines_on_one_box_equal_single_machine(tiny, reference, tmp_path):
    """The per-node commands `distlora launch --nodes 2` prints, run as two machines (1 CPU process each)."""
    cfg = write_config(tmp_path / "run.yaml", base_config(tiny, tmp_path / "out", train={"save_every": 3}))
    port = free_port()
    res = cli("launch", "--config", str(cfg), "--nodes", "2", "--processes-per-node", "1", "--cpu",
              "--main-ip", "127.0.0.1", "--main-port", str(port), "--dry-run")
    assert res.returncode == 0, res.stderr
    cmds = [shlex.split(line) for line in res.stdout.splitlines() if line.startswith("accelerate launch")]
    assert [c[c.index("--machine_rank") + 1] for c in cmds] == ["0", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"node{r}.log", "w") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *c[2:]], cwd=ROOT, env=env,
                              stdout=logs[r], stderr=subprocess.STDOUT) for r, c in enumerate(cmds)]
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = [(tmp_path / f"node{r}.log").read_text() for r in range(2)]
    assert codes == [0, 0], text[0][-3000:] + text[1][-3000:]
    assert "distlora: 2 process(es), backend ddp" in text[0]
    a, b = load_adapter(reference / "adapter"), load_adapter(tmp_path / "out" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max |diff| {max_abs_diff(a, b)}"
    # and the checkpoints agree too (save_every 3: step 3)
    ca = load_adapter(reference / "checkpoints" / "step-00000003" / "adapter")
    cb = load_adapter(tmp_path / "out" / "checkpoints" / "step-00000003" / "adapter")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


# ---------------------------------------------------------------------------------------------- preflight


def _problems(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("distlora: preflight problem:")]


@pytest.mark.slow  # ~30-50 s: keeps `make test` near 15 minutes
def test_preflight_ok_and_each_problem_named_with_its_fix(tiny, reference, tmp_path):
    ok = cli("launch", "--config", str(write_config(tmp_path / "ok.yaml", base_config(tiny, tmp_path / "o"))),
             "--processes-per-node", "2", "--cpu", "--check")
    assert ok.returncode == 0 and "preflight ok" in ok.stderr and not _problems(ok), ok.stderr
    assert "disk:" in ok.stderr and "LoRA parameters" in ok.stderr  # the checkpoint size estimate ran

    # 1) output dir under a regular file: not creatable
    (tmp_path / "afile").write_text("x")
    bad_out = write_config(tmp_path / "bad_out.yaml", base_config(tiny, tmp_path / "afile" / "out"))
    # 2) the main port taken by a listening socket
    busy = socket.socket()
    busy.bind(("", 0))
    busy.listen()
    try:
        res = cli("launch", "--config", str(bad_out), "--processes-per-node", "2", "--cpu", "--check",
                  "--main-port", str(busy.getsockname()[1]))
    finally:
        busy.close()
    probs = _problems(res)
    assert res.returncode == 3 and len(probs) == 2, res.stderr
    assert "output dir: cannot write" in probs[0] and "fix: set train.output_dir" in probs[0]
    assert "main port" in probs[1] and "in use" in probs[1] and "fix: --main-port" in probs[1]

    # 3) free disk vs what the checkpoints will take (keep 10^9 of them: no disk holds that)
    res = cli("launch", "--config", str(write_config(tmp_path / "disk.yaml", base_config(tiny, tmp_path / "d"))),
              "--cpu", "--check", "train.save_every=1", "train.keep_last=1000000000")
    probs = _problems(res)
    assert res.returncode == 3 and len(probs) == 1 and probs[0].startswith("distlora: preflight problem: disk:"), res.stderr
    assert "fix: free space, lower train.keep_last" in probs[0]

    # 4) resuming a checkpoint of global batch 8 (2 processes x micro 4) with 1 process
    res = cli("launch", "--config", str(reference.parent / "run.yaml"), "--cpu", "--check")
    probs = _problems(res)
    assert res.returncode == 3 and len(probs) == 1, res.stderr
    assert "global batch 8" in probs[0] and "this run has 4" in probs[0] and "train.gradient_accumulation_steps=2" in probs[0]
    # ... the measured checkpoint size is used once a checkpoint exists
    res = cli("launch", "--config", str(reference.parent / "run.yaml"), "--cpu", "--processes-per-node", "2", "--check")
    assert res.returncode == 0 and "measured on" in res.stderr, res.stderr

    # 5) nothing was launched on a failed preflight
    assert not (tmp_path / "d" / "adapter").exists()


def test_preflight_world_size_vs_slurm_allocation(tiny, tmp_path):
    """The allocation is read from SLURM's environment (what srun/sbatch export); the real SLURM runs
    are in test_slurm.py."""
    from distlora import config as C
    from distlora.launch import Shape, preflight

    cfg = C.load(write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o")))
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "1",
           "SLURM_NODEID": "0"}
    probs, _ = preflight(cfg, Shape(4, 8), main_port=None, is_main_node=False, env=env)
    assert len(probs) == 2, probs
    assert "has 2 node(s) but the launch asks for 4" in probs[0] and "fix: --nodes 2" in probs[0]
    assert "allocated 4 GPU(s) per node" in probs[1] and "--gpus-per-node 4" in probs[1]
    probs, _ = preflight(cfg, Shape(2, 2, cpu=True), main_port=None, is_main_node=False, env=env)
    assert len(probs) == 1 and "--cpus-per-task=2" in probs[0], probs
    probs, _ = preflight(cfg, Shape(2, 4), main_port=None, is_main_node=False, env=env)
    assert probs == []


@pytest.mark.slow
def test_usr1_to_launch_stops_at_a_checkpoint_and_rerun_resumes_exactly(tiny, tmp_path):
    """SIGUSR1 to `distlora launch` (which accelerate's launcher would die of) becomes a STOP request:
    exit 75 after a checkpoint; the same command again resumes and ends bitwise equal to a straight run."""
    import signal
    import time

    steps = 40
    straight = write_config(tmp_path / "a.yaml", base_config(tiny, tmp_path / "a", train={"max_steps": steps}))
    launch(2, straight)
    cfg = write_config(tmp_path / "b.yaml", base_config(tiny, tmp_path / "b", train={"max_steps": steps}))
    args = [sys.executable, "-m", "distlora.cli", "launch", "--config", str(cfg), "--processes-per-node", "2", "--cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "leg1.log", "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        metrics = tmp_path / "b" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                proc.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.2)
        rc = proc.wait(timeout=300)
    leg1 = (tmp_path / "leg1.log").read_text()
    assert rc == 75, leg1[-3000:]
    k = int(leg1.split("stopped at step ")[1].split("/")[0])
    assert 0 < k < steps and (tmp_path / "b" / "checkpoints" / f"step-{k:08d}").is_dir()
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "resumed from" in res.stdout + res.stderr, res.stderr[-3000:]
    a, b = load_adapter(tmp_path / "a" / "adapter"), load_adapter(tmp_path / "b" / "adapter")
    assert all(torch.equal(a[x], b[x]) for x in a), f"max |diff| {max_abs_diff(a, b)}"
