"""The one owner of the on-disk layout: adapters, checkpoints, discovery and exact resume.

    output_dir/adapter/                         final adapter (PEFT format) + tokenizer
    output_dir/initial_adapter/                 lora.init pissa/olora: the adapter at init, before step 1 (what
                                                the base was moved by; saved adapters are converted with it)
    output_dir/checkpoints/step-NNNNNNNN/       adapter/, optimizer.pt, scheduler.pt, trainer_state.json,
                                                COMPLETE.json (written last: step, files and sizes)
                                                the optimizer state in full (keyed by parameter name, any
                                                world size resumes it): optimizer-full.pt under FSDP2,
                                                optimizer-zero.pt under DeepSpeed, instead of optimizer.pt

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
from distlora.layout import (  # noqa: F401 - the layout's names, used here and re-exported
    MARKER, STATE, check_room, ckpt_root, complete_checkpoints, is_complete, latest, lora_shape, read_state,
    resume_problems, step_dir)


class CheckpointError(RuntimeError):
    pass


def _fsync_tree(path: Path) -> dict[str, int]:
    """fsync every file; files and directories made readable by the group (safetensors writes 0600)."""
    sizes = {}
    for f in [path, *sorted(path.rglob("*"))]:
        mode = f.stat().st_mode
        os.chmod(f, mode | (0o050 if f.is_dir() else 0o040))
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
    os.chmod(tmp / MARKER, (tmp / MARKER).stat().st_mode | 0o040)
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


def expected_adapter_shapes(model, rank_factor: int = 1) -> dict[str, tuple[int, ...]]:
    """LoRA tensor shapes from each adapted layer's geometry (not from the tensors, which ZeRO-3 partitions);
    `rank_factor`: the saved rank over the trained one (2 for an adapter converted by model.to_plain_lora)."""
    from peft.tuners.lora import LoraLayer

    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in getattr(module, "r", {}):
            r = module.r["default"] * rank_factor
            prefix = name.replace(".default", "")
            shapes[f"{prefix}.lora_A.weight"] = (r, module.in_features)
            shapes[f"{prefix}.lora_B.weight"] = (module.out_features, r)
    return shapes


def verify_adapter(adapter_dir: Path, model, rank_factor: int = 1) -> None:
    """Fail loudly on empty adapters, missing or mis-shaped LoRA tensors, or base weights in the file."""
    from safetensors import safe_open

    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file() or f.stat().st_size < 64:
        raise CheckpointError(f"{f}: adapter file missing or empty")
    expected = expected_adapter_shapes(model, rank_factor)
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


def write_adapter(m, sd: dict, tokenizer, directory: Path, plain: bool = True) -> None:
    """The adapter `sd` (gathered, full-shape) of the PeftModel `m` in PEFT format, checked. `plain`: as a plain
    LoRA of the unmodified base (a PiSSA/OLoRA adapter converted by model.to_plain_lora; others as they are)."""
    from distlora.model import plain_lora_config, to_plain_lora

    sd, factor = to_plain_lora(m, sd) if plain else (sd, 1)
    m.save_pretrained(directory, state_dict=sd, safe_serialization=True)
    plain_lora_config(directory, factor)
    tokenizer.save_pretrained(directory)
    verify_adapter(directory, m, factor)


def save_initial_adapter(backend, tokenizer, output_dir) -> None:
    """lora.init pissa/olora: the adapter before step 1 to output_dir/initial_adapter (what the base was moved
    by: initial adapter + that base = the original model). All ranks call; nothing for other inits."""
    from distlora.model import INITIAL, initial_adapter

    m = backend.unwrap()
    if INITIAL not in m.__dict__:
        return
    if backend.acc.is_main_process:
        final = Path(output_dir) / "initial_adapter"
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write_adapter(m, initial_adapter(m), tokenizer, tmp, plain=False)
            _publish(tmp, final, {"kind": "initial_adapter"})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    backend.barrier()


def save_adapter(backend, tokenizer, final: Path) -> None:
    """Write the adapter (gathered full-shape on every backend) atomically to `final`. All ranks call."""
    tmp = final.with_name(f".tmp-{final.name}")
    sd = backend.adapter_state_dict()  # collective under sharded backends: every rank calls
    if backend.acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write_adapter(backend.unwrap(), sd, tokenizer, tmp)
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
            # plain LoRA of the unmodified base: usable as is; a resume takes its trained half (load_weights_only)
            write_adapter(backend.unwrap(), sd, tokenizer, tmp / "adapter")
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



def clean_partial(output_dir) -> list[Path]:
    """Remove what interrupted saves left (main process, before training); returns what it removed."""
    _, partial = complete_checkpoints(output_dir)
    for d in partial:
        shutil.rmtree(d, ignore_errors=True)
    return partial


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



def load_weights_only(backend, ckpt: Path) -> None:
    from safetensors.torch import load_file

    from distlora.model import from_plain_lora

    sd = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    backend.load_adapter_state(from_plain_lora(backend.unwrap(), sd))


def load(backend, scheduler, ckpt: Path) -> dict:
    """Restore adapter, optimizer and scheduler from `ckpt`; returns the trainer state. All ranks call."""
    load_weights_only(backend, ckpt)
    backend.load_optimizer_state(ckpt)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return read_state(ckpt)
