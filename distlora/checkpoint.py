"""The one owner of the on-disk layout: adapters, checkpoints, discovery and exact resume.

    output_dir/adapter/                         final adapter (PEFT format) + tokenizer
    output_dir/checkpoints/step-NNNNNNNN/       adapter/, optimizer.pt, scheduler.pt, trainer_state.json,
                                                COMPLETE.json (written last: step, files and sizes)
                                                under DeepSpeed: deepspeed/ (the engine's per-rank ZeRO
                                                optimizer partitions + its `latest`) instead of optimizer.pt

Every directory is written under a temporary sibling name, its files fsynced, the completeness
marker written last, then renamed into place: a crash or a full disk never leaves a directory
under a final name that is incomplete. Rotation deletes old checkpoints only after the new one
is complete, and keeps the one with the best eval loss.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from distlora import hooks

MARKER = "COMPLETE.json"
STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    pass


def ckpt_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir, step: int) -> Path:
    return ckpt_root(output_dir) / f"step-{step:08d}"


def _fsync_tree(path: Path) -> dict[str, int]:
    sizes = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            sizes[str(f.relative_to(path))] = f.stat().st_size
    return sizes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path, meta: dict) -> None:
    """fsync, write the marker last, rename into place (main process only)."""
    meta = {**meta, "files": _fsync_tree(tmp)}
    hooks.point("save.before_marker")
    with open(tmp / MARKER, "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    hooks.point("save.before_rename")
    if final.exists():  # same step written again (e.g. a rerun): replace only once the new copy is complete
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


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


def expected_adapter_shapes(model) -> dict[str, tuple[int, ...]]:
    """LoRA tensor shapes from each adapted layer's geometry (not from the tensors, which ZeRO-3 partitions)."""
    from peft.tuners.lora import LoraLayer

    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in getattr(module, "r", {}):
            r = module.r["default"]
            prefix = name.replace(".default", "")
            shapes[f"{prefix}.lora_A.weight"] = (r, module.in_features)
            shapes[f"{prefix}.lora_B.weight"] = (module.out_features, r)
    return shapes


def verify_adapter(adapter_dir: Path, model) -> None:
    """Fail loudly on empty adapters, missing or mis-shaped LoRA tensors, or base weights in the file."""
    from safetensors import safe_open

    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file() or f.stat().st_size < 64:
        raise CheckpointError(f"{f}: adapter file missing or empty")
    expected = expected_adapter_shapes(model)
    with safe_open(str(f), "pt") as fh:
        got = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    lora_got = {k.replace("base_model.model.", "", 1): v for k, v in got.items() if ".lora_" in k}
    lora_exp = {k.replace("base_model.model.", "", 1): v for k, v in expected.items()}
    missing = sorted(set(lora_exp) - set(lora_got))
    wrong = sorted(k for k in lora_exp.keys() & lora_got.keys() if lora_exp[k] != lora_got[k])
    extra = sorted(k for k in got if ".lora_" not in k and "modules_to_save" not in k)
    if missing or wrong or extra:
        raise CheckpointError(
            f"{f}: adapter is wrong: missing {missing[:3]}, mis-shaped "
            f"{[(k, lora_got[k], lora_exp[k]) for k in wrong[:3]]}, non-adapter tensors {extra[:3]}"
        )


def save_adapter(backend, tokenizer, final: Path) -> None:
    """Write the adapter (gathered full-shape on every backend) atomically to `final`. All ranks call."""
    tmp = final.with_name(f".tmp-{final.name}")
    sd = backend.adapter_state_dict()  # collective under sharded backends: every rank calls
    if backend.acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            m = backend.unwrap()
            m.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            verify_adapter(tmp, m)
            _publish(tmp, final, {"kind": "adapter"})
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write the adapter to {final}: {exc}; nothing was published") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    backend.barrier()


def save(backend, scheduler, tokenizer, output_dir, state: dict, keep_last: int | None) -> Path:
    """Write a full training checkpoint for `state['step']`. All ranks call."""
    acc = backend.acc
    final = step_dir(output_dir, state["step"])
    tmp = final.with_name(f".tmp-{final.name}")
    sd = backend.adapter_state_dict()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    try:
        # every rank: sharded backends write their own optimizer partition into tmp
        backend.save_optimizer_state(tmp)
        failed = None
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        failed = exc
    hooks.point("save.after_optimizer")
    backend.barrier()
    if acc.is_main_process:
        try:
            if failed is not None:
                raise failed
            (tmp / "adapter").mkdir(parents=True)
            m = backend.unwrap()
            m.save_pretrained(tmp / "adapter", state_dict=sd, safe_serialization=True)
            tokenizer.save_pretrained(tmp / "adapter")
            verify_adapter(tmp / "adapter", m)
            hooks.point("save.after_adapter")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            hooks.point("save.after_scheduler")
            (tmp / STATE).write_text(json.dumps(state, indent=1))
            _publish(tmp, final, {k: state[k] for k in ("step", "examples_seen", "dp_size", "config_hash")})
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            prev = latest(output_dir)
            free = shutil.disk_usage(final.parent).free / 2**20
            raise CheckpointError(
                f"could not write checkpoint {final.name} in {final.parent} ({free:,.0f} MiB free there): {exc}. "
                "Nothing was published and the "
                f"temporary directory is removed; the previous checkpoint ({prev.name if prev else 'none'}) is intact. "
                "If the disk is full, free space, then rerun the same command to resume."
            ) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        rotate(output_dir, keep_last)
    elif failed is not None:
        raise CheckpointError(f"could not write this rank's part of checkpoint {final.name}: {failed}") from failed
    backend.barrier()
    return final


def check_room(output_dir, trainable_params: int, keep_last: int | None, save_every: int) -> str | None:
    """At trainer start: can output_dir hold what this run will write? (None = yes, else the problem.)
    A checkpoint is ~12 bytes per trainable parameter (fp32 adapter + two Adam moments); during a
    save keep_last + 1 of them exist, plus the final adapter (4 bytes per parameter)."""
    out = Path(output_dir)
    probe = out / f".write-probe-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return f"train.output_dir: cannot write to {out} ({exc.strerror or exc}); point it at a writable directory"
    ckpt = 12 * trainable_params + (1 << 20)
    copies = 0 if not save_every else (keep_last + 1 if keep_last else 2)
    need = copies * ckpt + 4 * trainable_params
    free = shutil.disk_usage(out).free
    if free < need:
        return (f"train.output_dir: {free / 2**20:,.0f} MiB free on {out}, this run needs ~{need / 2**20:,.0f} MiB "
                f"({copies} checkpoint(s) of ~{ckpt / 2**20:,.0f} MiB + the adapter); free space, lower "
                "train.keep_last, or use another directory")
    return None


def clean_partial(output_dir) -> list[Path]:
    """Remove what interrupted saves left (main process, before training); returns what it removed."""
    _, partial = complete_checkpoints(output_dir)
    for d in partial:
        shutil.rmtree(d, ignore_errors=True)
    return partial


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


def rotate(output_dir, keep_last: int | None) -> None:
    if keep_last is None:
        return
    done, _ = complete_checkpoints(output_dir)
    best = None
    scored = [(read_state(d).get("eval_loss"), d) for d in done]
    scored = [(loss, d) for loss, d in scored if loss is not None]
    if scored:
        best = min(scored, key=lambda t: t[0])[1]
    for d in done[: max(0, len(done) - keep_last)]:
        if d != best:
            hooks.point("rotate.before_delete")
            _remove(d)


def _remove(d: Path) -> None:
    """Unpublish first (marker gone = not a checkpoint any more), then delete: a crash mid-delete
    leaves a directory that resume ignores, never a half-deleted one that looks complete."""
    (d / MARKER).unlink(missing_ok=True)
    shutil.rmtree(d, ignore_errors=True)


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE).read_text())


def lora_shape(cfg) -> dict:
    """What fixes the adapter tensors' keys and shapes."""
    lo = cfg.lora
    return {"r": lo.r, "target_modules": lo.target_modules, "use_dora": lo.use_dora,
            "modules_to_save": lo.modules_to_save}


def resume_problems(state: dict, ckpt: Path, cfg, global_batch: int, dp: int, reshardable: bool,
                    data_order: dict | None = None) -> list[tuple[str, bool]]:
    """Why `ckpt` cannot be resumed exactly by this run: (message, fixable by train.resume_weights_only)."""
    t = cfg.train
    problems = []
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
    if state["global_batch"] != global_batch:
        problems.append((
            f"train: {ckpt.name} was written with global batch {state['global_batch']} (micro x accumulation x "
            f"processes), this run has {global_batch} = {t.micro_batch_size} x {t.gradient_accumulation_steps} x {dp}; "
            "the data order depends on the global batch. Keep it equal (e.g. raise gradient_accumulation_steps when "
            "using fewer processes), or set train.resume_weights_only=true, or train.resume=never", True))
    if state.get("model", cfg.model.name_or_path) != cfg.model.name_or_path:
        problems.append((f"model.name_or_path: {ckpt.name} trained on '{state['model']}', this run loads "
                         f"'{cfg.model.name_or_path}'; set train.resume_weights_only=true to start from its adapter "
                         "anyway, or train.resume=never", True))
    old_shape = state.get("lora_shape", lora_shape(cfg))
    if old_shape != lora_shape(cfg):
        changed = {k: (old_shape.get(k), v) for k, v in lora_shape(cfg).items() if old_shape.get(k) != v}
        problems.append((f"lora: {ckpt.name} holds an adapter of another shape ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                         "its tensors cannot load into this model: restore those settings, or set train.resume=never", False))
    if state["dp_size"] != dp and not reshardable:
        problems.append((f"train: {ckpt.name} holds optimizer state partitioned over {state['dp_size']} ranks (ZeRO), "
                         f"which cannot be resharded to {dp}; resume on {state['dp_size']} processes, or set "
                         "train.resume_weights_only=true (fresh optimizer)", True))
    return problems


def load_weights_only(backend, ckpt: Path) -> None:
    from safetensors.torch import load_file

    backend.load_adapter_state(load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))


def load(backend, scheduler, ckpt: Path) -> dict:
    """Restore adapter, optimizer and scheduler from `ckpt`; returns the trainer state. All ranks call."""
    load_weights_only(backend, ckpt)
    backend.load_optimizer_state(ckpt)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return read_state(ckpt)
