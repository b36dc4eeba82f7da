"""Config contract: defaults, overrides, every problem reported at once naming its field, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CPU_DDP, ROOT, base_config, free_port, run_inprocess, write_config
from distlora import config as C


def test_defaults_follow_lora_guidance(tiny, tmp_path):
    cfg = C.load(write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o")))
    fresh = C.RunConfig.model_validate(
        {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "train": {"output_dir": "o"}}
    )
    assert (fresh.train.lr, fresh.lora.r, fresh.lora.alpha, fresh.train.lr_scheduler) == (2e-4, 16, 32, "cosine")
    assert fresh.train.effective_warmup_ratio == 0.03
    assert cfg.model.dtype == "float32"  # the YAML's override wins over the default


def test_every_field_has_a_doc():
    for name, cls in C.SECTIONS.items():
        for field, info in cls.model_fields.items():
            assert info.description, f"{name}.{field} has no one-line doc"


def test_overrides_are_typed_and_dotted(tiny, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o"))
    cfg = C.load(path, ["train.lr=3e-4", "lora.target_modules=[q_proj,v_proj]", "data.eval=0.1", "train.max_steps=null"])
    assert cfg.train.lr == 3e-4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.eval == 0.1 and cfg.train.max_steps is None


# (case name, overrides applied to a valid config, fields the message must name)
BAD = [
    ("unknown key", ["train.lrr=1"], ["train.lrr", "did you mean 'lr'"]),
    ("unknown section", ["optim.lr=1"], ["optim"]),
    ("wrong type", ["train.micro_batch_size=four"], ["train.micro_batch_size"]),
    ("negative lr", ["train.lr=-1e-4"], ["train.lr"]),
    ("both warmups", ["train.warmup_ratio=0.1", "train.warmup_steps=3"], ["train.warmup_steps", "not both"]),
    ("bad precision", ["train.mixed_precision=fp8"], ["train.mixed_precision"]),
    ("bad scheduler", ["train.lr_scheduler=step"], ["train.lr_scheduler"]),
    ("eval fraction", ["data.eval=1.5"], ["data.eval"]),
    ("missing data", ["data.train=/nonexistent/*.jsonl"], ["data.train", "matches no file"]),
    ("missing model", ["model.name_or_path=/nonexistent/model"], ["model.name_or_path"]),
    ("absent target", ["lora.target_modules=[q_proj,qkv_proj]"], ["lora.target_modules", "qkv_proj", "o_proj, q_proj, up_proj"]),
    ("lora rank", ["lora.r=0"], ["lora.r"]),
    ("dropout", ["lora.dropout=1.5"], ["lora.dropout"]),
    ("tracker", ["log.report_to=[mlflow]"], ["log.report_to"]),
    ("malformed override", ["train.lr"], ["train.lr", "dotted.key=value"]),
    ("resume path", ["train.resume=/nonexistent/ckpt"], ["train.resume"]),
    ("negative loss chunk", ["train.loss_chunk_size=-1"], ["train.loss_chunk_size"]),
    ("token budget unpacked", ["train.micro_batch_tokens=128", "train.micro_batch_size=1"],
     ["train.micro_batch_tokens", "needs data.packing: true", "set data.packing=true"]),
    ("token budget too small", ["data.packing=true", "train.micro_batch_tokens=32", "train.micro_batch_size=1"],
     ["train.micro_batch_tokens: 32 is less than data.max_seq_len 64", "at least 64"]),
    ("token budget micro batch", ["data.packing=true", "train.micro_batch_tokens=128"],
     ["train.micro_batch_size: 4 with train.micro_batch_tokens", "train.micro_batch_size=1"]),
    ("truncation side", ["data.truncation_side=middle"], ["data.truncation_side"]),
]


@pytest.mark.parametrize("name,overrides,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_config_exits_2_naming_the_field(tiny, tmp_path, capsys, name, overrides, needles):
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o"))
    assert run_inprocess(path, *overrides) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{name}: {needle!r} not in:\n{err}"
    assert not (tmp_path / "o").exists(), "nothing may be written for a bad config"


def test_all_problems_reported_at_once(tiny, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o"))
    with pytest.raises(C.ConfigError) as exc:
        C.load(path, ["train.lr=-1", "lora.r=0", "model.dtpye=float32", "train.warmup_ratio=0.1",
                      "train.warmup_steps=2", "data.train=/nope.jsonl", "lora.target_modules=[nope]"])
    fields = [p.split(":")[0] for p in exc.value.problems]
    assert sorted(fields) == sorted(
        ["train.lr", "lora.r", "model.dtpye", "train.warmup_steps", "data.train", "lora.target_modules"]
    ), exc.value.problems


def test_token_budget_problems_reported_at_once(tiny, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o"))
    with pytest.raises(C.ConfigError) as exc:
        C.load(path, ["train.micro_batch_tokens=32"])  # unpacked, below max_seq_len 64, micro batch 4
    fields = [p.split(":")[0] for p in exc.value.problems]
    assert sorted(fields) == ["train.micro_batch_size", "train.micro_batch_tokens", "train.micro_batch_tokens"], fields
    cfg = C.load(path, ["data.packing=true", "train.micro_batch_tokens=64", "train.micro_batch_size=1"])
    assert cfg.train.micro_batch_tokens == 64  # a budget equal to max_seq_len is allowed


def test_cli_exit_2_clean_message_no_traceback(tiny, tmp_path):
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o", train={"lr": -1}))
    res = subprocess.run([sys.executable, "-m", "distlora.train", "--config", str(path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert "train.lr" in res.stderr and "Traceback" not in res.stderr


def test_launcher_prints_once_and_workers_exit_2(tiny, tmp_path):
    """Under accelerate launch, rank 0 alone prints; the agent reports the workers' exit code 2."""
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o", train={"lr": -1}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
           "--main_process_port", str(free_port()), "-m", "distlora.train", "--config", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert out.count("the run config has 1 problem(s)") == 1, out[-3000:]
    assert "exitcode  : 2" in out


def test_launcher_precision_conflict_is_refused(tiny, tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch` exports from its config
    assert run_inprocess(path) == 2
    assert "train.mixed_precision" in capsys.readouterr().err


def _yamls(sub: str) -> list[Path]:
    return sorted((ROOT / "configs" / sub).glob("*.yaml"))


@pytest.mark.parametrize("path", _yamls("train"), ids=lambda p: p.name)
def test_shipped_run_configs_load(path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "distlora.train --config configs/train/" + path.name in first, first
    raw = yaml.safe_load(path.read_text())
    # Validate the schema (the data and model it names are built by the command in its header).
    C.RunConfig.model_validate(raw)


@pytest.mark.parametrize("path", _yamls("accelerate"), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file configs/accelerate/" + path.name), first
    conf = load_config_from_file(str(path))
    assert conf.mixed_precision in ("no", None), "the run config owns precision"


# ------------------------------------------------------------------------------ train.loss_impl: liger
# liger-kernel is a GPU-only extra: where it cannot run it is refused as a config problem, before any
# process group or model load. Availability is patched, so these hold on any machine (CI has neither
# the package nor a GPU; a GPU machine may have both).


def _liger_world(monkeypatch, package: bool, cuda: bool):
    import importlib.util

    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if package else None) if name in ("liger_kernel", "triton") else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


def test_liger_default_is_torch(tiny, tmp_path):
    cfg = C.load(write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o")))
    assert cfg.train.loss_impl == "torch" and cfg.train.loss_chunk_size == "auto"


def test_liger_refused_without_the_package_or_a_gpu(tiny, tmp_path, monkeypatch):
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o", train={"loss_impl": "liger"}))
    _liger_world(monkeypatch, package=False, cuda=False)
    with pytest.raises(C.ConfigError) as exc:
        C.load(path, check_device=True)
    package, gpu = exc.value.problems
    assert package.startswith("train.loss_impl: liger needs liger_kernel and triton") and "pip install 'distlora[liger]'" in package
    assert gpu.startswith("train.loss_impl: liger runs on CUDA GPUs only") and "train.loss_impl=torch" in gpu
    # launchers and `distlora plan` may run on a machine without the GPU (a login node): no device check there
    with pytest.raises(C.ConfigError) as exc:
        C.load(path)
    assert [p.split(":")[0] for p in exc.value.problems] == ["train.loss_impl"] and "pip install" in exc.value.problems[0]
    _liger_world(monkeypatch, package=True, cuda=False)
    assert C.load(path).train.loss_impl == "liger"
    with pytest.raises(C.ConfigError, match="CUDA GPUs only"):
        C.load(path, check_device=True)
    _liger_world(monkeypatch, package=True, cuda=True)
    assert C.load(path, check_device=True).train.loss_impl == "liger"


def test_liger_config_problems_reported_at_once(tiny, tmp_path, monkeypatch):
    """A chunk size liger would ignore and LoRA on the output layer (the kernel takes lm_head's weight, not
    its adapter; modules_to_save is fine) are refused with the rest."""
    _liger_world(monkeypatch, package=True, cuda=True)
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o", train={"loss_impl": "liger"}))
    with pytest.raises(C.ConfigError) as exc:
        C.load(path, ["train.loss_chunk_size=16", "lora.target_modules=[q_proj,lm_head]", "train.lr=-1"], check_device=True)
    fields = sorted(p.split(":")[0] for p in exc.value.problems)
    assert fields == ["lora.target_modules", "train.loss_chunk_size", "train.lr"], exc.value.problems
    lm = next(p for p in exc.value.problems if p.startswith("lora.target_modules"))
    assert "output layer 'lm_head'" in lm and "lora.modules_to_save" in lm and "train.loss_impl=torch" in lm
    ok = C.load(path, ["lora.target_modules=[q_proj]", "lora.modules_to_save=[lm_head]"], check_device=True)
    assert ok.lora.modules_to_save == ["lm_head"]
    # the same LoRA targets are fine with the torch loss
    assert C.load(path, ["train.loss_impl=torch", "lora.target_modules=[q_proj,lm_head]"]).lora.target_modules[-1] == "lm_head"


def test_trainer_refuses_liger_before_any_process_group(tiny, tmp_path, monkeypatch, capsys):
    _liger_world(monkeypatch, package=True, cuda=False)
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o", train={"loss_impl": "liger"}))
    assert run_inprocess(path) == 2
    err = capsys.readouterr().err
    assert "train.loss_impl: liger runs on CUDA GPUs only" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cpu_launch_refuses_liger(tiny, tmp_path, monkeypatch):
    from distlora.launch import Shape, preflight

    _liger_world(monkeypatch, package=True, cuda=True)
    cfg = C.load(write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o", train={"loss_impl": "liger"})))
    probs, _ = preflight(cfg, Shape(1, 2, cpu=True), main_port=None)
    assert len(probs) == 1 and probs[0].startswith("train.loss_impl: liger's fused loss runs on CUDA GPUs only"), probs
    assert preflight(cfg.model_copy(update={"train": cfg.train.model_copy(update={"loss_impl": "torch"})}),
                     Shape(1, 2, cpu=True), main_port=None)[0] == []
