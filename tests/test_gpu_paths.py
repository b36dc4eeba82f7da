"""FSDP2: a GPU-only backend. On CPU (CI): its config is validated through the real launcher, and
launching it where it cannot run is refused with a clear message. On a CUDA machine: an opt-in
test (`pytest --gpu`) trains with it and compares. QLoRA runs on CPU too: tests/test_qlora.py.

Fact behind this split (shared/reference/cpu-distributed-facts.md): accelerate's FSDP path
refuses CPU ("There are currently no available devices found").
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, base_config, free_port, launch, load_adapter, max_abs_diff, read_metrics, write_config

FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
PROBE = """
import os
from accelerate.utils import FullyShardedDataParallelPlugin
p = FullyShardedDataParallelPlugin()
print("PROBE", os.environ.get("ACCELERATE_USE_FSDP"), p.fsdp_version, p.reshard_after_forward,
      p.auto_wrap_policy.__name__ if callable(p.auto_wrap_policy) else p.auto_wrap_policy,
      p.activation_checkpointing, os.environ.get("ACCELERATE_MIXED_PRECISION"), os.environ["WORLD_SIZE"])
"""


def test_fsdp2_config_through_the_real_launcher(tmp_path):
    """accelerate launch turns fsdp2.yaml into an FSDP2 plugin: version 2, resharding, a
    transformer-layer wrap policy, no accelerate-side activation checkpointing or precision."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    res = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2), "--num_processes", "2",
         "--main_process_port", str(free_port()), str(probe)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("PROBE")]
    assert res.returncode == 0 and len(lines) == 2, res.stderr[-3000:]
    assert set(lines) == {"PROBE true 2 True transformer_auto_wrap_policy False no 2"}, lines


def test_fsdp_on_cpu_is_refused_clearly(tiny, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "out"))
    res = launch(2, cfg, config_file=FSDP2, check=False, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "FSDP, which accelerate runs on GPUs only" in out, out[-3000:]
    assert "cpu_deepspeed_zero3.yaml" in out and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ GPU (opt in: --gpu)


@pytest.mark.gpu
def test_fsdp2_matches_ddp_on_2_gpus(tiny, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    runs = {}
    for name, conf in (("ddp", None), ("fsdp2", FSDP2)):
        raw = base_config(tiny, tmp_path / name / "out", train={"micro_batch_size": 2, "gradient_accumulation_steps": 2,
                                                                "save_every": 3, "max_steps": 6})
        launch(2, write_config(tmp_path / name / "c.yaml", raw), config_file=conf, env={"OMP_NUM_THREADS": "4"})
        runs[name] = tmp_path / name / "out"
    # fp32 on GPU: reduction order only (TF32 is off for fp32 matmuls by default in torch)
    assert max_abs_diff(load_adapter(runs["ddp"] / "adapter"), load_adapter(runs["fsdp2"] / "adapter")) < 1e-4
    la = [r["loss"] for r in read_metrics(runs["ddp"]) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(runs["fsdp2"]) if "loss" in r]
    assert max(abs(a - b) for a, b in zip(la, lb)) < 1e-4
