"""`distlora slurm`: render an sbatch script for a run config and a machine shape.

    distlora slurm --config run.yaml --nodes N [--nodes-min M] --gpus-per-node G --time HH:MM:SS
                   [--partition P] [--account A] [--cpus-per-task C|none] [--cpus-per-gpu C]
                   [--mem M|none | --mem-per-gpu M] [--sbatch-arg ARG ...]
                   [--signal-secs S] [--cpu --processes-per-node P] [--backend B] [--main-port PORT]
                   [--out job.sbatch] [--submit] [dotted.key=value ...]

The script is one of the commented templates in launch/slurm/ (single_node.sbatch, multi_node.sbatch)
with literal values filled in: #SBATCH lines cannot expand shell variables, so paths are made
absolute here. It writes the accelerate config next to it (the same generator as `distlora launch`),
checks the shape in the job before starting (`distlora launch --check`), and handles preemption and
time limits: USR1/TERM -> STOP file -> checkpoint on all ranks -> `scontrol requeue` -> automatic
resume. With --nodes-min the job may start, and be requeued after a node failure, on M..N nodes: it
runs on the nodes SLURM gave, train.global_batch_size keeping the global batch (checked here for every
count). See the templates for the details.

Resources of a GPU job (one task per node runs all the node's ranks, so the task asks for the node's share):
- CPUs: --cpus-per-task, default GPUs x CPUs per GPU; CPUs per GPU from --cpus-per-gpu, else the
  partition's cores / GPUs per node as `sinfo` reports them (on a login node), else DEFAULT_CPUS_PER_GPU.
- Memory: --mem (per node) or --mem-per-gpu, default host_bytes_per_node: each rank loads the whole
  frozen base into host memory before moving it to its GPU (ZeRO-3: rank 0 alone), plus the process'
  own share (PROCESS_HOST_BYTES). The base's size is read from the model's safetensors headers (local
  directory or the hub cache), without torch.
A GPU job that would ask for no CPUs or no memory (SLURM then gives one core for all ranks, or a small
default memory on many clusters) is refused before anything is written (exit 2), naming the flag;
`--cpus-per-task none` / `--mem none` leave them to the cluster on purpose. CPU jobs (--cpu: tests, CPU
clusters) ask for one CPU per process and leave memory to the cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

from distlora.launch import Shape, add_shape_args, load_run_config, render_accelerate_yaml, shape_from_args

TEMPLATES = Path(__file__).resolve().parents[1] / "launch" / "slurm"
GIB = 2**30
# Per GPU rank when the node's cores are unknown: the training loop's thread, NCCL's proxy threads and
# the tokenizer's forked workers at start. 8 fits the common GPU nodes (4 GPUs / 32+ cores, 8 GPUs /
# 64+ cores); a node with fewer cores per GPU rejects the job: give --cpus-per-gpu.
DEFAULT_CPUS_PER_GPU = 8
# Host memory of one GPU rank besides the base weights: Python + torch/transformers/accelerate imported
# (0.52 GiB peak RSS measured: distlora.train, tiny model, CPU), the CUDA context's host side and pinned staging
# buffers, the tokenized data. An estimate, not measured on a GPU: --mem / --mem-per-gpu override it.
PROCESS_HOST_BYTES = 4 * GIB
# bytes per element of the dtypes the frozen base can be loaded in (config: model.dtype, quantization)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bytes per element of the dtypes a safetensors file can hold (its header's "dtype")
SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                     "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
# #SBATCH options by which a user's --sbatch-arg sets the job's memory (srun's step inherits the job's).
# Not --exclusive: it gives all the node's CPUs but only the memory asked for.
USER_MEM = ("--mem", "--mem-per-gpu", "--mem-per-cpu")
# CPUs set through --sbatch-arg would miss the srun line (srun >= 22.05 does not inherit --cpus-per-task,
# and a step of one CPU would pin every rank to one core): refused, naming distlora slurm's own flags.
USER_CPUS = ("--cpus-per-task", "--cpus-per-gpu", "-c")


def parse_time(text: str) -> int:
    """SLURM --time forms used here: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS -> seconds."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: use HH:MM:SS (or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if c is not None:
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:
        return int(a) * 60 + int(b)
    return int(a) * 60


# ---------------------------------------------------------------------------------------------- resources


def safetensors_sizes(model_dir: Path) -> tuple[int, int] | None:
    """(elements, bytes as stored) of all tensors in `model_dir`'s *.safetensors files, from their JSON
    headers (8-byte little-endian length, then the header): no tensor is read, no torch. None: no such files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    numel = stored = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                numel += math.prod(t["shape"])
                stored += math.prod(t["shape"]) * SAFETENSORS_BYTES[t["dtype"]]
    return numel, stored


def model_dir(name_or_path: str) -> Path | None:
    """The directory holding the model's files: the local path, or the hub cache's snapshot of a hub id
    (None when it is not in the cache: nothing is downloaded here)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if name_or_path.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name_or_path, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def load_dtype(cfg, shape: Shape) -> str:
    """The dtype the frozen base is loaded in on the host, as model.dtype's description says: auto = bf16
    under bf16 training (train.mixed_precision auto picks bf16 on GPUs; Ampere and newer), else fp32.
    A 4-bit base is read in its compute dtype and quantized where it lands."""
    q = cfg.model.quantization
    if q is not None:
        return q.compute_dtype
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "no" if shape.cpu else "bf16"
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mp, "float32")


def host_bytes_per_node(cfg, shape: Shape) -> tuple[int | None, str]:
    """(bytes, how) one node's ranks need in host memory at their peak (loading the base), or (None, why not).
    Without a device_map transformers' from_pretrained builds the whole base in host memory in every rank,
    then the backend moves it to the GPU. Under ZeRO-3 (a full-precision base) only rank 0 reads the values
    (transformers' modeling_utils: the other ranks map the checkpoint to "meta") and DeepSpeed scatters them
    into the GPUs' partitions: the base once per node (the job asks the same of every node), as stored or
    loaded, whichever is larger."""
    where = model_dir(cfg.model.name_or_path)
    sizes = safetensors_sizes(where) if where is not None else None
    if sizes is None:
        return None, f"model.name_or_path '{cfg.model.name_or_path}': no *.safetensors locally or in the hub cache"
    numel, stored = sizes
    dtype = load_dtype(cfg, shape)
    loaded = numel * DTYPE_BYTES[dtype]
    g = shape.procs_per_node
    rest = f"{g} x {PROCESS_HOST_BYTES // GIB} GiB per rank"
    if shape.backend == "zero3" and cfg.model.quantization is None:
        base = max(stored, loaded)
        return base + g * PROCESS_HOST_BYTES, f"the base once, {base / GIB:.1f} GiB ({numel / 1e9:.2f}B parameters) + {rest}"
    return g * (loaded + PROCESS_HOST_BYTES), (f"{g} x the base in {dtype}, {loaded / GIB:.1f} GiB ({numel / 1e9:.2f}B "
                                              f"parameters) + {rest}")


def node_cpus_per_gpu(partition: str | None) -> int | None:
    """min over the partition's nodes of cores // GPUs, as `sinfo` reports them (%c CPUs, %G GRES such as
    gpu:8 or gpu:h100:8(S:0-1)); the default partition (marked *) without --partition. None: no sinfo
    here (not a login node), no answer, or no GPUs in the GRES."""
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P %c %G"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    ratios = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        part, cpus, gres = parts
        if (part.rstrip("*") != partition) if partition else not part.endswith("*"):
            continue
        gpus = sum(int(m) for m in re.findall(r"gpu(?::[\w.-]+)?:(\d+)", gres))
        if gpus and cpus.rstrip("+").isdigit():
            ratios.append(int(cpus.rstrip("+")) // gpus)
    return max(1, min(ratios)) if ratios else None


def parse_mem(text: str, flag: str) -> str:
    """A SLURM memory size (digits, optional K/M/G/T; no unit = MB), returned as given."""
    if not re.fullmatch(r"\d+[KMGT]?", text.strip(), flags=re.I):
        raise ValueError(f"{flag} {text!r}: give a size such as 64G (or none)")
    return text.strip()


def _user_sets(sbatch_args, options) -> str | None:
    """The first --sbatch-arg that sets one of `options`."""
    return next((a for a in sbatch_args if a.strip() and a.split("=")[0].split()[0] in options), None)


def resources(cfg, shape: Shape, *, cpus_per_task: str | None = None, cpus_per_gpu: int | None = None,
              mem: str | None = None, mem_per_gpu: str | None = None, partition: str | None = None,
              sbatch_args=()) -> tuple[dict, list[str]]:
    """The job's CPU and memory requests ({"cpus_per_task": int|None, "mem": str|None, "mem_per_gpu":
    str|None}) and the notes saying where each came from. ValueError (one line, the flag and the fix):
    a GPU job that would ask for no CPUs or no memory without the user saying so."""
    req, notes = {"cpus_per_task": None, "mem": None, "mem_per_gpu": None}, []
    if mem is not None and mem_per_gpu is not None:
        raise ValueError("--mem and --mem-per-gpu both given; fix: keep one (--mem is per node)")
    g = shape.procs_per_node
    # CPUs
    given = _user_sets(sbatch_args, USER_CPUS)
    if given:
        raise ValueError(f"--sbatch-arg={given}: it would not reach the srun line; fix: --cpus-per-task N "
                         "(or --cpus-per-gpu N) of distlora slurm instead")
    if cpus_per_task == "none":
        notes.append("CPUs: left to the cluster (--cpus-per-task none)")
    elif cpus_per_task is not None:
        if not cpus_per_task.isdigit():
            raise ValueError(f"--cpus-per-task {cpus_per_task!r}: give a number (or none)")
        req["cpus_per_task"] = int(cpus_per_task)
        if req["cpus_per_task"] < 1:
            raise ValueError(f"--cpus-per-task {cpus_per_task}: the job would ask for no CPUs; fix: --cpus-per-task "
                             f"{g * (cpus_per_gpu or DEFAULT_CPUS_PER_GPU)}, or none to leave it to the cluster")
    elif shape.cpu:
        req["cpus_per_task"] = g  # one core per CPU process
    else:
        per, how = cpus_per_gpu, "--cpus-per-gpu"
        if per is None:
            per, how = node_cpus_per_gpu(partition), "the partition's cores per GPU (sinfo)"
        if per is None:
            per, how = DEFAULT_CPUS_PER_GPU, "default: node cores unknown here, --cpus-per-gpu to change"
        if per < 1:
            raise ValueError(f"--cpus-per-gpu {per}: the job would ask for no CPUs; fix: --cpus-per-gpu "
                             f"{DEFAULT_CPUS_PER_GPU} (or more)")
        req["cpus_per_task"] = g * per
        notes.append(f"CPUs: {g} x {per} per GPU ({how})")
    # memory
    if mem == "none" or _user_sets(sbatch_args, USER_MEM):
        notes.append("memory: left to the cluster, or as --sbatch-arg sets it")
    elif mem is not None:
        req["mem"] = parse_mem(mem, "--mem")
    elif mem_per_gpu is not None:
        if shape.cpu:
            raise ValueError("--mem-per-gpu with --cpu: a CPU job has no GPUs; fix: --mem (per node)")
        req["mem_per_gpu"] = parse_mem(mem_per_gpu, "--mem-per-gpu")
    elif not shape.cpu:
        need, how = host_bytes_per_node(cfg, shape)
        if need is None:
            raise ValueError(f"--mem: the job would ask for no memory, its size is unknown ({how}); fix: --mem SIZE "
                             "(per node), --mem-per-gpu SIZE, or --mem none for the cluster's default")
        req["mem"] = f"{math.ceil(need / GIB)}G"
        notes.append(f"memory: {req['mem']} per node = {how}")
    return req, notes


def render(shape: Shape, *, run_config: Path, output_dir: Path, accelerate_config: Path, time: str,
           job_name: str = "distlora", partition: str | None = None, account: str | None = None,
           cpus_per_task: int | None = None, mem: str | None = None, mem_per_gpu: str | None = None,
           sbatch_args=(), signal_secs: int | None = None,
           main_port: int | None = None, overrides=(), workdir: Path | None = None, python: str | None = None,
           generator_args: str = "", nodes_min: int | None = None) -> str:
    seconds = parse_time(time)
    if signal_secs is None:
        signal_secs = min(300, max(seconds // 10, 30))
    if signal_secs >= seconds:
        raise ValueError(f"--signal-secs {signal_secs} must be shorter than --time {time} ({seconds} s)")
    ranged = nodes_min is not None and nodes_min < shape.nodes
    cpus = cpus_per_task  # resources(): derived, given, or None (left to the cluster)
    sb_res, srun_res = [], []
    if not shape.cpu:
        sb_res.append(f"#SBATCH --gpus-per-node={shape.procs_per_node}")
        srun_res.append(f"--gpus-per-node={shape.procs_per_node}")
    if cpus:
        sb_res.append(f"#SBATCH --cpus-per-task={cpus}")
        srun_res.append(f"--cpus-per-task={cpus}")  # srun does not inherit it from sbatch (SLURM >= 22.05)
    if mem:
        sb_res.append(f"#SBATCH --mem={mem}")
    if mem_per_gpu:
        sb_res.append(f"#SBATCH --mem-per-gpu={mem_per_gpu}")
    extra = [f"#SBATCH --partition={partition}"] if partition else []
    extra += [f"#SBATCH --account={account}"] if account else []
    extra += [f"#SBATCH {a}" for a in sbatch_args]
    for line in sb_res + extra:
        if "$" in line or "`" in line:
            raise ValueError(f"{line!r}: #SBATCH lines do not expand shell variables; give the literal value")
    per = f"--processes-per-node {shape.procs_per_node} --cpu" if shape.cpu else f"--gpus-per-node {shape.procs_per_node}"
    nodes_arg = '"$NUM_NODES"' if shape.nodes > 1 else "1"  # the multi-node script's count (SLURM's, for a range)
    values = {
        "RENDERED_BY": f"Rendered by `distlora slurm {generator_args}` from launch/slurm/.".replace("  ", " "),
        "JOB_NAME": job_name,
        # a range lets SLURM start (or requeue) the job on fewer nodes: the script then runs on the nodes it got
        "NODES": f"{nodes_min}-{shape.nodes}" if ranged else str(shape.nodes),
        # one task per node; with a range, #SBATCH --ntasks-per-node=1 would make SLURM's default task count
        # the range's minimum and so allocate the fewest nodes (SLURM 22.05, measured): srun sets it instead
        "SBATCH_TASKS": ("# (no --ntasks-per-node: with a node range SLURM would allocate the fewest nodes; srun "
                         "below starts one task per node)" if ranged else "#SBATCH --ntasks-per-node=1"),
        "NUM_NODES": ('"$SLURM_JOB_NUM_NODES"  # what SLURM gave, within #SBATCH --nodes; train.global_batch_size '
                      "keeps the global batch" if ranged else str(shape.nodes)),
        "PER_NODE": str(shape.procs_per_node),
        "WORLD": str(shape.world),
        "SBATCH_RESOURCES": "\n".join(sb_res),
        "SRUN_RESOURCES": " ".join(srun_res),
        "SBATCH_EXTRA": "\n".join(extra),
        "TIME": time,
        "SIGNAL_SECS": str(signal_secs),
        "LOG": str(output_dir / "slurm-%j.log"),
        "OUTPUT_DIR": shlex.quote(str(output_dir)),
        "RUN_CONFIG": shlex.quote(str(run_config)),
        "ACCELERATE_CONFIG": shlex.quote(str(accelerate_config)),
        "PYTHON": shlex.quote(python or sys.executable),
        "OVERRIDES": " ".join(shlex.quote(o) for o in [*shape.run_overrides(), *overrides]),
        "MAIN_PORT": str(main_port) if main_port else "$((20000 + SLURM_JOB_ID % 20000))  # per job: jobs sharing a node do not collide",
        "WORKDIR": shlex.quote(str(workdir or Path.cwd())),
        "SHAPE_ARGS": f"--nodes {nodes_arg} {per} --backend {shape.backend}",
    }
    name = "single_node.sbatch" if shape.nodes == 1 else "multi_node.sbatch"  # the range's most
    text = (TEMPLATES / name).read_text()
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"\{\{[A-Z_]+\}\}", stripped) and not values[stripped[2:-2]]:
            continue  # an optional block left empty
        lines.append(re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], line))
    out = "\n".join(lines) + "\n"
    out = re.sub(r" +\\\n", " \\\n", out).replace("  \\", " \\")
    return out


def node_range_problem(cfg, shape: Shape, nodes_min: int | None) -> str | None:
    """--nodes-min against the run: the global batch must be kept, and divide, on every node count the
    job may get (train.global_batch_size derives the accumulation: distlora.config.accumulation)."""
    from distlora.config import accumulation_problem

    if nodes_min is None or nodes_min == shape.nodes:
        return None
    if not 1 <= nodes_min < shape.nodes:
        return f"--nodes-min {nodes_min}: must lie between 1 and --nodes {shape.nodes}"
    t = cfg.train
    if t.global_batch_size is None:
        now = t.micro_batch_size * t.gradient_accumulation_steps * (shape.world // t.sequence_parallel_size)
        return (f"--nodes-min {nodes_min}: a job requeued on fewer nodes resumes only with the same global batch; set "
                f"train.global_batch_size={now} (the accumulation then follows the nodes), or drop --nodes-min")
    for n in range(nodes_min, shape.nodes):
        err = accumulation_problem(t, n * shape.procs_per_node)
        if err:
            return f"--nodes-min {nodes_min}: on {n} node(s) {err}"
    return None


def _write_keeping(path: Path, text: str) -> Path | None:
    """Write `path`; a different file already there (an earlier run's job) is kept beside it under its
    modification time, never overwritten. Returns where the old one went, if anywhere."""
    import time as _time

    old = None
    if path.is_file() and path.read_text() != text:
        stamp = _time.strftime("%Y%m%d-%H%M%S", _time.localtime(path.stat().st_mtime))
        old = path.with_name(f"{path.name}.{stamp}")
        path.rename(old)
    path.write_text(text)
    return old


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="distlora slurm", description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--time", required=True, help="time limit, HH:MM:SS")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default="distlora")
    p.add_argument("--cpus-per-task", default=None,
                   help="CPUs of each node's task, all its ranks together, or none (the cluster's default); default: "
                        "GPUs x CPUs per GPU, or --processes-per-node with --cpu")
    p.add_argument("--cpus-per-gpu", type=int, default=None,
                   help=f"CPUs per GPU rank (default: the partition's cores / GPUs per node from sinfo, else "
                        f"{DEFAULT_CPUS_PER_GPU})")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--mem", default=None,
                     help="memory per node, e.g. 200G, or none (the cluster's default); default for GPU jobs: GPUs x "
                          "(the base weights in their load dtype + 4 GiB), from the model's safetensors")
    mem.add_argument("--mem-per-gpu", default=None, help="memory per GPU instead of per node, e.g. 40G")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH option, e.g. --qos=high (repeatable)")
    p.add_argument("--nodes-min", type=int, default=None,
                   help="fewest nodes the job may start or be requeued on (#SBATCH --nodes=MIN-MAX); the run keeps "
                        "its global batch through train.global_batch_size (default: --nodes, a fixed count)")
    p.add_argument("--signal-secs", type=int, default=None,
                   help="send USR1 this many seconds before the time limit (default min(300, time/10))")
    p.add_argument("--out", default=None, help="script path (default <output_dir>/launch/job.sbatch)")
    p.add_argument("--submit", action="store_true", help="also run sbatch on it")
    args = p.parse_args(argv)
    shape = shape_from_args(args)
    cfg = load_run_config(args, shape, check_model=False)  # no torch here; the job's `distlora launch --check` loads it
    output_dir = Path(cfg.train.output_dir).resolve()
    script = Path(args.out).resolve() if args.out else output_dir / "launch" / "job.sbatch"
    acc = script.parent / "accelerate.yaml"
    from distlora.launch import data_file_problems

    err = node_range_problem(cfg, shape, args.nodes_min)
    if err:
        print(f"distlora slurm: {err}; nothing written", file=sys.stderr)
        return 2
    bad = data_file_problems(cfg)
    if bad:
        print(f"distlora slurm: {bad[0]}; nothing written", file=sys.stderr)
        return 2
    gen = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    try:  # everything rendered before anything is written: a refused render leaves the directory as it was
        req, notes = resources(cfg, shape, cpus_per_task=args.cpus_per_task, cpus_per_gpu=args.cpus_per_gpu,
                               mem=args.mem, mem_per_gpu=args.mem_per_gpu, partition=args.partition,
                               sbatch_args=args.sbatch_arg)
        text = render(shape, run_config=Path(args.config).resolve(), output_dir=output_dir, accelerate_config=acc,
                      time=args.time, job_name=args.job_name, partition=args.partition, account=args.account,
                      **req, sbatch_args=args.sbatch_arg,
                      signal_secs=args.signal_secs, main_port=args.main_port, overrides=args.overrides,
                      generator_args=gen, nodes_min=args.nodes_min)
    except ValueError as err:
        print(f"distlora slurm: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"distlora slurm: {note}", file=sys.stderr)
    script.parent.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the log's directory
    kept = [k for k in (_write_keeping(acc, render_accelerate_yaml(shape, str(acc), args.main_port)),
                        _write_keeping(script, text)) if k]
    print(f"distlora: wrote {script} and {acc} ({shape.describe()}); log: {output_dir}/slurm-<jobid>.log"
          + (f"; the previous versions kept as {', '.join(k.name for k in kept)}" if kept else ""), file=sys.stderr)
    if not args.submit:
        print(f"sbatch {shlex.quote(str(script))}")
        return 0
    try:
        res = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except OSError as exc:  # no sbatch here: not a SLURM login node
        print(f"distlora slurm: cannot run sbatch ({exc.strerror or exc}); submit {script} from a SLURM login node, "
              "or drop --submit", file=sys.stderr)
        return 3
    if res.returncode != 0:
        first = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        print(f"distlora slurm: sbatch refused {script}: {first}", file=sys.stderr)
        return res.returncode
    print(res.stdout.strip().split(";")[0])
    return 0
