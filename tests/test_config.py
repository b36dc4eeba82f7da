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
