"""The torch-free layer: the checkpoint layout's one disk formula and one global-batch check (used
by the launcher's preflight and by the trainer alike), and launchers that render without torch.
"""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from conftest import base_config, write_config
from distlora import config as C
from distlora import layout

MIB = 2**20
T = 1_000_000  # trainable parameters: a checkpoint of 12 MB + the overhead

# (case, keep_last, save_every, max_steps, checkpoints counted)
DISK = [
    ("no-checkpoints", 3, 0, 100, 0),
    ("keep-3", 3, 10, 100, 5),  # + the best by eval loss + the one being written
    ("keep-all-known-steps", None, 10, 100, 11),
    ("keep-all-unknown-steps", None, 10, None, layout.UNBOUNDED_KEPT),
]


@pytest.mark.parametrize("keep_last,save_every,max_steps,kept", [c[1:] for c in DISK], ids=[c[0] for c in DISK])
def test_disk_need(keep_last, save_every, max_steps, kept):
    ckpt = layout.checkpoint_bytes(T)
    assert ckpt == 12 * T + layout.CHECKPOINT_OVERHEAD
    assert layout.disk_need(ckpt, keep_last, save_every, max_steps) == (kept * ckpt + ckpt // 3, kept)


@pytest.mark.parametrize("keep_last,save_every,max_steps,kept", [c[1:] for c in DISK], ids=[c[0] for c in DISK])
def test_launcher_and_trainer_agree_on_the_disk_needed(tiny, tmp_path, monkeypatch, keep_last, save_every, max_steps,
                                                        kept):
    """One byte short of layout.disk_need: both the launcher's preflight and the trainer's check_room
    refuse; exactly enough: neither does."""
    from distlora import launch

    out = tmp_path / "o"
    cfg = C.load(write_config(tmp_path / "c.yaml", base_config(tiny, out, train={
        "keep_last": keep_last, "save_every": save_every, "max_steps": max_steps})), check_model=False)
    out.mkdir()
    monkeypatch.setattr(launch, "lora_param_count", lambda cfg: T)
    need, _ = layout.disk_need(layout.checkpoint_bytes(T), keep_last, save_every, max_steps)
    Usage = namedtuple("Usage", "total used free")
    for free, refused in ((need - 1, True), (need, False)):
        monkeypatch.setattr(shutil, "disk_usage", lambda path, free=free: Usage(2 * need, need, free))
        trainer = layout.check_room(out, T, keep_last, save_every, max_steps)
        problems, notes = launch.preflight(cfg, launch.Shape(1, 1, cpu=True), main_port=None)
        launcher = [p for p in problems if p.startswith("disk:")]
        assert (trainer is not None, bool(launcher)) == (refused, refused), (free, need, trainer, problems, notes)
        if refused:
            assert trainer.startswith("train.output_dir:") and f"{kept} checkpoint(s)" in trainer
            assert f"({kept} checkpoints of" in launcher[0] and "fix: free space" in launcher[0]


# (case, global batch written, micro, accumulation, processes, the fix named or None = resumable)
GLOBAL_BATCH = [
    ("equal", 8, 4, 1, 2, None),
    ("fewer-processes", 8, 4, 1, 1, "train.gradient_accumulation_steps=2"),
    ("not-divisible", 8, 3, 1, 1, "raise gradient_accumulation_steps"),
    ("more-accumulation", 4, 2, 4, 1, "train.gradient_accumulation_steps=2"),
    ("two-processes", 16, 4, 1, 2, "train.gradient_accumulation_steps=2"),
]


@pytest.mark.parametrize("written,micro,accum,dp,fix", [c[1:] for c in GLOBAL_BATCH], ids=[c[0] for c in GLOBAL_BATCH])
def test_one_global_batch_check_for_launcher_and_trainer(tiny, tmp_path, written, micro, accum, dp, fix):
    """The launcher's preflight (resume: auto, the newest checkpoint) and the trainer's resume_problems
    report the same line: the global batch, this run's, and the fix."""
    from distlora import launch

    out = tmp_path / "o"
    cfg = C.load(write_config(tmp_path / "c.yaml", base_config(tiny, out, train={
        "micro_batch_size": micro, "gradient_accumulation_steps": accum, "save_every": 0})), check_model=False)
    ckpt = layout.step_dir(out, 3)
    ckpt.mkdir(parents=True)
    state = {"step": 3, "global_batch": written, "dp_size": 2, "model": cfg.model.name_or_path,
             "lora_shape": layout.lora_shape(cfg)}
    (ckpt / layout.STATE).write_text(json.dumps(state))
    (ckpt / layout.MARKER).write_text(json.dumps({"step": 3, "files": {layout.STATE: (ckpt / layout.STATE).stat().st_size}}))
    assert layout.latest(out) == ckpt and layout.read_state(ckpt) == state

    trainer = [msg for msg, _ in layout.resume_problems(state, ckpt, cfg, micro * accum * dp, dp, reshardable=True)]
    problems, _ = launch.preflight(cfg, launch.Shape(1, dp, cpu=True), main_port=None)
    launcher = [p for p in problems if "global batch" in p]
    if fix is None:
        assert trainer == [] and launcher == [], (trainer, launcher)
        return
    assert len(trainer) == 1 and launcher == trainer, (trainer, launcher)
    line = trainer[0]
    assert line.startswith(f"train: {ckpt.name} was written with global batch {written}")
    assert f"this run has {micro * accum * dp} = {micro} x {accum} x {dp}" in line
    assert fix in line and "train.resume=never" in line and "\n" not in line
