"""train.collective_timeout_s: a rank stuck in its own work ends the job with a named error, never a hang.

Two gloo processes, a 5 s timeout, rank 0 stuck 120 s in a rank-0-only phase of the first checkpoint (after
writing the adapter, while rank 1 waits in the save's barrier). Broken on purpose (the timeout not passed to
the process group: torch's 30-minute gloo default), rank 1 waits on and the launch outlives the test's bound."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import CPU_DDP, ROOT, base_config, free_port, write_config

TIMEOUT_S = 5
STUCK_S = 120  # far beyond the timeout and the launcher's 30 s grace before it SIGKILLs the stuck rank


@pytest.mark.slow  # ~30-50 s: keeps `make test` near 15 minutes
def test_a_stuck_rank_ends_the_job_with_a_named_error(tiny, tmp_path):
    raw = base_config(tiny, tmp_path / "out")
    raw["train"].update(max_steps=4, save_every=2, collective_timeout_s=TIMEOUT_S)
    cfg = write_config(tmp_path / "c.yaml", raw)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "distlora.train", "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTLORA_FAULT": f"rank0:save.after_adapter:sleep{STUCK_S}"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)  # its own group: a hung job is killed whole, workers too
    try:
        out, _ = proc.communicate(timeout=STUCK_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the job still ran after {STUCK_S} s: the waiting rank did not time out")
    took = time.monotonic() - t0
    assert proc.returncode != 0
    named = [ln for ln in out.splitlines() if "distlora: rank 1 failed: it waited in a collective longer than" in ln]
    assert named and f"train.collective_timeout_s={TIMEOUT_S} s" in named[0], out[-3000:]
    # start-up (~15-25 s here), the 5 s timeout, torch elastic's SIGTERM grace (30 s) for the stuck rank 0
    assert took < STUCK_S, f"the job took {took:.0f} s: it waited for the stuck rank"
    assert not (tmp_path / "out" / "checkpoints" / "step-00000002").exists()  # nothing half-published
