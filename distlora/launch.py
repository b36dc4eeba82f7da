"""`distlora launch`: from a run config and a machine shape to the exact `accelerate launch` command.

    distlora launch --config run.yaml --nodes N --gpus-per-node G --backend ddp|zero2|zero3|fsdp2
                    [--cpu] [--accelerate-config PATH] [--main-ip IP] [--main-port P] [--machine-rank R]
                    [--dry-run] [--check] [--device-memory-gib G] [dotted.key=value ...]

It writes an accelerate config YAML for that shape (the shipped configs/accelerate/single_gpu.yaml,
multi_gpu.yaml and multi_node.yaml are its output, and a test keeps them so), then
- one node: runs `accelerate launch --config_file X -m distlora.train --config run.yaml` (after the
  preflight checks; --dry-run only prints it);
- several nodes: prints the command for each node (machine rank, main address and port, number of
  machines, static rendezvous); with --machine-rank and --main-ip it runs this node's command.

Before any worker starts (and with --check), the run's plan (`distlora plan`, with its "auto" memory
settings resolved by the trainer's own rule) is compared with one GPU's memory (nvidia-smi's, or
--device-memory-gib): a run that does not fit is refused with the fixes that would fit (exit 2).
`--check` runs only the preflight checks (world size vs allocation, output dir writable and shared by
all nodes, free disk vs the expected checkpoints, main port free, backend files present) and names a
fix for each problem. The run config owns precision, micro batch and accumulation: the accelerate
config never sets them (it says mixed_precision 'no'; the DeepSpeed JSONs say "auto").

Several nodes (--machine-rank, --main-ip): gloo and NCCL are pinned to the interface that routes to
--main-ip (GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME, unless set), a loopback or unreachable main address
is refused before any worker starts (exit 2), and nodes other than 0 end their ranks once node 0's
rendezvous store has stopped answering for train.collective_timeout_s (see the Network section).

`--cpu` (tests, CPU clusters): processes are CPU processes, `--processes-per-node` counts them, and
the config is the MULTI_GPU kind, which distlora turns into real gloo DDP on CPU (see
distlora.backends.base.Backend.build_accelerator); MULTI_CPU would start one process per node.

`--backend fsdp2` writes the same plain multi-process config as ddp and adds `train.backend=fsdp2`
to the run config's overrides: FSDP2 is distlora's own fully_shard (accelerate's FSDP path needs
GPUs), so it runs on CPU too. --dry-run and `distlora slurm` import no torch (a login node renders
in well under a second); checks that need the model run with --check, in the job, and in the trainer.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from distlora import config as config_mod
from distlora import layout
from distlora.config import LAUNCH_BACKENDS as BACKENDS

DEEPSPEED_JSON = {"zero2": "configs/deepspeed/zero2.json", "zero3": "configs/deepspeed/zero3.json"}
DEFAULT_MULTINODE_PORT = 29500
EXIT_PREFLIGHT = 3  # preflight found problems; nothing was launched
EXIT_STOPPED = 75  # as distlora.train: stopped on request after a checkpoint


@dataclass(frozen=True)
class Shape:
    nodes: int = 1
    procs_per_node: int = 1
    backend: str = "ddp"
    cpu: bool = False

    @property
    def world(self) -> int:
        return self.nodes * self.procs_per_node

    def describe(self) -> str:
        unit = "CPU process" if self.cpu else "GPU"
        s = "" if self.procs_per_node == 1 else "es" if self.cpu else "s"
        return f"{self.nodes} node(s) x {self.procs_per_node} {unit}{s}, backend {self.backend}"

    def run_overrides(self) -> list[str]:
        """Run-config overrides the launch adds: FSDP2 is distlora's own fully_shard, chosen by the run
        config over a plain multi-process accelerate config (accelerate's FSDP path needs GPUs)."""
        return ["train.backend=fsdp2"] if self.backend == "fsdp2" else []

    def generator_args(self) -> str:
        per = f"--processes-per-node {self.procs_per_node} --cpu" if self.cpu else f"--gpus-per-node {self.procs_per_node}"
        return f"--nodes {self.nodes} {per} --backend {self.backend}"


# ---------------------------------------------------------------------------------------------
# The accelerate config


def accelerate_config(shape: Shape, main_port: int | None = None) -> list[tuple[str, object, str]]:
    """(key, value, comment) rows of the accelerate config, in file order."""
    if shape.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {shape.backend!r}")
    rows: list[tuple[str, object, str]] = [("compute_environment", "LOCAL_MACHINE", "")]
    if shape.backend in DEEPSPEED_JSON:
        dtype = "DEEPSPEED"
    elif shape.world == 1:
        dtype = "NO"
    else:
        dtype = "MULTI_GPU"  # ddp, and fsdp2 (distlora shards itself: Shape.run_overrides)
    why = ""
    if dtype == "MULTI_GPU" and shape.cpu:
        why = "on CPU too: distlora's Accelerator(cpu=True) makes it MULTI_CPU + gloo"
    rows.append(("distributed_type", dtype, why))
    if shape.backend in DEEPSPEED_JSON:
        rows.append(("deepspeed_config", {
            "deepspeed_config_file": DEEPSPEED_JSON[shape.backend],
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": shape.backend == "zero3",
        }, "the JSON says \"auto\" for batch sizes and precision: the run config fills them"))
    rows += [
        ("num_machines", shape.nodes, ""),
        ("num_processes", shape.world, "all processes on all machines"),
    ]
    if shape.nodes > 1:
        rows += [
            ("machine_rank", 0, "given per node on the command line: --machine_rank"),
            ("main_process_port", main_port or DEFAULT_MULTINODE_PORT,
             "on node 0; its address is given per job: --main_process_ip"),
            ("rdzv_backend", "static", "machine ranks are fixed (SLURM node ids), no elastic rendezvous"),
            ("same_network", True, ""),
        ]
    else:
        rows.append(("machine_rank", 0, ""))
        if main_port:
            rows.append(("main_process_port", main_port, ""))
    if not shape.cpu and dtype != "DEEPSPEED":
        rows.append(("gpu_ids", "all", ""))
    rows.append(("main_training_function", "main", ""))
    if dtype != "DEEPSPEED":  # DeepSpeed refuses mixed_precision next to a config file
        rows.append(("mixed_precision", "no", "the run config owns precision (train.mixed_precision)"))
    rows.append(("use_cpu", False, "ignored by accelerate launch; CPU is chosen by distlora itself"))
    return rows


def _yaml_value(value) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=False, sort_keys=False).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text


def render_accelerate_yaml(shape: Shape, config_path: str, main_port: int | None = None) -> str:
    """The YAML text; line 1 is the command that uses it (tests/test_config.py checks that)."""
    node = " --machine_rank R --main_process_ip MAIN_IP" if shape.nodes > 1 else ""
    run = " ".join(["run.yaml", *shape.run_overrides()])
    lines = [
        f"# accelerate launch --config_file {config_path}{node} -m distlora.train --config {run}",
        f"# {shape.describe()}. Written by `distlora launch {shape.generator_args()}`: regenerate, do not edit.",
    ]
    if shape.backend == "fsdp2":
        lines.append("# A plain multi-process config: FSDP2 is distlora's own fully_shard, chosen by the run config's "
                     "train.backend: fsdp2 (`distlora launch --backend fsdp2` adds it).")
    if shape.nodes > 1:
        lines.append("# Run once per node (R = 0..N-1; MAIN_IP = node 0's address); `distlora launch` prints the commands.")
    for key, value, comment in accelerate_config(shape, main_port):
        text = _yaml_value(value)
        if isinstance(value, dict):
            if comment:
                lines.append(f"# {comment}")
            lines.append(f"{key}:")
            lines += ["  " + line for line in text.splitlines()]
        else:
            lines.append(f"{key}: {text}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The command


def launch_command(shape: Shape, acc_config: str, run_config: str, overrides=(), *, main_port: int | None,
                   machine_rank: int | str | None = None, main_ip: str | None = None) -> list[str]:
    """`accelerate launch ...` for one node (machine_rank/main_ip may be shell placeholders)."""
    cmd = ["accelerate", "launch", "--config_file", acc_config,
           "--num_machines", str(shape.nodes), "--num_processes", str(shape.world)]
    if shape.nodes > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", str(main_ip),
                "--main_process_port", str(main_port or DEFAULT_MULTINODE_PORT),
                "--rdzv_backend", "static", "--same_network", "--max_restarts", "0"]
    elif main_port:
        cmd += ["--main_process_port", str(main_port)]
    return cmd + ["-m", "distlora.train", "--config", run_config, *shape.run_overrides(), *overrides]


def runnable(cmd: list[str]) -> list[str]:
    """The printed command with `accelerate` taken from this Python's environment."""
    return [sys.executable, "-m", "accelerate.commands.launch", *cmd[2:]] if cmd[:2] == ["accelerate", "launch"] else cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Preflight


def slurm_allocation(env=None) -> dict | None:
    """The allocation this process runs in, from SLURM's environment; None outside a job."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return None

    def first_int(name):
        v = env.get(name)
        if not v:
            return None
        try:
            return int(v.split("(")[0].split(",")[0])
        except ValueError:
            return None

    gpus = first_int("SLURM_GPUS_ON_NODE")
    if gpus is None and env.get("SLURM_GPUS_PER_NODE"):  # "4" or "a100:4"
        try:
            gpus = int(env["SLURM_GPUS_PER_NODE"].split(":")[-1])
        except ValueError:
            gpus = None
    return {
        "job": env["SLURM_JOB_ID"],
        "nodes": first_int("SLURM_JOB_NUM_NODES") or first_int("SLURM_NNODES"),
        "gpus_per_node": gpus,
        "cpus_on_node": first_int("SLURM_CPUS_ON_NODE"),
        "node_id": first_int("SLURM_NODEID") or 0,
    }


def checkpoint_bytes(cfg) -> tuple[int | None, str]:
    """Bytes of one checkpoint: measured from an existing one, else estimated from the LoRA size."""
    out = Path(cfg.train.output_dir)
    if out.is_dir():
        done, _ = layout.complete_checkpoints(out)
        if done:
            latest = done[-1]
            return sum(f.stat().st_size for f in latest.rglob("*") if f.is_file()), f"measured on {latest}"
    try:
        n = lora_param_count(cfg)
    except Exception as exc:  # noqa: BLE001 - an estimate only; say why it is missing
        return None, f"could not estimate the adapter size ({type(exc).__name__}: {exc})"
    return layout.checkpoint_bytes(n), f"estimated from {n:,} LoRA parameters"


def lora_param_count(cfg) -> int:
    from distlora.model import lora_param_count as count  # torch: only where the model is checked (--check, a run)

    return count(cfg)


def check_output_writable(out: Path) -> str | None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".distlora-write-{uuid.uuid4().hex}"
        with open(probe, "w") as fh:
            fh.write("ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        return (f"output dir: cannot write to {out} ({exc.strerror or exc}); fix: set train.output_dir to a "
                "writable directory (e.g. on the shared scratch filesystem)")
    return None


def check_shared_dir_slurm(out: Path, nodes: int, timeout: int = 120) -> str | None:
    """Write a token here, read it on every node of the allocation with srun."""
    token = uuid.uuid4().hex
    path = out / f".distlora-shared-{token}"
    path.write_text(token)
    try:
        cmd = ["srun", "--nodes", str(nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=0",
               "bash", "-c", f'echo "node $SLURM_NODEID $(hostname) $(cat {shlex.quote(str(path))} 2>/dev/null)"']
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"shared output dir: could not run srun to read the token on every node ({exc}); fix: run --check inside the job's allocation"
        seen = {}
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "node":
                seen[parts[1]] = parts[3] if len(parts) > 3 else ""
        blind = sorted(n for n in map(str, range(nodes)) if seen.get(n) != token)
        if blind:
            return (f"shared output dir: node(s) {', '.join(blind)} of the job do not see {out} (a token written on node "
                    f"0 was not read there); fix: put train.output_dir on a filesystem all nodes share")
    finally:
        path.unlink(missing_ok=True)
    return None


def model_problem(name_or_path: str) -> str | None:
    """The base model's config.json readable: in a local directory, or from the hub (or its cache under
    HF_HUB_OFFLINE=1). Read directly, without torch."""
    p = Path(name_or_path).expanduser()
    if p.exists() or name_or_path.startswith((".", "/", "~")):
        if not (p / "config.json").is_file():
            return (f"model.name_or_path: '{name_or_path}' has no config.json; point it at a saved model directory "
                    "(save_pretrained) or a hub id")
        return None
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(name_or_path, "config.json", etag_timeout=5)
    except Exception as exc:  # noqa: BLE001 - not found, no network, gated: all named the same way
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        how = ("HF_HUB_OFFLINE=1 is set and it is not in the local cache" if offline else
               "no network, no such repo, or no access; without network set HF_HUB_OFFLINE=1 with the model in the cache")
        return (f"model.name_or_path: cannot read config.json of hub model '{name_or_path}' ({how}: "
                f"{type(exc).__name__}); or point it at a local directory")
    return None


DATA_FIXES = {
    "malformed JSON": "fix or remove that line",
    "not UTF-8": "re-encode the file as UTF-8",
    "must be a JSON object": "one JSON object per line",
    "holds no examples": "point data.train at a file with examples",
}


def input_problems(cfg) -> list[str]:
    """Before any worker starts: the base model's config, then every data source read and tokenized by
    the trainer's own code (distlora.datacache / distlora.data; the cache when its key matches)."""
    err = model_problem(cfg.model.name_or_path)
    if err:
        return [err]
    from distlora import datacache
    from distlora.data import DataError
    from distlora.model import load_tokenizer

    try:
        tok = load_tokenizer(cfg)
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable tokenizer, named in one line
        src = cfg.tokenizer.name_or_path or cfg.model.name_or_path
        first = (str(exc).strip().splitlines() or [""])[0]
        return [f"tokenizer: cannot load the tokenizer of '{src}' ({type(exc).__name__}: {first}); set "
                "tokenizer.name_or_path to a directory or hub id that has one"]
    try:
        datacache.load_datasets(cfg, tok, log=lambda *_: None)
    except DataError as exc:
        return [data_problem(exc)]
    return []


def data_problem(exc) -> str:
    """A DataError as one line with its fix."""
    msg = str(exc)
    fix = next((f for k, f in DATA_FIXES.items() if k in msg), None)
    return f"data: {msg}" + (f"; fix: {fix}" if fix else "")


def data_file_problems(cfg) -> list[str]:
    """Every local data file read and checked line by line (file:line), without a tokenizer or torch:
    what a login node can check before a job waits in the queue (`distlora slurm`). Hub datasets and
    tokenization are checked by the job's own `distlora launch --check`."""
    from distlora import data
    from distlora.data import DataError

    named = [(s["path"], s["split"]) for s in data._sources(cfg.data)]
    if isinstance(cfg.data.eval, str):
        named.append((cfg.data.eval, "train"))
    for path, split in named:
        if data._expand(path):  # local files (a hub id expands to none)
            try:
                data.read_source(path, split)
            except DataError as exc:
                return [data_problem(exc)]
    return []


def memory_check(cfg, shape: Shape, smi=None):
    """(plan.Memory, a note): the run's "auto" memory settings resolved by the trainer's own rule
    (distlora.plan.resolve_memory) and its plan against one GPU's memory: train.device_memory_gib, else
    nvidia-smi's (no torch asked). CPU launches: nothing planned, as the CPU trainer plans nothing."""
    from distlora import plan

    dev = None
    if not shape.cpu and cfg.train.device_memory_gib is None:
        dev = (smi or plan.nvidia_smi_memory)()
    mem = plan.resolve_memory(cfg, on_gpu=not shape.cpu, gpus=shape.world, backend=shape.backend, device_bytes=dev)
    note = mem.line().removeprefix("distlora: ")
    if not shape.cpu and mem.device_bytes is None:
        note += "; the fit is not checked: no nvidia-smi here, give --device-memory-gib"
    return mem, note


def preflight(cfg, shape: Shape, *, main_port: int | None, is_main_node: bool = True, env=None) -> tuple[list[str], list[str]]:
    """(problems, notes). Each problem says what is wrong and how to fix it."""
    problems, notes = [], []
    t = cfg.train
    out = Path(t.output_dir)
    alloc = slurm_allocation(env)

    # world size vs allocation
    if alloc is not None:
        if alloc["nodes"] is not None and alloc["nodes"] != shape.nodes:
            problems.append(f"world size: SLURM job {alloc['job']} has {alloc['nodes']} node(s) but the launch asks for "
                            f"{shape.nodes}; fix: --nodes {alloc['nodes']}, or submit with #SBATCH --nodes={shape.nodes}")
        if shape.cpu:
            cpus = alloc["cpus_on_node"]
            if cpus is not None and cpus < shape.procs_per_node:
                problems.append(f"world size: {shape.procs_per_node} processes per node but SLURM gave this node {cpus} "
                                f"CPU(s); fix: #SBATCH --cpus-per-task={shape.procs_per_node}, or --processes-per-node {cpus}")
        else:
            gpus = alloc["gpus_per_node"]
            if not gpus or gpus < shape.procs_per_node:
                problems.append(f"world size: {shape.procs_per_node} GPU processes per node but SLURM allocated {gpus or 0} "
                                f"GPU(s) per node; fix: #SBATCH --gpus-per-node={shape.procs_per_node}, or --gpus-per-node {gpus or 0}")
    elif shape.nodes == 1:
        if shape.cpu:
            n = os.cpu_count() or 1
            if n < shape.procs_per_node:
                notes.append(f"{shape.procs_per_node} processes share {n} CPU core(s): correct but slow")
        else:
            import torch

            n = torch.cuda.device_count()
            if n < shape.procs_per_node:
                problems.append(f"world size: {shape.procs_per_node} GPU processes but this machine has {n} GPU(s); fix: "
                                + (f"--gpus-per-node {n}" if n else "--cpu --processes-per-node N (no GPU here), or run on a machine "
                                 "with GPUs"))
    else:
        notes.append("not in a SLURM job: the other nodes' GPUs and the shared output dir cannot be checked from here")

    if shape.cpu and t.loss_impl == "liger":
        problems.append("train.loss_impl: liger's fused loss runs on CUDA GPUs only; fix: train.loss_impl=torch "
                        "with --cpu (train.loss_chunk_size bounds the logits memory), or launch on GPUs")
    problems += config_mod.lora_init_backend_problems(cfg.lora, shape.backend)
    if shape.backend in DEEPSPEED_JSON and not Path(DEEPSPEED_JSON[shape.backend]).is_file():
        problems.append(f"backend: {DEEPSPEED_JSON[shape.backend]} (the DeepSpeed config the accelerate config points to) "
                        "does not exist here; fix: run from the repository root, or copy configs/deepspeed/ next to your run")

    # a checkpoint from another global batch cannot be resumed
    if t.resume == "auto" and out.is_dir():
        latest = layout.latest(out)
        if latest is not None:
            dp = data_parallel_size(cfg, shape)
            err = layout.global_batch_problem(layout.read_state(latest), latest, cfg,
                                              t.micro_batch_size * t.gradient_accumulation_steps * dp, dp)
            if err:
                problems.append(err)
            err = layout.schedule_problem(layout.read_state(latest), latest, cfg)
            if err:
                problems.append(err)

    # output dir: writable; with several nodes, the same directory on all of them
    err = check_output_writable(out)
    if err:
        problems.append(err)
    elif shape.nodes > 1 and alloc is not None and is_main_node:
        err = check_shared_dir_slurm(out, shape.nodes)
        if err:
            problems.append(err)

    # free disk vs the checkpoints the run will keep
    if out.is_dir():
        size, how = checkpoint_bytes(cfg)
        if size is None:
            notes.append(f"free disk not checked: {how}")
        else:
            need, kept = layout.disk_need(size, t.keep_last, t.save_every, t.max_steps)
            if t.save_every and not t.keep_last and not t.max_steps:
                notes.append(f"train.keep_last is null: checkpoints accumulate; free disk checked for {kept} of them")
            free = shutil.disk_usage(out).free
            if free < need:
                problems.append(f"disk: {free / 2**30:.2f} GiB free under {out}, the run needs about "
                                f"{need / 2**30:.2f} GiB ({kept} checkpoints of {size / 2**20:.1f} MiB, {how}); fix: "
                                "free space, lower train.keep_last, or move train.output_dir")
            else:
                notes.append(f"disk: {free / 2**30:.1f} GiB free, ~{need / 2**20:.1f} MiB needed ({how})")

    # main port free on the main node
    if is_main_node and main_port and port_in_use(main_port):
        problems.append(f"main port: {main_port} is already in use on this node; fix: --main-port "
                        f"{free_port()} (any free port)")
    return problems, notes


# ---------------------------------------------------------------------------------------------
# Network: the interface that reaches node 0, exported to gloo/NCCL, checked before any worker starts

# Variables that pin the interface gloo (CPU collectives) and NCCL (GPU collectives, its TCP bootstrap)
# send on. Unset, gloo advertises the address the host name resolves to (127.0.0.1 on many machines
# and inside containers: peers then connect to themselves) and NCCL picks the first non-loopback one.
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
# Longest wait for node 0's host to answer a TCP connect on the main port (an answer, even a refusal
# while node 0 is still starting, proves the route); capped further by train.collective_timeout_s.
MAIN_REACH_WAIT_S = 60.0


class NetworkError(Exception):
    """A multi-node launch whose network cannot work: one line naming the flag and the fix."""


def resolve_ipv4(host: str) -> str:
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except (socket.gaierror, IndexError) as exc:
        raise NetworkError(f"--main-ip {host}: does not resolve to an IPv4 address on this node ({exc}); "
                           "fix: give node 0's IP address") from None


def interface_addresses() -> dict[str, str]:
    """{interface: its IPv4 address} of this node (Linux ioctl SIOCGIFADDR; no iproute2, no psutil)."""
    import fcntl
    import struct

    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:  # no IPv4 address on it
                continue
            found[name] = socket.inet_ntoa(raw[20:24])
    return found


def route_to(main_ip: str) -> tuple[str, str]:
    """(interface, this node's address on it) that the kernel's routing table picks for traffic to
    `main_ip`. A UDP connect only looks the route up (nothing is sent); the interface is the one holding
    that source address: on node 0 itself that is its network interface, not `lo`."""
    ip = resolve_ipv4(main_ip)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))
        except OSError as exc:
            raise NetworkError(f"--main-ip {main_ip}: this node has no route to it ({exc.strerror or exc}); fix: "
                               "give node 0's address on the network the nodes share (`ip -br addr` on node 0)") from None
        src = s.getsockname()[0]
    if src.startswith("127."):
        return "lo", src
    for name, addr in interface_addresses().items():
        if addr == src:
            return name, src
    raise NetworkError(f"--main-ip {main_ip}: the route to it leaves from {src}, which no interface of this node "
                       f"holds; fix: set GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME to the interface to use")


def wait_reachable(ip: str, port: int, wait_s: float) -> str | None:
    """None once node 0's host answers a TCP connect to `port` (accepted, or refused while its launcher
    is still starting: either proves the path); else why not, after `wait_s` seconds."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((ip, port), timeout=max(0.2, min(2.0, left))):
                return None
        except ConnectionRefusedError:
            return None
        except OSError as exc:  # a connect timeout has no strerror: the packets went unanswered
            last = exc.strerror or "no answer"
        if left <= 0:
            return last
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def network_setup(main_ip: str, main_port: int, nodes: int, wait_s: float, env=None) -> tuple[dict, str]:
    """For one node of a multi-node launch: the variables to export (the interface that routes to
    node 0, for those of IFNAME_VARS the user did not set) and a line saying what was chosen. Raises
    NetworkError when this node would advertise a loopback address or cannot reach node 0."""
    env = os.environ if env is None else env
    ifname, src = route_to(main_ip)
    if nodes > 1 and ifname == "lo":
        raise NetworkError(f"--main-ip {main_ip}: is a loopback address on this node, so every node would advertise "
                           f"{src} to the others (gloo: 'connectFullMesh failed ... remote=[127.0.0.1]'); fix: "
                           "--main-ip <node 0's address on the network the nodes share> (`ip -br addr` on node 0)")
    why = wait_reachable(resolve_ipv4(main_ip), main_port, wait_s)
    if why is not None:
        raise NetworkError(f"--main-ip {main_ip}: no answer on port {main_port} within {wait_s:g} s from this node "
                           f"({ifname}, {src}: {why}); fix: check that the address is node 0's on a network this node "
                           "reaches (a firewall or a down link drops the packets) and that node 0 was started")
    add = {k: ifname for k in IFNAME_VARS if not env.get(k)}
    kept = [f"{k}={env[k]} (set by you)" for k in IFNAME_VARS if env.get(k)]
    line = (f"network: node 0 ({main_ip}) reached through {ifname}, this node's address {src}; "
            + ", ".join([f"{k}={v}" for k, v in add.items()] + kept))
    return add, line


def netenv_main(argv: list[str]) -> int:
    """`python -m distlora.launch netenv MAIN_IP`: `export` lines pinning gloo/NCCL to the interface that
    routes to MAIN_IP (variables already set are kept), for job scripts (launch/slurm/multi_node.sbatch)
    that start accelerate themselves. Selection only: the launcher's own checks need the port and peers."""
    if len(argv) != 2 or argv[0] != "netenv":
        print("usage: python -m distlora.launch netenv MAIN_IP", file=sys.stderr)
        return 2
    main_ip = argv[1]
    try:
        ifname, src = route_to(main_ip)
    except NetworkError as err:
        print(f"distlora: {err}", file=sys.stderr)
        return 2
    for k in IFNAME_VARS:
        if not os.environ.get(k):
            print(f"export {k}={shlex.quote(ifname)}")
    print(f"distlora: network: {main_ip} reached through {ifname} ({src})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# CLI


def add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the run config YAML (the same one for every launcher)")
    p.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    p.add_argument("--gpus-per-node", "--processes-per-node", dest="per_node", type=int, default=1,
                   help="processes per machine: GPUs, or CPU processes with --cpu (default 1)")
    p.add_argument("--backend", choices=BACKENDS, default="ddp", help="ddp (default), zero2, zero3, fsdp2")
    p.add_argument("--cpu", action="store_true", help="CPU processes (tests, CPU clusters): gloo DDP, no GPUs asked for")
    p.add_argument("--main-port", type=int, default=None,
                   help=f"rendezvous port on node 0 (default: a free one on 1 node, {DEFAULT_MULTINODE_PORT} on several)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides passed on to distlora.train")


def shape_from_args(args) -> Shape:
    if args.nodes < 1 or args.per_node < 1:
        raise SystemExit("distlora: --nodes and --gpus-per-node must be >= 1")
    return Shape(args.nodes, args.per_node, args.backend, args.cpu)


def backend_problem(cfg, shape: Shape) -> str | None:
    """The run config's train.backend against the launch's --backend (auto follows the launch)."""
    b = cfg.train.backend
    if b in ("auto", shape.backend) or (b == "single" and shape.world == 1):
        return None
    if b == "single":
        return (f"train.backend: single runs one process, this launch starts {shape.world}; fix: --nodes 1 "
                "--gpus-per-node 1, or train.backend=auto")
    return f"train.backend: the run config says {b}, the launch --backend {shape.backend}; fix: --backend {b}, or train.backend=auto"


def sequence_parallel_problems(cfg, shape: Shape) -> list[str]:
    """train.sequence_parallel_size against the launch: it divides the processes and the model's heads."""
    from distlora.sequence_parallel import launch_problems

    return launch_problems(cfg, shape.world)


def data_parallel_size(cfg, shape: Shape) -> int:
    """Ranks that see different examples: the processes over train.sequence_parallel_size."""
    return config_mod.data_parallel(cfg.train, shape.world)


def load_run_config(args, shape: Shape | None = None, check_model: bool = True):
    """The run config, validated (exit 2 naming each problem). Without `check_model` nothing reads
    the model (no torch: rendering on a login node); the job's --check and the trainer do."""
    try:
        cfg = config_mod.load(args.config, args.overrides, check_model=check_model)
    except config_mod.ConfigError as err:
        print(err.render(), file=sys.stderr)
        raise SystemExit(2) from None
    errs = ([e for e in [backend_problem(cfg, shape), config_mod.accumulation_problem(cfg.train, shape.world)] if e]
            + sequence_parallel_problems(cfg, shape) if shape else [])
    for err in errs:
        print(f"distlora: {err}", file=sys.stderr)
    if errs:
        raise SystemExit(2)
    if shape:
        config_mod.resolve_accumulation(cfg, shape.world)  # checked just above: only fills the field
    if not check_model and cfg.lora.target_modules != "all-linear":
        print("distlora: note: lora.target_modules is checked against the model where it loads (--check, the run)",
              file=sys.stderr)
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="distlora launch", description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--accelerate-config", default=None,
                   help="where to write the accelerate config (default: <output_dir>/launch/accelerate.yaml)")
    p.add_argument("--machine-rank", type=int, default=None, help="several nodes: run this node's command")
    p.add_argument("--main-ip", default=None, help="several nodes: node 0's address")
    p.add_argument("--dry-run", action="store_true", help="write the accelerate config, print the command, run nothing")
    p.add_argument("--check", action="store_true", help="run the preflight checks only")
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="one GPU's memory in GiB (default: nvidia-smi's); passed on as train.device_memory_gib")
    args = p.parse_args(argv)
    if args.device_memory_gib is not None:  # an override, so that the workers resolve with the same number
        args.overrides = [*args.overrides, f"train.device_memory_gib={args.device_memory_gib}"]
    shape = shape_from_args(args)
    multi = shape.nodes > 1
    port = args.main_port or (DEFAULT_MULTINODE_PORT if multi else None)
    if multi and args.main_ip and (args.check or (args.machine_rank is not None and not args.dry_run)):
        # the network first: a wrong --main-ip is named in a second, before torch and the model load
        timeout = load_run_config(args, shape, check_model=False).train.collective_timeout_s
        rc = _pin_network(args.main_ip, port, shape.nodes, timeout)
        if rc:
            return rc
    cfg = load_run_config(args, shape, check_model=args.check or not args.dry_run)  # --dry-run: no torch
    out = Path(cfg.train.output_dir)
    if not multi and port is None and not args.dry_run:
        port = free_port()
    alloc = slurm_allocation()
    is_main_node = (args.machine_rank or 0) == 0 and (alloc is None or alloc["node_id"] == 0)
    if args.check or not args.dry_run:
        bad = input_problems(cfg)
        for prob in bad:
            print(f"distlora: {prob}", file=sys.stderr)
        if bad:
            print(f"distlora: {len(bad)} problem(s) with the run's inputs; nothing launched", file=sys.stderr)
            return 2
        mem, note = memory_check(cfg, shape)
        if note:
            print(f"distlora: preflight: {note}", file=sys.stderr)
        if mem.problem():
            print(f"distlora: {mem.problem()}", file=sys.stderr)
            print("distlora: the run does not fit the GPU's memory; nothing launched", file=sys.stderr)
            return 2
        problems, notes = preflight(cfg, shape, main_port=port, is_main_node=is_main_node)
        for n in notes:
            print(f"distlora: preflight: {n}", file=sys.stderr)
        for prob in problems:
            print(f"distlora: preflight problem: {prob}", file=sys.stderr)
        if problems:
            print(f"distlora: {len(problems)} preflight problem(s); nothing launched", file=sys.stderr)
            return EXIT_PREFLIGHT
        if args.check:
            print("distlora: preflight ok", file=sys.stderr)
            return 0

    acc_path = args.accelerate_config or str(out / "launch" / "accelerate.yaml")
    runs_here = not args.dry_run and (not multi or (args.machine_rank is not None and args.main_ip))
    # A run that never starts replaces no file of the run already in output_dir: the config it launches
    # with is written aside and kept under its name only once the trainer started (_run).
    write_to = str(Path(acc_path).with_name(f".pending-{os.getpid()}-{Path(acc_path).name}")) if runs_here else acc_path
    Path(write_to).parent.mkdir(parents=True, exist_ok=True)
    Path(write_to).write_text(render_accelerate_yaml(shape, acc_path, port if multi else None))
    if not runs_here:
        print(f"distlora: wrote {acc_path} ({shape.describe()})", file=sys.stderr)

    if not multi:
        cmd = launch_command(shape, acc_path, args.config, args.overrides, main_port=port)
        print(shlex.join(cmd), flush=True)
        if args.dry_run:
            return 0
        return _run(launch_command(shape, write_to, args.config, args.overrides, main_port=port), out, Path(acc_path))
    if args.machine_rank is not None and args.main_ip and not args.dry_run:
        cmd = launch_command(shape, acc_path, args.config, args.overrides, main_port=port,
                             machine_rank=args.machine_rank, main_ip=args.main_ip)
        print(shlex.join(cmd), flush=True)
        watch = _MainNodeWatch(args.main_ip, port, cfg.train.collective_timeout_s) if args.machine_rank else None
        return _run(launch_command(shape, write_to, args.config, args.overrides, main_port=port,
                                   machine_rank=args.machine_rank, main_ip=args.main_ip), out, Path(acc_path), watch)
    ip = args.main_ip or "$MAIN_IP"
    print(f"# {shape.describe()}: run on every node, with MAIN_IP = node 0's address "
          f"(the accelerate config must be readable there)")
    for r in range(shape.nodes):
        cmd = launch_command(shape, acc_path, args.config, args.overrides, main_port=port, machine_rank=r, main_ip="@IP@")
        print(f"# node {r}:")
        print(shlex.join(cmd).replace("@IP@", ip if ip != "$MAIN_IP" else '"$MAIN_IP"'))
    return 0


def _pin_network(main_ip: str, port: int, nodes: int, collective_timeout_s: int) -> int:
    """This node's network for a multi-node run: checked (exit 2 naming --main-ip) and the chosen
    interface exported for the workers this process starts."""
    try:
        add, line = network_setup(main_ip, port, nodes, min(MAIN_REACH_WAIT_S, collective_timeout_s))
    except NetworkError as err:
        print(f"distlora: {err}", file=sys.stderr)
        print("distlora: nothing launched", file=sys.stderr)
        return 2
    print(f"distlora: {line}", file=sys.stderr)
    os.environ.update(add)
    return 0


EXIT_FAILED = 1  # a rank failed: its one-line error is shown, the whole output is in the log file
EXIT_INTERRUPTED = 130  # a second Ctrl-C: the run was killed without a checkpoint


_LOG_LINE = __import__("re").compile(r"^\[?[WEI]\d{4} \d\d:\d\d:\d\d")


class _Shown:
    """What of the launched job's output reaches the terminal: everything but tracebacks, torch's own
    log lines (elastic's and gloo's warnings) and elastic's failure block (all stay in the log file). Ranks name their own error in one line
    (`distlora: rank N failed: ...`); the first of them is kept for the end of the run."""

    def __init__(self):
        self.in_traceback = self.in_block = False
        self.first_failure = None

    def keep(self, line: str) -> bool:
        s = line.rstrip("\n")
        body = s.split("]:", 1)[1].lstrip() if s.startswith("[rank") and "]:" in s else s  # accelerate's rank prefix
        if "distlora: rank " in body and " failed: " in body and self.first_failure is None:
            self.first_failure = body[body.index("distlora: rank "):]
        if _LOG_LINE.match(body):  # torch's (elastic's, gloo's) own log lines: in the log file only
            return False
        if "Traceback (most recent call last):" in body:  # also after another rank's unfinished line
            self.in_traceback = True
            return False
        if self.in_traceback:
            if body.startswith((" ", "\t")) or not body or body.startswith("During handling") \
                    or body.startswith("The above exception"):
                return False
            self.in_traceback = False  # the exception line ends it; it is in the log with the rest
            return False
        if body.startswith("=" * 20):
            self.in_block = not self.in_block
            return False
        if self.in_block:
            return False
        return True


def _kill_tree(pid: int, sig: int) -> None:
    """`sig` to `pid` and all its descendants (Linux /proc). Not its process group alone: torch's elastic
    agent starts each worker in a session of its own, and a surviving worker keeps the output pipe open."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:  # the agent first: it restarts or waits on nothing once killed
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class _MainNodeWatch:
    """On nodes other than 0: ends this node's job once node 0's rendezvous store (served by node 0's
    launcher agent on the main port for the whole run) has stopped answering for `grace_s` seconds after
    it answered once. A rank blocked where no collective timeout reaches it (its own work, a connect to a
    peer that went away) would otherwise outlive a failed node 0 by up to its own 30-minute defaults;
    node 0 ends by itself once its ranks' collectives time out. The grace lets a finished run's ranks
    exit by themselves after node 0's agent has."""

    POLL_S = 1.0

    def __init__(self, main_ip: str, port: int, grace_s: float):
        self.addr, self.grace_s, self.reason = (main_ip, port), grace_s, None

    def answers(self) -> bool:
        try:
            with socket.create_connection(self.addr, timeout=min(5.0, self.grace_s)):
                return True
        except OSError:
            return False

    def start(self, proc: subprocess.Popen) -> None:
        import threading

        threading.Thread(target=self._loop, args=(proc,), daemon=True, name="distlora-main-watch").start()

    def _loop(self, proc) -> None:
        import signal
        import time

        seen, lost_since = False, None
        while proc.poll() is None:
            now = time.monotonic()
            if self.answers():
                seen, lost_since = True, None
            elif seen:
                lost_since = lost_since or now
                if now - lost_since >= self.grace_s and proc.poll() is None:
                    self.reason = (f"distlora: node 0 ({self.addr[0]}:{self.addr[1]}, the rendezvous store) stopped "
                                   f"answering {self.grace_s:g} s ago: its job ended or it is unreachable; this node's "
                                   "ranks were killed (node 0's own error is in its output)")
                    print(self.reason, file=sys.stderr, flush=True)
                    _kill_tree(proc.pid, signal.SIGKILL)  # no checkpoint can be agreed on without node 0
                    return
            time.sleep(self.POLL_S)


def _run(cmd: list[str], out: Path, acc_final: Path | None = None, watch: _MainNodeWatch | None = None) -> int:
    """Run it in the foreground, in its own process group, its whole output in
    <output_dir>/logs/launch-<time>.log and on the terminal without tracebacks. SIGTERM, SIGUSR1 and
    a first Ctrl-C become a stop request the trainer sees at its next optimizer step (the STOP file: it
    checkpoints and exits 75); a second Ctrl-C kills the job (exit 130). Exit codes: 0 done, 1 a rank
    failed (its error line repeated at the end, with the log's path), 75 stopped on request.
    `acc_final`: where the accelerate config the command uses (a pending copy) is kept once the trainer
    really started (status.json written by this run); otherwise the pending copy is removed, so that a
    run that never started replaces nothing."""
    import signal
    import time

    # A STOP file left by the previous stop: remove it before any rank starts, or a rank that
    # reaches its first step before rank 0 deletes it would stop the new run at once.
    out.mkdir(parents=True, exist_ok=True)
    (out / "STOP").unlink(missing_ok=True)
    log_path = out / "logs" / time.strftime("launch-%Y%m%d-%H%M%S.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    proc = subprocess.Popen(runnable(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, layout.LAUNCH_LOG_ENV: str(log_path)},  # the trainer keeps none of its own
                            start_new_session=True)  # Ctrl-C reaches this process only; it asks for a stop
    if watch is not None:
        watch.start(proc)
    asked = []

    def request_stop(signum, _frame):
        if signum == signal.SIGINT and signal.SIGINT in asked:
            print("distlora: second interrupt: killing the run (progress since the last checkpoint is lost)",
                  file=sys.stderr, flush=True)
            _kill_tree(proc.pid, signal.SIGKILL)  # the workers too: they run in sessions of their own
            asked.append("kill")
            return
        print(f"distlora: {signal.Signals(signum).name}: asking the trainer to checkpoint and stop", file=sys.stderr,
              flush=True)
        (out / "STOP").touch()
        asked.append(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, request_stop)
    shown = _Shown()
    with open(log_path, "w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if shown.keep(line):
                sys.stdout.write(line)
                sys.stdout.flush()
    rc = proc.wait()
    status = layout.read_status(out) or {}
    this_run = status.get("time", 0) >= started
    pending = Path(cmd[cmd.index("--config_file") + 1]) if "--config_file" in cmd else None
    if acc_final is not None and pending is not None and pending != acc_final and pending.exists():
        if this_run:
            pending.replace(acc_final)
        else:
            pending.unlink()
    if "kill" in asked:
        return EXIT_INTERRUPTED
    if this_run and status.get("status") == "stopped":
        print(f"distlora: stopped on request at step {status.get('step')}/{status.get('total_steps')}; rerun the "
              f"same command to resume (log: {log_path})", file=sys.stderr)
        return EXIT_STOPPED
    if rc != 0:
        what = shown.first_failure or (watch and watch.reason) or f"the job failed (exit {rc})"
        print(f"{what}\ndistlora: full log: {log_path}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(netenv_main(sys.argv[1:]))
