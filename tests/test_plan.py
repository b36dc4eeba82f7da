"""`distlora plan`: activation estimates against what autograd really keeps, and the CLI.

The model-state rows are checked against bytes measured per rank on 2 real processes in
tests/test_backends.py. Here the activation rows are checked against the bytes of every tensor
autograd saves for backward (torch.autograd.graph.saved_tensors_hooks, unique storages, parameters
excluded) in one forward + loss of the trainer's own model on CPU, fp32. Measured on this machine
(micro 4, seq 64, tiny Llama): 2,411,892 bytes without and 303,476 with gradient checkpointing;
the plan says 2,504,704 (+3.8%) and 305,152 (+0.6%). Under a token budget (one packed row of 512
tokens, 8 examples of 64, the block-diagonal mask from position ids): 6,710,888 / 609,896 measured
(sdpa), 12,985,960 (eager); the plan says +2.0% / +0.1%, +1.0%. Before the [L, L] term (sdpa's
additive mask, eager's probabilities) the plan said -25% and -61% there. The tolerance, 10%, is far
below what a missing term costs (one missing h per layer is 10%; the MLP's 4 x intermediate is 44%).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, base_config, write_config


def _saved_bytes(cfg) -> int:
    from distlora.model import load_model
    from distlora.loss import token_nll

    model = load_model(cfg, "no")
    model.train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            saved[st._cdata] = st.nbytes()
        return t

    b, s = cfg.train.micro_batch_size, cfg.data.max_seq_len
    g = torch.Generator().manual_seed(0)
    if cfg.train.micro_batch_tokens:  # a token budget: one packed row of examples of max_seq_len tokens, as
        # PackedCollator builds it (position ids restart per example, no attention mask)
        budget = cfg.train.micro_batch_tokens
        ids = torch.randint(10, 90, (1, budget), generator=g)
        inputs = {"position_ids": torch.arange(s).repeat(budget // s).unsqueeze(0)}
    else:
        ids = torch.randint(10, 90, (b, s), generator=g)
        mask = torch.ones_like(ids)
        mask[0, s * 5 // 8:] = 0  # a padded row, as in every variable-length training batch (an all-ones
        # mask lets attention take its mask-free path, which keeps 131,072 bytes less per layer here)
        inputs = {"attention_mask": mask}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, **inputs, use_cache=False)
        token_nll(out.logits, ids)
    return sum(saved.values())


CASES = [  # (id, attention, token budget, gradient checkpointing)
    ("padded", None, None, False),
    ("padded-checkpointing", None, None, True),
    ("budget", "sdpa", 512, False),
    ("budget-checkpointing", "sdpa", 512, True),
    ("budget-eager", "eager", 512, False),
]


@pytest.mark.parametrize("attn,budget,gc", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_activation_estimate_matches_saved_tensors(tiny, tmp_path, attn, budget, gc):
    from distlora import config as C
    from distlora.plan import estimate

    train = {"micro_batch_size": 1, "micro_batch_tokens": budget} if budget else {"micro_batch_size": 4}
    raw = base_config(tiny, tmp_path / "o", model={"gradient_checkpointing": gc, "attn_implementation": attn},
                      data={"packing": bool(budget)}, train=train)
    cfg = C.load(write_config(tmp_path / "c.yaml", raw))
    measured = _saved_bytes(cfg)
    plan = estimate(cfg, gpus=1, backend="ddp", loss_chunk=0)  # token_nll below: the plain loss
    p = plan.rows
    (b, s), vocab = (1, budget) if budget else (4, cfg.data.max_seq_len), 103
    assert (plan.micro_batch_size, plan.seq_len) == (b, s)
    # of the plan's three fp32 logits tensors only the log-softmax is saved for backward: the model's
    # output and cross-entropy's flattened copy of it are live at the loss but not saved
    transient_logits = 2 * b * s * vocab * 4
    planned = (p["activations_checkpointed"] if gc else p["activations"]) + p["logits"] - transient_logits
    print(f"attn={attn} budget={budget} gc={gc}: measured {measured:,} planned {planned:,}")
    assert planned == pytest.approx(measured, rel=0.10)


def test_plan_cli(tiny, tmp_path, capsys):
    from distlora.cli import main

    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o"))
    # the installed entry point once, as a user runs it; the other cases in-process
    res = subprocess.run([sys.executable, "-m", "distlora", "plan", "--config", str(path), "--gpus", "2", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = {r["backend"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {"ddp", "zero2", "zero3", "fsdp2"}
    # sharding claims, in order: ZeRO-3 and FSDP2 halve the base; ZeRO-2 only the optimizer state
    assert rows["zero3"]["frozen_base"] * 2 == pytest.approx(rows["ddp"]["frozen_base"], rel=1e-3)
    assert rows["zero2"]["frozen_base"] == rows["ddp"]["frozen_base"]
    assert rows["zero2"]["optimizer_state"] * 2 == rows["ddp"]["optimizer_state"]
    assert rows["ddp"]["model_state"] > rows["zero2"]["model_state"] > rows["zero3"]["model_state"]
    assert main(["plan", "--config", str(path), "--gpus", "8", "--backend", "zero3"]) == 0
    out = capsys.readouterr().out
    assert "zero3 on 8 GPU(s)" in out and "frozen_base" in out and "total, gradient checkpointing on" in out
    # a token budget: the plan's shape is one packed row of the budget
    assert main(["plan", "--config", str(path), "--gpus", "1", "--backend", "ddp", "data.packing=true",
                 "train.micro_batch_size=1", "train.micro_batch_tokens=256"]) == 0
    out = capsys.readouterr().out
    assert "micro batch 1 x seq 256" in out and "one packed row of up to 256 tokens" in out, out
    assert main(["plan", "--config", str(path), "--gpus", "2", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err


# ------------------------------------------------------------------------------ one LoRA config, one count
# (case, run-config lora section, PEFT LoraConfig attributes it must set)
LORA = [
    ("defaults", {}, {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "use_rslora": False, "use_dora": False}),
    ("dropout-rslora", {"dropout": 0.1, "use_rslora": True}, {"lora_dropout": 0.1, "use_rslora": True}),
    ("targets", {"target_modules": ["q_proj", "v_proj"], "r": 2, "alpha": 3},
     {"target_modules": {"q_proj", "v_proj"}, "r": 2, "lora_alpha": 3}),
    ("dora", {"use_dora": True}, {"use_dora": True}),
    ("modules-to-save", {"modules_to_save": ["lm_head"], "target_modules": ["o_proj"]},
     {"modules_to_save": ["lm_head"], "target_modules": {"o_proj"}}),
]


@pytest.mark.parametrize("lora,expected", [c[1:] for c in LORA], ids=[c[0] for c in LORA])
def test_one_lora_config_and_one_parameter_count(tiny, tmp_path, lora, expected):
    """model.lora_config carries every lora.* field; the plan's and the launcher's counts (PEFT on
    the meta device) equal the trainer's real model's trainable parameters."""
    from distlora import config as C
    from distlora import launch
    from distlora.model import load_model, lora_config, param_counts
    from distlora.plan import model_shape

    raw = base_config(tiny, tmp_path / "o")
    raw["lora"] = lora
    cfg = C.load(write_config(tmp_path / "c.yaml", raw))
    lc = lora_config(cfg)
    assert {k: getattr(lc, k) for k in expected} == expected
    assert (lc.bias, lc.task_type) == ("none", "CAUSAL_LM")
    real = param_counts(load_model(cfg, "no"))["trainable_params"]
    assert model_shape(cfg).trainable == launch.lora_param_count(cfg) == real


def test_one_quantization_config(tiny, tmp_path):
    """The trainer's and `distlora merge`'s bitsandbytes config, from model.quantization."""
    from distlora import config as C
    from distlora.model import quantization_config

    q = C.QuantizationConfig(type="fp4", double_quant=False, compute_dtype="float16", quant_storage="float16")
    bnb = quantization_config(q)
    assert (bnb.load_in_4bit, bnb.bnb_4bit_quant_type, bnb.bnb_4bit_use_double_quant) == (True, "fp4", False)
    assert (bnb.bnb_4bit_compute_dtype, bnb.bnb_4bit_quant_storage) == (torch.float16, torch.float16)
