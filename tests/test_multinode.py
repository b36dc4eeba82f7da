"""Multi-node runs as a cluster sees them: each node a network namespace with its own address on a
private subnet (scripts/netns_cluster.sh, the `netns_cluster` fixture), `distlora launch --nodes 2
--machine-rank R --main-ip <node 0's address>` run inside each. Skipped where namespaces cannot be made.

Equality claims: fp32, dropout 0, one thread per process. 2 nodes x 1 process run the same arithmetic
in the same order as 1 node x 2 processes (the same global batch order, the same 2-rank gloo
collectives; only the transport differs: a veth pair instead of loopback), so adapters must be bitwise
equal (tests/test_launch.py measured 0.0 for the loopback variant). A broken data split or a missing
all-reduce moves the adapter by > 1e-3 after one step (tests/test_training.py), far above 0.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_config, load_adapter, max_abs_diff, write_config

PORT = 29500  # each test's namespaces are fresh: the default port is free in them


def node_cmd(cfg: Path, rank: int, main_ip: str, *extra: str, nodes: int = 2, backend: str = "ddp") -> list[str]:
    return [sys.executable, "-m", "distlora.cli", "launch", "--config", str(cfg), "--nodes", str(nodes),
            "--processes-per-node", "1", "--cpu", "--backend", backend, "--machine-rank", str(rank),
            "--main-ip", main_ip, "--main-port", str(PORT), *extra]


def run_nodes(cluster, tmp: Path, cfg: Path, backend: str = "ddp", env: dict | None = None, timeout: float = 400):
    """Both nodes' launchers, to their end: (exit codes, logs)."""
    main_ip = cluster.addr(0)
    procs = [cluster.popen(r, node_cmd(cfg, r, main_ip, backend=backend), tmp / f"node{r}.log", env) for r in range(2)]
    codes = [p.wait(timeout=timeout) for p in procs]
    return codes, [(tmp / f"node{r}.log").read_text() for r in range(2)]


def reference(tmp: Path, cfg: Path, backend: str) -> Path:
    """1 node x 2 CPU processes, the same launcher, in this machine's own network."""
    res = subprocess.run([sys.executable, "-m", "distlora.cli", "launch", "--config", str(cfg), "--nodes", "1",
                          "--processes-per-node", "2", "--cpu", "--backend", backend], capture_output=True, text=True,
                         cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return tmp


def assert_bitwise(a: Path, b: Path) -> None:
    x, y = load_adapter(a), load_adapter(b)
    assert all(torch.equal(x[k], y[k]) for k in x), f"max |diff| {max_abs_diff(x, y)}"


# ---------------------------------------------------------------------------------------------- the harness

SERVE = "import socket; s = socket.create_server(('0.0.0.0', 5001)); c, a = s.accept(); print(a[0])"
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], 5001), timeout=2); print('ok')"


def _tcp(cluster, src: int, dst: int) -> str:
    """One TCP connection from node `src` to node `dst`: the peer address dst saw, or why it failed."""
    server = subprocess.Popen(["bash", str(ROOT / "scripts" / "netns_cluster.sh"), "exec", str(dst), sys.executable,
                               "-c", SERVE], stdout=subprocess.PIPE, text=True, env=cluster.env)
    try:
        for _ in range(50):  # until the server listens
            client = cluster.sh("exec", src, sys.executable, "-c", CONNECT, cluster.addr(dst), check=False)
            if "Connection refused" not in client.stderr:
                break
            time.sleep(0.1)
        if client.returncode != 0:
            return client.stderr.strip().splitlines()[-1]
        return server.communicate(timeout=10)[0].strip()
    finally:
        server.kill()
        server.wait()


def test_harness_nodes_links_and_teardown(netns_cluster):
    """scripts/netns_cluster.sh: nodes with their own addresses that reach each other; `up` again is a
    no-op; `link down` drops packets (a connect times out) and `up` restores them; `slow` installs tbf
    both ways; `down` leaves no namespace or interface of its prefix. bash -n and shellcheck clean."""
    from test_slurm import _bash_n_and_shellcheck

    c = netns_cluster
    c.sh("up", 2)
    c.sh("up", 2)
    assert [c.addr(i) for i in (0, 1)] == ["10.77.0.1", "10.77.0.2"]
    assert _tcp(c, 1, 0) == "10.77.0.2"  # node 0 sees node 1's own address, not 127.0.0.1
    c.sh("link", 1, "down")
    assert "timed out" in _tcp(c, 1, 0)
    c.sh("link", 1, "up")
    assert _tcp(c, 0, 1) == "10.77.0.1"
    c.sh("slow", 1, "20mbit")
    status = c.sh("status").stdout.splitlines()
    assert status[1].endswith("link=up qdisc=tbf") and status[0].endswith("qdisc=noqueue"), status
    assert "qdisc tbf" in c.sh("exec", 1, "tc", "qdisc", "show", "dev", "eth0").stdout
    c.sh("down")
    c.sh("down")
    names = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert c.prefix not in names and c.prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                                    text=True).stdout
    _bash_n_and_shellcheck(ROOT / "scripts" / "netns_cluster.sh")


# ---------------------------------------------------------------------------------------------- preflight


def test_multinode_preflight_refuses_loopback_and_unreachable_main(tiny, netns_cluster, tmp_path):
    """Before any worker starts: a loopback --main-ip (every node would advertise 127.0.0.1 to the others)
    and a main address this node cannot reach (its link down) each end the launch with one line naming
    --main-ip and the fix, exit 2; the unreachable one within train.collective_timeout_s."""
    netns_cluster.sh("up", 2)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", base_config(tiny, out, train={"collective_timeout_s": 2}))

    res = subprocess.run(["bash", str(ROOT / "scripts" / "netns_cluster.sh"), "exec", "1",
                          *node_cmd(cfg, 1, "127.0.0.1")], capture_output=True, text=True, env=netns_cluster.env,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 2, res.stdout[-1000:] + res.stderr[-2000:]
    assert "distlora: --main-ip 127.0.0.1: is a loopback address" in res.stderr and "fix: --main-ip" in res.stderr
    assert "accelerate launch" not in res.stdout and not (out / "logs").exists()  # no worker started

    netns_cluster.sh("link", 1, "down")
    started = time.monotonic()
    res = subprocess.run(["bash", str(ROOT / "scripts" / "netns_cluster.sh"), "exec", "1",
                          *node_cmd(cfg, 1, netns_cluster.addr(0))], capture_output=True, text=True,
                         env=netns_cluster.env, cwd=ROOT, timeout=120)
    elapsed = time.monotonic() - started
    assert res.returncode == 2, res.stdout[-1000:] + res.stderr[-2000:]
    line = [ln for ln in res.stderr.splitlines() if "--main-ip" in ln]
    assert line and f"--main-ip {netns_cluster.addr(0)}: no answer on port {PORT} within 2 s" in line[0] \
        and "fix:" in line[0], res.stderr
    assert not (out / "logs").exists()
    # it waited the 2 s (train.collective_timeout_s), not launch.MAIN_REACH_WAIT_S (60 s); the 10 s slack is
    # the launcher's own Python start (~1 s measured) on a CPU shared with other runs
    assert 2 <= elapsed < 2 + 10, elapsed


def test_netenv_names_the_interface_that_routes_to_node0(netns_cluster):
    """What the SLURM script's node tasks eval: node 1 reaches node 0 through its eth0 (and so does node 0
    itself: the interface holding its address, not lo); a variable the user set is left alone."""
    netns_cluster.sh("up", 2)
    main_ip = netns_cluster.addr(0)
    for node in (0, 1):
        res = subprocess.run(["bash", str(ROOT / "scripts" / "netns_cluster.sh"), "exec", str(node), sys.executable,
                              "-m", "distlora.launch", "netenv", main_ip], capture_output=True, text=True,
                             env=netns_cluster.env, cwd=ROOT, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split("\n")[:2] == ["export GLOO_SOCKET_IFNAME=eth0", "export NCCL_SOCKET_IFNAME=eth0"]
        assert f"reached through eth0 ({netns_cluster.addr(node)})" in res.stderr
    res = subprocess.run(["bash", str(ROOT / "scripts" / "netns_cluster.sh"), "exec", "1", sys.executable, "-m",
                          "distlora.launch", "netenv", main_ip], capture_output=True, text=True,
                         env={**netns_cluster.env, "NCCL_SOCKET_IFNAME": "ib0"}, cwd=ROOT, timeout=60)
    assert res.returncode == 0 and res.stdout == "export GLOO_SOCKET_IFNAME=eth0\n", res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------- equality


@pytest.mark.slow  # two 2-process runs: 2-3 min measured on the shared CPU (load average ~8 on 2 cores)
@pytest.mark.parametrize("backend", ["ddp", "zero3", "fsdp2"])
def test_two_nodes_equal_one_node_two_processes(backend, tiny, netns_cluster, tmp_path):
    """2 namespaces x 1 process, each node reaching node 0 through its own eth0 (the launcher pins gloo
    to it), equal bitwise to 1 node x 2 processes under the same backend, final adapter and checkpoint."""
    ref_cfg = write_config(tmp_path / "ref.yaml", base_config(tiny, tmp_path / "ref", train={"save_every": 3}))
    reference(tmp_path, ref_cfg, backend)
    netns_cluster.sh("up", 2)
    cfg = write_config(tmp_path / "run.yaml", base_config(tiny, tmp_path / "out", train={"save_every": 3}))
    codes, logs = run_nodes(netns_cluster, tmp_path, cfg, backend)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for r, log in enumerate(logs):
        assert f"this node's address {netns_cluster.addr(r)}; GLOO_SOCKET_IFNAME=eth0" in log, log[-2000:]
    assert f"2 process(es), backend {backend}" in logs[0]
    assert_bitwise(tmp_path / "ref" / "adapter", tmp_path / "out" / "adapter")
    assert_bitwise(tmp_path / "ref" / "checkpoints" / "step-00000003" / "adapter",
                   tmp_path / "out" / "checkpoints" / "step-00000003" / "adapter")


# ---------------------------------------------------------------------------------------------- failures


@pytest.mark.slow  # one 2-process run: 2.2 min measured on the shared CPU
def test_node0_failing_ends_a_stuck_rank_on_node1(tiny, netns_cluster, tmp_path):
    """Node 1's rank stuck in its own work (60 s: no collective timeout reaches it) while node 0's rank
    gives up in the collective after train.collective_timeout_s: node 0's job ends with its timeout error,
    and node 1's launcher, seeing node 0's rendezvous store gone, ends its ranks one timeout later, saying
    why (without that watch node 1 would run for the whole 60 s)."""
    timeout_s = 5
    netns_cluster.sh("up", 2)
    cfg = write_config(tmp_path / "run.yaml", base_config(tiny, tmp_path / "out",
                                                          train={"collective_timeout_s": timeout_s}))
    main_ip = netns_cluster.addr(0)
    procs = [netns_cluster.popen(r, node_cmd(cfg, r, main_ip), tmp_path / f"node{r}.log",
                                 {"DISTLORA_FAULT": "rank1:step2:sleep60"}) for r in range(2)]
    codes, ended = [], []
    for p in procs:
        codes.append(p.wait(timeout=400))
        ended.append(time.monotonic())
    logs = [(tmp_path / f"node{r}.log").read_text() for r in range(2)]
    assert codes == [1, 1], logs[0][-2000:] + logs[1][-2000:]
    assert "distlora: rank 0 failed: it waited in a collective longer than train.collective_timeout_s=5 s" in logs[0]
    assert f"distlora: node 0 ({main_ip}:{PORT}, the rendezvous store) stopped answering {timeout_s} s ago" in logs[1]
    # node 1 ends one grace (the timeout) after node 0's agent closed the store, polled every second;
    # 10 s of slack for process teardown on a CPU shared with other runs
    assert ended[1] - ended[0] < timeout_s + 1 + 10, ended[1] - ended[0]


def _processes_with(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.slow  # one 2-process run: ~1 min
def test_second_interrupt_kills_the_workers_too(tiny, tmp_path):
    """A second Ctrl-C to `distlora launch` kills the job: the agent and its workers, which torch's
    elastic agent starts in sessions of their own (a signal to the agent's process group alone left them
    running, holding the output pipe open). The ranks are busy in their own work (120 s), so only the
    kill can end them."""
    import signal

    cfg = write_config(tmp_path / "run.yaml", base_config(tiny, tmp_path / "out", train={"max_steps": 200}))
    log = tmp_path / "launch.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "distlora.cli", "launch", "--config", str(cfg), "--cpu",
                                 "--processes-per-node", "2"], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**__import__("os").environ, "OMP_NUM_THREADS": "1",
                                     "DISTLORA_FAULT": "rank*:step3:sleep120"})
    try:
        deadline = time.monotonic() + 300
        while "step 3/" not in log.read_text():  # then each rank sleeps: it cannot see the first interrupt's stop
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        workers = [p for p in _processes_with(str(cfg)) if p != proc.pid]
        assert len(workers) >= 3, workers  # the agent and its 2 workers
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130, log.read_text()[-2000:]
        time.sleep(1)  # SIGKILL is delivered at once; the kernel ends them within this
        assert [p for p in workers if _running(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------------------- link faults


def wait_checkpoint(out: Path, step: int, procs, timeout: float = 400) -> None:
    from distlora import layout

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = layout.complete_checkpoints(out)
        if any(d.name == f"step-{step:08d}" for d in done):
            return
        assert all(p.poll() is None for p in procs), "a node ended before its checkpoint"
        time.sleep(0.1)
    raise AssertionError(f"no complete checkpoint of step {step} within {timeout} s")


@pytest.mark.slow  # three 2-process runs: 4.3 min measured on the shared CPU
def test_link_down_ends_both_nodes_within_the_timeout_and_the_checkpoint_resumes_exactly(tiny, netns_cluster, tmp_path):
    """Node 1's link cut mid-run (packets dropped, as a pulled cable): both nodes' launchers end within
    train.collective_timeout_s, each rank naming the timeout; the last complete checkpoint is intact: with
    the link back, the same commands resume from it and end bitwise equal to a run without the fault."""
    timeout_s = 5
    train = {"save_every": 4, "max_steps": 8, "collective_timeout_s": timeout_s}
    ref_cfg = write_config(tmp_path / "ref.yaml", base_config(tiny, tmp_path / "ref", train=train))
    reference(tmp_path, ref_cfg, "ddp")

    netns_cluster.sh("up", 2)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", base_config(tiny, out, train=train))
    main_ip = netns_cluster.addr(0)
    pause_s = 4  # both ranks sleep before step 5 (after step 4's checkpoint): the link is cut in that window
    fault = {"DISTLORA_FAULT": f"rank*:step4:sleep{pause_s}"}
    procs = [netns_cluster.popen(r, node_cmd(cfg, r, main_ip), tmp_path / f"cut{r}.log", fault) for r in range(2)]
    wait_checkpoint(out, 4, procs)
    netns_cluster.sh("link", 1, "down")
    cut = time.monotonic()
    codes, ended = [], []
    for p in procs:
        codes.append(p.wait(timeout=120))
        ended.append(time.monotonic() - cut)
    logs = [(tmp_path / f"cut{r}.log").read_text() for r in range(2)]
    assert codes == [1, 1], logs[0][-2000:] + logs[1][-2000:]
    # the rest of the pause + one collective timeout + the launchers' exit (agent poll, process teardown:
    # ~2 s measured); 10 s of slack for a CPU shared with other runs. A hang would run to p.wait's 120 s.
    assert max(ended) < pause_s + timeout_s + 10, ended
    for r, log in enumerate(logs):
        assert f"distlora: rank {r} failed: it waited in a collective longer than train.collective_timeout_s=" \
               f"{timeout_s} s" in log, log[-2000:]

    from distlora import layout

    done, _ = layout.complete_checkpoints(out)
    assert [d.name for d in done] == ["step-00000004"] and not (out / "adapter").exists()
    netns_cluster.sh("link", 1, "up")
    codes, logs = run_nodes(netns_cluster, tmp_path, cfg)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "resum" in logs[0].lower() and "step-00000004" in logs[0], logs[0][-3000:]
    assert_bitwise(tmp_path / "ref" / "adapter", out / "adapter")


@pytest.mark.slow  # two 2-process runs: 3 min measured on the shared CPU
def test_slow_link_completes_equal_to_fault_free_and_the_steps_show_it(tiny, netns_cluster, tmp_path):
    """Node 1's link limited both ways by tc tbf: the run completes, bitwise equal to the fault-free run
    (1 node x 2, equal to 2 nodes x 1 by test_two_nodes_equal_one_node_two_processes), and every step's
    time (metrics.jsonl step_time_s) holds the time its all-reduce's bytes need at that rate."""
    ref_cfg = write_config(tmp_path / "ref.yaml", base_config(tiny, tmp_path / "ref"))
    reference(tmp_path, ref_cfg, "ddp")
    netns_cluster.sh("up", 2)
    netns_cluster.sh("slow", 1, "256kbit")
    import json

    tbf = json.loads(subprocess.run(["tc", "-j", "qdisc", "show", "dev", f"{netns_cluster.prefix}h1"], check=True,
                                    capture_output=True, text=True).stdout)[0]["options"]
    rate, burst = tbf["rate"], tbf["burst"]  # bytes/s, bytes: what the kernel applies
    assert rate == 32_000
    cfg = write_config(tmp_path / "run.yaml", base_config(tiny, tmp_path / "out"))
    codes, logs = run_nodes(netns_cluster, tmp_path, cfg, env={"DISTLORA_TEST_COMM": "1"})
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert_bitwise(tmp_path / "ref" / "adapter", tmp_path / "out" / "adapter")
    from conftest import read_metrics

    rows = [r for r in read_metrics(tmp_path / "out") if "step_time_s" in r]  # the step rows (not eval's)
    assert len(rows) == 6, rows
    for row in rows:
        # any all-reduce of N bytes over 2 ranks sends at least N/2 bytes each way through node 1's link;
        # beyond the bucket (the burst the kernel lets pass at once) they drain at the rate
        bound = (row["comm_bytes"] / 2 - burst) / rate
        assert row["comm_bytes"] > 0 and row["step_time_s"] >= bound, (row, bound)


# ---------------------------------------------------------------------------------------------- global batch


def _global_batch_config(tiny: Path, tmp: Path, name: str, global_batch: int, **train) -> Path:
    """micro 4 and train.global_batch_size, accumulation left to be derived (base_config sets it: removed)."""
    raw = base_config(tiny, tmp / name / "out", train={"global_batch_size": global_batch, **train})
    raw["train"].pop("gradient_accumulation_steps")
    return write_config(tmp / name / "run.yaml", raw)


def test_global_batch_size_derives_accumulation_by_one_rule(tiny, tmp_path, capsys, monkeypatch):
    """train.global_batch_size / (micro x data-parallel processes): the accumulation on 1, 2, 4 processes
    and under sequence parallelism (dp = processes / sp). A global batch the processes cannot divide is
    refused with the same line (field, nearest values) by the config alone (micro), the launcher, `distlora
    plan` and the trainer, each before any worker or model starts: exit 2. An explicit accumulation that
    contradicts the derived one is refused too; the trainer runs with the derived value."""
    from distlora import config as C
    from distlora import launch as L
    from distlora.cli import main as cli_main
    from distlora.train import main as train_main

    t = C.TrainConfig(output_dir="x", micro_batch_size=4, global_batch_size=16)
    assert [C.accumulation(t, n) for n in (1, 2, 4)] == [4, 2, 1]
    sp = C.TrainConfig(output_dir="x", micro_batch_size=2, global_batch_size=8, sequence_parallel_size=2)
    assert [C.accumulation(sp, n) for n in (2, 4, 8)] == [4, 2, 1]
    assert C.accumulation(C.TrainConfig(output_dir="x", gradient_accumulation_steps=3), 8) == 3  # unset: as given

    with pytest.raises(C.ConfigError) as err:  # no number of processes divides 10 into micro batches of 4
        C.load(_global_batch_config(tiny, tmp_path, "micro", 10))
    assert err.value.problems == [("train.global_batch_size: 10 is not a multiple of train.micro_batch_size 4; set it "
                                   "to 8 or 12 (or change train.micro_batch_size or the number of processes)")]

    cfg = _global_batch_config(tiny, tmp_path, "three", 8)
    want = ("train.global_batch_size: 8 is not a multiple of micro_batch_size 4 x 3 data-parallel processes = 12; set "
            "it to 12 (or change train.micro_batch_size or the number of processes)")
    with pytest.raises(SystemExit) as code:
        L.main(["--config", str(cfg), "--cpu", "--processes-per-node", "3", "--dry-run"])
    assert code.value.code == 2 and want in capsys.readouterr().err
    assert cli_main(["plan", "--config", str(cfg), "--gpus", "3", "--backend", "ddp"]) == 2
    assert want in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")  # what accelerate launch gives each worker: refused before any model loads
    assert train_main(["--config", str(cfg)]) == 2
    assert want in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main(["--config", str(cfg), "train.gradient_accumulation_steps=2"]) == 2
    assert "train.gradient_accumulation_steps: 2, but train.global_batch_size 8 on 2 data-parallel process(es) x " \
           "micro 4 derives 1; remove train.gradient_accumulation_steps" in capsys.readouterr().err

    monkeypatch.delenv("WORLD_SIZE")
    assert train_main(["--config", str(cfg), "train.max_steps=1", "train.eval_every=0"]) == 0
    said = capsys.readouterr()
    assert "global batch 8 = micro 4 x accumulation 2 x 1 data-parallel rank(s)" in said.out + said.err
    # the run's saved config leaves the derived accumulation out: it runs again on another process count
    saved = C.load(tmp_path / "three" / "out" / "config.yaml")
    assert "gradient_accumulation_steps" not in saved.train.model_fields_set
    C.resolve_accumulation(saved, 2)
    assert saved.train.gradient_accumulation_steps == 1


@pytest.mark.slow  # three runs (2-process reference, 2 nodes cut short, 1 process to the end): ~3-4 min
def test_losing_node1_ends_the_job_then_node0_alone_finishes_equal(tiny, netns_cluster, tmp_path):
    """Node 1 lost after step 4's checkpoint (every process of it SIGKILLed, as a node that dies): node 0's
    job ends within the collective timeout with its rank's error; the same run config relaunched on node 0
    alone (`distlora launch --nodes 1`, train.resume auto: what a requeue on fewer nodes runs) resumes
    from step 4 with the accumulation doubled by train.global_batch_size, no hand edit, and ends equal
    to the uninterrupted 2-process run within 1e-5 (summation order only: tests/test_reliability.py's
    DDP resume on another world size measured it below that)."""
    from distlora import launch as L
    from distlora import layout

    timeout_s = 5
    train = {"save_every": 4, "max_steps": 8, "collective_timeout_s": timeout_s}
    ref_cfg = _global_batch_config(tiny, tmp_path, "ref", 8, **train)
    reference(tmp_path, ref_cfg, "ddp")

    netns_cluster.sh("up", 2)
    cfg = _global_batch_config(tiny, tmp_path, "run", 8, **train)
    out = tmp_path / "run" / "out"
    main_ip = netns_cluster.addr(0)
    pause_s = 4  # both ranks sleep before step 5 (after step 4's checkpoint): node 1 dies in that window
    fault = {"DISTLORA_FAULT": f"rank*:step4:sleep{pause_s}"}
    procs = [netns_cluster.popen(r, node_cmd(cfg, r, main_ip), tmp_path / f"lost{r}.log", fault) for r in range(2)]
    wait_checkpoint(out, 4, procs)
    import signal

    L._kill_tree(procs[1].pid, signal.SIGKILL)  # the launcher, its agent and its worker: the whole node
    lost = time.monotonic()
    assert procs[0].wait(timeout=120) == 1
    ended = time.monotonic() - lost
    log0 = (tmp_path / "lost0.log").read_text()
    # the rest of the pause + at most one collective timeout + the launcher's exit; 10 s of slack for a
    # CPU shared with other runs (a hang would run to wait's 120 s)
    assert ended < pause_s + timeout_s + 10, ended
    # gloo names the peer whose connection closed: node 1's address
    assert "distlora: rank 0 failed: RuntimeError: " in log0 and f"Connection closed by peer [{netns_cluster.addr(1)}]" \
        in log0, log0[-3000:]
    procs[1].wait(timeout=30)
    done, _ = layout.complete_checkpoints(out)
    assert [d.name for d in done] == ["step-00000004"] and not (out / "adapter").exists()
    assert layout.read_state(done[0])["global_batch"] == 8 and layout.read_state(done[0])["dp_size"] == 2
    # and a newer save cut short, as a node lost mid-save leaves one where every rank writes its part (ZeRO,
    # FSDP2): no marker, a half-written file. The relaunch must take step 4, not the newest directory.
    import shutil

    cut = layout.step_dir(out, 6)
    shutil.copytree(done[0], cut)
    (cut / layout.MARKER).unlink()
    opt = cut / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])

    # node 0 alone: 1 process, the same config, nothing edited
    rest = netns_cluster.popen(0, [sys.executable, "-m", "distlora.cli", "launch", "--config", str(cfg), "--nodes", "1",
                                   "--processes-per-node", "1", "--cpu"], tmp_path / "rest.log")
    assert rest.wait(timeout=400) == 0, (tmp_path / "rest.log").read_text()[-3000:]
    log = (tmp_path / "rest.log").read_text()
    assert "resuming a 2-process checkpoint on 1 processes with the same global batch" in log, log[-3000:]
    assert f"removed incomplete checkpoint {cut}" in log and f"resumed from {done[0]} at step 4" in log
    assert "global batch 8 = micro 4 x accumulation 2 x 1 data-parallel rank(s)" in log
    diff = max_abs_diff(load_adapter(tmp_path / "ref" / "out" / "adapter"), load_adapter(out / "adapter"))
    assert diff < 1e-5, diff
    print(f"max |adapter diff| vs uninterrupted: {diff:.3g}; node 0 ended {ended:.1f} s after node 1 was lost")
