"""Observability: trackers read back for real, one tracker run per job, offline without prompts,
the MFU FLOP formula against torch's FlopCounterMode, and the plots."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, base_config, launch, read_metrics, run_inprocess, write_config

WANDB = Path(sys.executable).parent / "wandb"


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No API key, no ~/.netrc, no wandb settings: the state of a fresh CI machine."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    return home


def _wandb_records(run_dir: Path) -> list[dict]:
    res = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _wandb_history(run_dir: Path) -> list[dict]:
    return [r["history"]["item"] for r in _wandb_records(run_dir) if r.get("type") == "history"]


def _tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the run's scalars live in the shallowest events dir (add_hparams writes a sub-directory of its own)
    events = min({p.parent for p in logdir.rglob("events.out.tfevents.*")}, key=lambda p: len(p.parts))
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_wandb_offline_and_tensorboard_equal_jsonl(tiny, tmp_path, no_credentials, capsys, monkeypatch):
    for var, value in (("WANDB_PROJECT", "proj-from-env"), ("WANDB_ENTITY", "team"), ("WANDB_RUN_GROUP", "sweep-7")):
        monkeypatch.setenv(var, value)
    raw = base_config(tiny, tmp_path / "out", log={"report_to": ["wandb", "tensorboard"], "tags": ["ci"]},
                      train={"max_steps": 4, "eval_every": 2})
    assert run_inprocess(write_config(tmp_path / "c.yaml", raw)) == 0
    out = tmp_path / "out"
    assert capsys.readouterr().out.count("distlora: no wandb credentials: logging offline") == 1
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert len(train_rows) == 4 and [r["step"] for r in eval_rows] == [2, 4]

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (run,) = [r["run"] for r in _wandb_records(run_dir) if r.get("type") == "run"]
    assert (run["project"], run["entity"], run["run_group"], run["tags"]) == ("proj-from-env", "team", "sweep-7", ["ci"])
    assert run["run_id"] == (out / "tracker_run_id").read_text().strip()
    history = _wandb_history(run_dir)
    by_step: dict[int, dict] = {}
    for h in history:
        by_step.setdefault(h["_step"], {}).update(h)
    for r in rows:  # every logged value, exactly (wandb stores the float64 we logged)
        for key, value in r.items():
            if key != "step" and value is not None:
                assert by_step[r["step"]][key] == value, (r["step"], key)

    tb = _tb_scalars(out / "tensorboard")
    assert [s for s, _ in tb["loss"]] == [r["step"] for r in train_rows]
    # tensorboard stores float32
    assert [v for _, v in tb["loss"]] == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)
    assert [v for _, v in tb["eval_loss"]] == pytest.approx([r["eval_loss"] for r in eval_rows], rel=1e-6)
    assert [v for _, v in tb["lr"]] == pytest.approx([r["lr"] for r in train_rows], rel=1e-6, abs=1e-12)

    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["trainable_params"] > 0 and info["versions"]["torch"]


@pytest.mark.slow  # ~30-50 s: keeps `make test` near 15 minutes
def test_resume_reuses_the_stored_run_id(tiny, tmp_path, no_credentials):
    """A leg killed at step 3 and its relaunch log into ONE wandb run (the id in output_dir)."""
    raw = base_config(tiny, tmp_path / "out", log={"report_to": ["wandb"]}, train={"max_steps": 4, "save_every": 2})
    cfg = write_config(tmp_path / "c.yaml", raw)
    res = launch(1, cfg, env={"DISTLORA_FAULT": "rank0:step3:raise", "HOME": str(no_credentials)}, check=False)
    assert res.returncode != 0
    out = tmp_path / "out"
    run_id = (out / "tracker_run_id").read_text().strip()
    launch(1, cfg, env={"HOME": str(no_credentials)})
    dirs = sorted((out / "wandb").glob("offline-run-*"))
    # offline, wandb writes a new directory per leg, but under the same run id
    assert len(dirs) == 2 and all(d.name.endswith("-" + run_id) for d in dirs)
    steps = [h["_step"] for d in dirs for h in _wandb_history(d) if "loss" in h]
    assert steps == [1, 2, 3, 3, 4]  # leg 1 got to step 3 before dying; leg 2 replays 3 from the checkpoint
    # metrics.jsonl keeps one row per step: the killed leg's step 3 was dropped on resume
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]


def test_no_credentials_no_network_two_processes_never_wait(tiny, tmp_path, no_credentials):
    raw = base_config(tiny, tmp_path / "out", log={"report_to": ["wandb"]}, train={"max_steps": 2})
    cfg = write_config(tmp_path / "c.yaml", raw)
    res = launch(2, cfg, env={"HOME": str(no_credentials), "WANDB_BASE_URL": "http://127.0.0.1:9"}, timeout=240)
    out = res.stdout + res.stderr
    assert out.count("distlora: no wandb credentials: logging offline") == 1
    assert len(list((tmp_path / "out" / "wandb").glob("offline-run-*"))) == 1  # rank 0 only


@pytest.mark.parametrize("lengths", [[17, 17, 17], [5, 23, 11]], ids=["equal", "padded"])
def test_flop_formula_matches_flop_counter(tiny, lengths):
    """Forward + backward of a real LoRA model, counted by FlopCounterMode (eager attention: plain
    matmuls), against distlora.flops on the shapes computed (rows padded to the longest)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from distlora.flops import flop_model

    base = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    width = max(lengths)
    x = torch.randint(10, 90, (len(lengths), width))
    mask = torch.zeros_like(x)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(input_ids=x, attention_mask=mask, use_cache=False)
        out.logits.float().sum().backward()
    measured = counter.get_total_flops()
    fm = flop_model(model)
    predicted = fm.step(len(lengths) * width, [width] * len(lengths))
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)
    # and the useful-work count MFU reports is smaller exactly when rows are padded
    assert fm.step(sum(lengths), lengths) <= predicted


def test_flop_formula_matches_flop_counter_packed(tiny):
    """A packed batch (position ids restarting per example, no attention mask): the linear layers
    are counted per token as in the padded case; the kernels still multiply full row x row attention
    matrices (the block-diagonal mask skips no work on CPU), which the formula gives with row spans.
    MFU counts attention per example instead, the work a varlen kernel does."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from distlora.data import PackedCollator
    from distlora.flops import flop_model
    from distlora.loss import model_inputs

    base = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    rows = [[{"input_ids": torch.randint(10, 90, (n,), generator=g).tolist(), "labels": [-100] * n, "id": i}
             for i, n in enumerate(lengths)] for lengths in ([9, 20, 4], [30])]
    batch = PackedCollator(0)(rows)
    width = batch["input_ids"].shape[1]
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(**model_inputs(batch), use_cache=False)
        out.logits.float().sum().backward()
    measured = counter.get_total_flops()
    fm = flop_model(model)
    hardware = fm.step(2 * width, [width, width])
    assert abs(hardware - measured) / measured < 0.05, (hardware, measured)
    per_example = fm.step(9 + 20 + 4 + 30, [9, 20, 4, 30])
    assert per_example < hardware


def test_plots_are_real_images_of_the_series(tiny, tmp_path):
    raw = base_config(tiny, tmp_path / "out", train={"max_steps": 6, "eval_every": 3})
    assert run_inprocess(write_config(tmp_path / "c.yaml", raw)) == 0
    res = subprocess.run([sys.executable, "-m", "distlora", "plot", str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    from distlora.plot import plot

    drawn = plot(tmp_path / "out", tmp_path / "plots")
    rows = read_metrics(tmp_path / "out")
    train = [r for r in rows if "loss" in r]
    assert drawn["loss.png"]["train loss"] == ([r["step"] for r in train], [r["loss"] for r in train])
    assert drawn["loss.png"]["eval loss"][1] == [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert drawn["lr.png"]["lr"][1] == [r["lr"] for r in train]
    assert drawn["tokens_per_s.png"]["tokens/s"][1] == [r["tokens_per_s"] for r in train]
    for name in drawn:
        for path in (tmp_path / "plots" / name, tmp_path / "out" / "plots" / name):
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            w, h = struct.unpack(">II", data[16:24])
            assert (w, h) == (700, 400) and len(data) > 10_000  # a drawn chart, not a blank canvas


def test_summary_and_metrics_fields(tiny, tmp_path, capsys):
    raw = base_config(tiny, tmp_path / "out", train={"max_steps": 3, "peak_tflops": 1.0})
    assert run_inprocess(write_config(tmp_path / "c.yaml", raw)) == 0
    out = capsys.readouterr().out
    assert "distlora: run summary" in out and "MFU" in out
    rows = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    for r in rows:
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.0)
        assert r["tokens_per_s"] == pytest.approx(r["input_tokens"] / r["step_time_s"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["total_input_tokens"] == sum(r["input_tokens"] for r in rows)
    assert summary["final_train_loss"] == rows[-1]["loss"]
