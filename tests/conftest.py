"""Shared fixtures: tiny local assets, config writing, in-process and real multi-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Test instrumentation (tests/hooks/distlora_test_hooks.py) reaches every process the tests start
# through tests/hooks/sitecustomize.py: the DISTLORA_* test variables of a launch switch it on.
HOOKS = ROOT / "tests" / "hooks"
os.environ["PYTHONPATH"] = os.pathsep.join([str(HOOKS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
sys.path.insert(0, str(HOOKS))
CPU_DDP = ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="run tests marked gpu (needs CUDA)")


def pytest_configure(config):
    """The CPU suite on a GPU host: without --gpu, no process of the session sees a CUDA device, so the
    defaults that follow CUDA (train.mixed_precision auto -> bf16, Accelerator(cpu=...), nccl vs gloo,
    the preflight's GPU count) are the CPU ones the tests' tolerances and messages were written for.
    Set before any test module imports torch: CUDA reads the variable when it first initializes, and
    every process the tests start inherits it."""
    if not config.getoption("--gpu"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(autouse=True)
def _cpu_unless_gpu_test(request, monkeypatch):
    """With --gpu, a test not marked gpu still runs on CPU: its subprocesses see no CUDA device, and in
    this process (where a GPU test may already have initialized CUDA) torch.cuda.is_available() says
    False, which is what distlora's device choices read."""
    if request.config.getoption("--gpu") and "gpu" not in request.node.keywords:
        pin_cpu(monkeypatch)
    yield


def pin_cpu(monkeypatch) -> None:
    """This test on CPU on a CUDA host: no CUDA device for the processes it starts nor for this one."""
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="GPU test: opt in with --gpu on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """Tiny model + tokenizer under tiny/model, arithmetic data under tiny/data."""
    from distlora.tiny import build_assets

    return build_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


N_SMALL = 37  # variable-length examples; does not divide a global batch of 4 or 8: the last step holds padding


@pytest.fixture(scope="session")
def small_data(tiny, tmp_path_factory) -> Path:
    """The first N_SMALL examples of the tiny training data."""
    d = tmp_path_factory.mktemp("small")
    rows = (tiny / "data" / "train.jsonl").read_text().splitlines()[:N_SMALL]
    (d / "train.jsonl").write_text("\n".join(rows) + "\n")
    return d / "train.jsonl"


def base_config(tiny: Path, out: Path, **sections) -> dict:
    """A small fp32 run on the tiny assets; `sections` are merged per section."""
    cfg = {
        "model": {"name_or_path": str(tiny / "model"), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "train": str(tiny / "data" / "train.jsonl"),
            "eval": str(tiny / "data" / "eval.jsonl"),
            "max_seq_len": 64,
        },
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_steps": 6,
            "lr": 1e-2,
            "warmup_steps": 1,
            "save_every": 0,
            "mixed_precision": "no",
            "log_every": 1,  # tests compare every step's row
        },
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def lora_model_and_data(tiny: Path, tmp_path: Path, attn: str | None = None, mixed_precision: str = "no", **data):
    """The tiny model with its LoRA adapter (lora_B drawn at random: at its zero init the gradient of lora_A
    would be zero and hide errors in it) and the tokenized tiny data, for tests that call the loss directly.
    Returns (model, tokenizer, train records, eval records, run config)."""
    import torch

    from distlora import config as C
    from distlora import data as D
    from distlora.model import load_model, load_tokenizer

    raw = base_config(tiny, tmp_path / "out", model={"attn_implementation": attn} if attn else {}, data=data)
    cfg = C.load(write_config(tmp_path / "c.yaml", raw))
    tok = load_tokenizer(cfg)
    recs, evals, _ = D.build_datasets(cfg, tok, log=lambda *_: None)
    model = load_model(cfg, mixed_precision)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok, recs, evals, cfg


def run_inprocess(cfg_path: Path, *overrides: str) -> int:
    from distlora.train import main

    return main(["--config", str(cfg_path), *overrides])


def launch(nproc: int, cfg_path: Path, *overrides: str, env: dict | None = None, timeout: int = 300,
           check: bool = True, config_file: Path | None = None) -> subprocess.CompletedProcess:
    """A real `accelerate launch` of distlora.train with `nproc` CPU processes (gloo DDP, or the
    backend the accelerate `config_file` names)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file or CPU_DDP),
        "--num_processes", str(nproc), "--main_process_port", str(free_port()),
        "-m", "distlora.train", "--config", str(cfg_path), *overrides,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    if check and res.returncode != 0:
        key = [ln for ln in (res.stdout + res.stderr).splitlines() if "distlora: rank" in ln or "Error" in ln]
        raise AssertionError(f"launch failed ({res.returncode}); key lines:\n" + "\n".join(key[:40])
                             + f"\n--- stdout tail:\n{res.stdout[-3000:]}\n--- stderr tail:\n{res.stderr[-4000:]}")
    return res


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


NETNS_SCRIPT = ROOT / "scripts" / "netns_cluster.sh"


class NetnsCluster:
    """Nodes as network namespaces (scripts/netns_cluster.sh) under this test's own name prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.env = {**os.environ, "DISTLORA_NETNS_PREFIX": prefix, "OMP_NUM_THREADS": "1"}

    def sh(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(["bash", str(NETNS_SCRIPT), *map(str, args)], capture_output=True, text=True,
                             env=self.env, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"netns_cluster.sh {' '.join(map(str, args))}: {res.stderr.strip()}")
        return res

    def addr(self, i: int) -> str:
        return self.sh("addr", i).stdout.strip()

    def popen(self, i: int, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """`cmd` inside node i, its output in `log`; `down` ends whatever is left of it."""
        with open(log, "w") as fh:
            return subprocess.Popen(["bash", str(NETNS_SCRIPT), "exec", str(i), *cmd], stdout=fh,
                                    stderr=subprocess.STDOUT, env={**self.env, **(env or {})}, cwd=ROOT)


@pytest.fixture
def netns_cluster():
    """A NetnsCluster (call .sh("up", N)); torn down after the test, its processes killed. Skipped where
    network namespaces cannot be made (not root, no iproute2, a kernel or sandbox without netns)."""
    import shutil

    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (scripts/netns_cluster.sh)")
    if not shutil.which("ip"):
        pytest.skip("iproute2 ('ip') is not installed")
    cluster = NetnsCluster(f"dl-{os.getpid() % 100000}-")
    probe = cluster.sh("up", 1, check=False)
    if probe.returncode != 0:
        cluster.sh("down", check=False)
        pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()[-200:]}")
    try:
        yield cluster
    finally:
        cluster.sh("down", check=False)
