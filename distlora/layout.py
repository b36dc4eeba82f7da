"""The checkpoint layout on disk, and what can be read from it without torch.

    output_dir/adapter/                         final adapter (PEFT format) + tokenizer
    output_dir/checkpoints/step-NNNNNNNN/       adapter/, optimizer.pt, scheduler.pt, trainer_state.json,
                                                COMPLETE.json (written last: step, files and sizes)

Names, discovery (complete checkpoints, the latest one), the trainer state, the disk space a run
needs and whether a checkpoint can be resumed: launchers use these on a login node, so this module
imports no torch (tests/test_torchfree.py checks it). Writing and loading are in distlora.checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "COMPLETE.json"
# In checkpoints of older versions under DeepSpeed: the engine's per-rank optimizer partitions (no full
# state): refused for exact resume by resume_problems.
ZERO_PARTITIONS = "deepspeed"
STATE = "trainer_state.json"
STATUS = "status.json"  # output_dir/status.json: running | stopped | complete, written by the trainer's rank 0
# Set by `distlora launch` to its log of the whole job (output_dir/logs/launch-<time>.log): the workers
# then keep no per-rank log of their own (output_dir/logs/train-<time>-rank<R>.log otherwise).
LAUNCH_LOG_ENV = "DISTLORA_LAUNCH_LOG"

# Config keys whose change makes a resumed run not the run it continues: the lr schedule (the data
# order's keys are checked through data_order). Refused by name unless train.resume_weights_only.
SCHEDULE_KEYS = ("train.max_steps", "train.epochs", "train.lr", "train.lr_scheduler", "train.warmup_ratio",
                 "train.warmup_steps")
# Keys that never matter to a resume (where the run is, how it is resumed).
RESUME_KEYS = ("train.output_dir", "train.resume", "train.resume_weights_only")


def write_status(output_dir, status: str, **info) -> None:
    """The run's state for launchers and reruns (atomic: written aside, then renamed)."""
    import time

    path = Path(output_dir) / STATUS
    tmp = path.with_name(f".{STATUS}.tmp")
    tmp.write_text(json.dumps({"status": status, "time": time.time(), **info}, indent=1))
    tmp.replace(path)


def read_status(output_dir) -> dict | None:
    try:
        return json.loads((Path(output_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return None


def flat(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict | None, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for each run-config key that differs (resume keys aside)."""
    if old is None:
        return []
    a, b = flat(old), flat(new)
    derived = set()
    if a.get("train.global_batch_size") is not None and a.get("train.global_batch_size") == b.get("train.global_batch_size"):
        derived = {"train.gradient_accumulation_steps"}  # follows the process count under a kept global batch
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in RESUME_KEYS and k not in derived]


def ckpt_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir, step: int) -> Path:
    return ckpt_root(output_dir) / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def complete_checkpoints(output_dir) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints sorted by step, partial ones)."""
    root = ckpt_root(output_dir)
    if not root.is_dir():
        return [], []
    done, partial = [], []
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            continue
        if d.name.startswith("step-") and is_complete(d):
            done.append(d)
        else:
            partial.append(d)
    return done, partial


def latest(output_dir) -> Path | None:
    done, _ = complete_checkpoints(output_dir)
    return done[-1] if done else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE).read_text())


def lora_shape(cfg) -> dict:
    """What fixes the adapter tensors' keys and shapes."""
    lo = cfg.lora
    shape = {"r": lo.r, "target_modules": lo.target_modules, "use_dora": lo.use_dora,
             "modules_to_save": lo.modules_to_save}
    # an init that moves the base saves rank 2r against another base: named only then, so checkpoints
    # written before lora.init existed (default init) still match
    return shape | {"init": lo.init} if lo.moves_base else shape


CHECKPOINT_OVERHEAD = 16 << 20  # per checkpoint: tokenizer files, scheduler and trainer state
UNBOUNDED_KEPT = 12  # checkpoints counted when keep_last is null and the number of steps is not known


def checkpoint_bytes(trainable_params: int) -> int:
    """One checkpoint, estimated for any backend: the fp32 adapter, its two fp32 Adam moments and, under
    DeepSpeed, the fp32 master copy in optimizer-zero.pt (16 bytes per trainable parameter) +
    CHECKPOINT_OVERHEAD."""
    return 16 * trainable_params + CHECKPOINT_OVERHEAD


def disk_need(ckpt_bytes: int, keep_last: int | None, save_every: int, max_steps: int | None = None) -> tuple[int, int]:
    """(bytes output_dir must hold, checkpoints counted): the one disk formula (the launcher's
    preflight and the trainer's start). While a checkpoint is written, keep_last complete ones, the
    best by eval loss (rotation keeps it) and the new one exist; then the final adapter, a third of
    a checkpoint (no optimizer state). `ckpt_bytes`: measured on an existing checkpoint, or
    checkpoint_bytes(trainable parameters)."""
    if not save_every:
        kept = 0
    elif keep_last:
        kept = keep_last + 2
    elif max_steps:
        kept = max_steps // save_every + 1
    else:
        kept = UNBOUNDED_KEPT
    return ckpt_bytes * kept + ckpt_bytes // 3, kept


def check_room(output_dir, trainable_params: int, keep_last: int | None, save_every: int,
               max_steps: int | None = None) -> str | None:
    """At trainer start: can output_dir hold what this run will write? (None = yes, else the problem.)"""
    out = Path(output_dir)
    probe = out / f".write-probe-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return f"train.output_dir: cannot write to {out} ({exc.strerror or exc}); point it at a writable directory"
    ckpt = checkpoint_bytes(trainable_params)
    need, copies = disk_need(ckpt, keep_last, save_every, max_steps)
    free = shutil.disk_usage(out).free
    if free < need:
        return (f"train.output_dir: {free / 2**20:,.0f} MiB free on {out}, this run needs ~{need / 2**20:,.0f} MiB "
                f"({copies} checkpoint(s) of ~{ckpt / 2**20:,.0f} MiB + the adapter); free space, lower "
                "train.keep_last, or use another directory")
    return None


def global_batch_problem(state: dict, ckpt: Path, cfg, global_batch: int, dp: int) -> str | None:
    """The global batch `ckpt` was written with vs this run's (micro x accumulation x `dp` processes):
    the data order depends on it, so a resume needs it equal (the launcher's preflight and the trainer)."""
    written = state.get("global_batch")  # absent only in hand-made states
    if written is None or written == global_batch:
        return None
    t = cfg.train
    per_step = t.micro_batch_size * dp
    keep = (f"train.gradient_accumulation_steps={written // per_step}" if written % per_step == 0 and written >= per_step
            else "raise gradient_accumulation_steps when using fewer processes")
    return (f"train: {ckpt.name} was written with global batch {written} (micro x accumulation x processes), this "
            f"run has {global_batch} = {t.micro_batch_size} x {t.gradient_accumulation_steps} x {dp}; the data order "
            f"depends on the global batch. Keep it equal (e.g. {keep}, or train.global_batch_size={written}, which derives "
            "it), or set train.resume_weights_only=true with "
            "train.resume=<that checkpoint>, or train.resume=never")


def schedule_problem(state: dict, ckpt: Path, cfg) -> str | None:
    """A checkpoint written under another lr schedule (SCHEDULE_KEYS) is not resumed exactly (the
    launcher's preflight and the trainer)."""
    schedule = [(k, a, b) for k, a, b in config_changes(state.get("config"), cfg.to_dict()) if k in SCHEDULE_KEYS]
    if not schedule:
        return None
    return (f"train: {ckpt.name} was trained with another lr schedule "
            f"({'; '.join(f'{k}: {a} -> {b}' for k, a, b in schedule)}), so resuming it would not continue that run; "
            "restore those settings, or set train.resume_weights_only=true with "
            f"train.resume={ckpt} (its adapter, a fresh schedule from step 0), or train.resume=never")


def resume_problems(state: dict, ckpt: Path, cfg, global_batch: int, dp: int,
                    data_order: dict | None = None) -> list[tuple[str, bool]]:
    """Why `ckpt` cannot be resumed exactly by this run: (message, fixable by train.resume_weights_only)."""
    problems = []
    sched = schedule_problem(state, ckpt, cfg)
    if sched:
        problems.append((sched, True))
    old_order = state.get("data_order")  # absent in checkpoints written before it was recorded
    if data_order is not None and old_order is not None and old_order != data_order:
        where = {"seed": "train.seed", "shuffle": "data.shuffle", "group_by_length": "data.group_by_length",
                 "row_capacity": "data.packing / train.micro_batch_tokens / data.max_seq_len (packed row tokens)",
                 "items": "the training data (examples, or packed rows, after filtering)"}
        changed = [f"{where[k]}: {old_order.get(k)} -> {v}" for k, v in data_order.items() if old_order.get(k) != v]
        problems.append((
            f"data: {ckpt.name} was trained on another data order ({'; '.join(changed)}), so the remaining steps would "
            "not hold the examples an uninterrupted run would; restore those settings, or set "
            "train.resume_weights_only=true (fresh schedule and order), or train.resume=never", True))
    gb = global_batch_problem(state, ckpt, cfg, global_batch, dp)
    if gb:
        problems.append((gb, True))
    if state.get("model", cfg.model.name_or_path) != cfg.model.name_or_path:
        problems.append((f"model.name_or_path: {ckpt.name} trained on '{state['model']}', this run loads "
                         f"'{cfg.model.name_or_path}'; set train.resume_weights_only=true to start from its adapter "
                         "anyway, or train.resume=never", True))
    old_shape = state.get("lora_shape", lora_shape(cfg))
    if old_shape != lora_shape(cfg):
        new_shape = lora_shape(cfg)
        changed = {k: (old_shape.get(k), new_shape.get(k)) for k in {**old_shape, **new_shape}
                   if old_shape.get(k) != new_shape.get(k)}
        problems.append((f"lora: {ckpt.name} holds an adapter of another shape ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                         "its tensors cannot load into this model: restore those settings, or set train.resume=never", False))
    if (ckpt / ZERO_PARTITIONS).is_dir():
        problems.append((f"train: {ckpt.name} holds DeepSpeed's per-rank ZeRO partitions (written before distlora "
                         "saved the optimizer state in full), which this version cannot load; set "
                         "train.resume_weights_only=true (its adapter, a fresh optimizer), or train.resume=never",
                         True))
    return problems
