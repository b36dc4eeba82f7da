"""`distlora slurm`: render an sbatch script for a run config and a machine shape.

    distlora slurm --config run.yaml --nodes N --gpus-per-node G --time HH:MM:SS
                   [--partition P] [--account A] [--cpus-per-task C] [--mem M] [--sbatch-arg ARG ...]
                   [--signal-secs S] [--cpu --processes-per-node P] [--backend B] [--main-port PORT]
                   [--out job.sbatch] [--submit] [dotted.key=value ...]

The script is one of the commented templates in launch/slurm/ (single_node.sbatch, multi_node.sbatch)
with literal values filled in: #SBATCH lines cannot expand shell variables, so paths are made
absolute here. It writes the accelerate config next to it (the same generator as `distlora launch`),
checks the shape in the job before starting (`distlora launch --check`), and handles preemption and
time limits: USR1/TERM -> STOP file -> checkpoint on all ranks -> `scontrol requeue` -> automatic
resume. See the templates for the details.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

from distlora.launch import Shape, add_shape_args, load_run_config, render_accelerate_yaml, shape_from_args

TEMPLATES = Path(__file__).resolve().parents[1] / "launch" / "slurm"


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


def render(shape: Shape, *, run_config: Path, output_dir: Path, accelerate_config: Path, time: str,
           job_name: str = "distlora", partition: str | None = None, account: str | None = None,
           cpus_per_task: int | None = None, mem: str | None = None, sbatch_args=(), signal_secs: int | None = None,
           main_port: int | None = None, overrides=(), workdir: Path | None = None, python: str | None = None,
           generator_args: str = "") -> str:
    seconds = parse_time(time)
    if signal_secs is None:
        signal_secs = min(300, max(seconds // 10, 30))
    if signal_secs >= seconds:
        raise ValueError(f"--signal-secs {signal_secs} must be shorter than --time {time} ({seconds} s)")
    cpus = cpus_per_task or (shape.procs_per_node if shape.cpu else None)
    sb_res, srun_res = [], []
    if not shape.cpu:
        sb_res.append(f"#SBATCH --gpus-per-node={shape.procs_per_node}")
        srun_res.append(f"--gpus-per-node={shape.procs_per_node}")
    if cpus:
        sb_res.append(f"#SBATCH --cpus-per-task={cpus}")
        srun_res.append(f"--cpus-per-task={cpus}")  # srun does not inherit it from sbatch (SLURM >= 22.05)
    extra = [f"#SBATCH --partition={partition}"] if partition else []
    extra += [f"#SBATCH --account={account}"] if account else []
    extra += [f"#SBATCH --mem={mem}"] if mem else []
    extra += [f"#SBATCH {a}" for a in sbatch_args]
    for line in sb_res + extra:
        if "$" in line or "`" in line:
            raise ValueError(f"{line!r}: #SBATCH lines do not expand shell variables; give the literal value")
    per = f"--processes-per-node {shape.procs_per_node} --cpu" if shape.cpu else f"--gpus-per-node {shape.procs_per_node}"
    values = {
        "RENDERED_BY": f"Rendered by `distlora slurm {generator_args}` from launch/slurm/.".replace("  ", " "),
        "JOB_NAME": job_name,
        "NODES": str(shape.nodes),
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
        "SHAPE_ARGS": f"--nodes {shape.nodes} {per} --backend {shape.backend}",
    }
    name = "single_node.sbatch" if shape.nodes == 1 else "multi_node.sbatch"
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
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node task (default: --processes-per-node with --cpu)")
    p.add_argument("--mem", default=None, help="#SBATCH --mem, e.g. 200G")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH option, e.g. --qos=high (repeatable)")
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

    bad = data_file_problems(cfg)
    if bad:
        print(f"distlora slurm: {bad[0]}; nothing written", file=sys.stderr)
        return 2
    gen = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    try:  # everything rendered before anything is written: a refused render leaves the directory as it was
        text = render(shape, run_config=Path(args.config).resolve(), output_dir=output_dir, accelerate_config=acc,
                      time=args.time, job_name=args.job_name, partition=args.partition, account=args.account,
                      cpus_per_task=args.cpus_per_task, mem=args.mem, sbatch_args=args.sbatch_arg,
                      signal_secs=args.signal_secs, main_port=args.main_port, overrides=args.overrides,
                      generator_args=gen)
    except ValueError as err:
        print(f"distlora slurm: {err}", file=sys.stderr)
        return 2
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
