"""FSDP2 and QLoRA: the GPU-only backends. On CPU (CI): their configs are validated through the
real launcher and config loader, and launching them where they cannot run is refused with a
clear message. On a CUDA machine: opt-in tests (`pytest --gpu`) train with them and compare.

Facts behind this split (shared/reference/cpu-distributed-facts.md): accelerate's FSDP path
refuses CPU ("There are currently no available devices found"); bitsandbytes is not installed
in this project's CPU environment, and its 4-bit kernels are what QLoRA is for.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, base_config, free_port, launch, load_adapter, max_abs_diff, read_metrics, run_inprocess, write_config

FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
PROBE = """
import os
from accelerate.utils import FullyShardedDataParallelPlugin
p = FullyShardedDataParallelPlugin()
print("PROBE", os.environ.get("ACCELERATE_USE_FSDP"), p.fsdp_version, p.reshard_after_forward,
      p.auto_wrap_policy.__name__ if callable(p.auto_wrap_policy) else p.auto_wrap_policy,
      p.activation_checkpointing, os.environ.get("ACCELERATE_MIXED_PRECISION"), os.environ["WORLD_SIZE"])
"""


def test_fsdp2_config_through_the_real_launcher(tmp_path):
    """accelerate launch turns fsdp2.yaml into an FSDP2 plugin: version 2, resharding, a
    transformer-layer wrap policy, no accelerate-side activation checkpointing or precision."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    res = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2), "--num_processes", "2",
         "--main_process_port", str(free_port()), str(probe)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("PROBE")]
    assert res.returncode == 0 and len(lines) == 2, res.stderr[-3000:]
    assert set(lines) == {"PROBE true 2 True transformer_auto_wrap_policy False no 2"}, lines


def test_fsdp_on_cpu_is_refused_clearly(tiny, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "out"))
    res = launch(2, cfg, config_file=FSDP2, check=False, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "FSDP, which accelerate runs on GPUs only" in out, out[-3000:]
    assert "cpu_deepspeed_zero3.yaml" in out and not (tmp_path / "out").exists()


QLORA = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "quant_storage": "bfloat16"}


def _has_bnb() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def test_qlora_config_validation(tiny, tmp_path):
    from distlora import config as C

    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o", model={"dtype": "auto", "quantization": QLORA},
                                                        train={"mixed_precision": "auto"}))
    if _has_bnb():
        assert C.load(path).model.quantization.type == "nf4"
    else:
        with pytest.raises(C.ConfigError) as exc:
            C.load(path)
        assert [p.split(":")[0] for p in exc.value.problems] == ["model.quantization"]
        assert "pip install bitsandbytes" in exc.value.problems[0]
    with pytest.raises(C.ConfigError) as exc:
        C.load(path, ["model.quantization.quant_storage=float16", "model.quantization.bits=8",
                      "model.quantization.type=int4", "model.dtype=float32", "train.mixed_precision=fp16"])
    fields = {p.split(":")[0] for p in exc.value.problems}
    assert {"model.quantization.bits", "model.quantization.type"} <= fields, exc.value.problems
    with pytest.raises(C.ConfigError) as exc:
        C.load(path, ["model.quantization.quant_storage=float16", "model.dtype=float32", "train.mixed_precision=fp16"])
    fields = {p.split(":")[0] for p in exc.value.problems}
    assert {"model.quantization.quant_storage", "model.dtype", "train.mixed_precision"} <= fields, exc.value.problems


def test_qlora_uint8_storage_refused_under_zero3(tiny, tmp_path):
    """uint8-packed 4-bit weights cannot be partitioned: refused before anything is loaded."""
    if not _has_bnb():
        pytest.skip("bitsandbytes is not installed: the config check above refuses first")
    q = {**QLORA, "quant_storage": "uint8"}
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "out", model={"dtype": "auto", "quantization": q},
                                                        train={"mixed_precision": "auto"}))
    res = launch(2, cfg, config_file=ROOT / "configs" / "accelerate" / "cpu_deepspeed_zero3.yaml", check=False)
    assert res.returncode != 0 and "uint8 cannot be sharded" in res.stdout + res.stderr


# ------------------------------------------------------------------------------ GPU (opt in: --gpu)


@pytest.mark.gpu
def test_fsdp2_matches_ddp_on_2_gpus(tiny, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    runs = {}
    for name, conf in (("ddp", None), ("fsdp2", FSDP2)):
        raw = base_config(tiny, tmp_path / name / "out", train={"micro_batch_size": 2, "gradient_accumulation_steps": 2,
                                                                "save_every": 3, "max_steps": 6})
        launch(2, write_config(tmp_path / name / "c.yaml", raw), config_file=conf, env={"OMP_NUM_THREADS": "4"})
        runs[name] = tmp_path / name / "out"
    # fp32 on GPU: reduction order only (TF32 is off for fp32 matmuls by default in torch)
    assert max_abs_diff(load_adapter(runs["ddp"] / "adapter"), load_adapter(runs["fsdp2"] / "adapter")) < 1e-4
    la = [r["loss"] for r in read_metrics(runs["ddp"]) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(runs["fsdp2"]) if "loss" in r]
    assert max(abs(a - b) for a, b in zip(la, lb)) < 1e-4


@pytest.mark.gpu
def test_qlora_trains_and_saves_an_adapter_on_gpu(tiny, tmp_path):
    if not torch.cuda.is_available() or not _has_bnb():
        pytest.skip("needs CUDA and bitsandbytes")
    raw = base_config(tiny, tmp_path / "out", model={"dtype": "auto", "quantization": QLORA},
                      train={"mixed_precision": "bf16", "max_steps": 20, "eval_at_start": True})
    assert run_inprocess(write_config(tmp_path / "c.yaml", raw)) == 0
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "out") if "eval_loss" in r]
    assert evals[-1] < evals[0]
    adapter = load_adapter(tmp_path / "out" / "adapter")
    assert adapter and all(".lora_" in k and v.dtype == torch.float32 for k, v in adapter.items())


@pytest.mark.gpu
def test_qlora_merge_into_dequantized_base(tiny, tmp_path):
    """The merged model reproduces the QLoRA-trained model's logits (4-bit base + adapter) to bf16 precision."""
    if not torch.cuda.is_available() or not _has_bnb():
        pytest.skip("needs CUDA and bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from distlora import config as C
    from distlora.cli import merge

    raw = base_config(tiny, tmp_path / "out", model={"dtype": "auto", "quantization": QLORA},
                      train={"mixed_precision": "bf16", "max_steps": 5})
    path = write_config(tmp_path / "c.yaml", raw)
    assert run_inprocess(path) == 0
    merge(str(tmp_path / "out" / "adapter"), str(tiny / "model"), str(tmp_path / "merged"), quantization=C.load(path).model.quantization)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).cuda()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    q = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.bfloat16, quantization_config=bnb)
    trained = PeftModel.from_pretrained(q, tmp_path / "out" / "adapter")
    x = torch.tensor([[1, 20, 30, 40, 50, 60]], device="cuda")
    with torch.no_grad():
        a, b = merged(x).logits.float(), trained(x).logits.float()
    assert torch.allclose(a, b, atol=5e-2, rtol=2e-2), float((a - b).abs().max())  # bf16 rounding of the merged weights
