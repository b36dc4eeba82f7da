"""bf16 the same on every backend: the frozen base in bf16, compute under autocast, and the adapter's
weights, their gradient reduction, master weights, optimizer state and the saved adapter in fp32.

Adapters after a few Adam steps cannot tell an fp32 from a bf16 gradient reduction (autocast rounding
amplified by Adam: 7.1e-3 vs 7.4e-3 from DDP after 4 steps, shared/reference/cpu-distributed-facts.md).
The first step's reduced gradients can, and the production path exposes them without any probe: one
AdamW step with weight decay 0, no clipping, eps = 1e6 and lr = 1e9 moves each weight by
lr * g / (|g| + eps) = 1e3 * g * (1 + O(|g| / eps)), and lora_B starts at 0, so the saved lora_B is
-1e3 x the reduced gradient (lora_A's first gradient is 0 while B = 0). Measured while building this
(2-layer Llama, 2 ranks, bf16 base): the trick recovers the directly read gradient (DeepSpeed's
safe_get_full_grad, FSDP2's DTensor grads) within 6e-8 relative on every backend; fp32 reductions equal
DDP's exactly (0.0), a bf16 reduction is 1.9e-3 away. So 1e-5 relative separates them with room on
both sides.
"""

from __future__ import annotations

import json

import pytest


from conftest import ROOT, base_config, launch, load_adapter, read_metrics, write_config

ACC = ROOT / "configs" / "accelerate"
LAUNCH = {  # backend -> (accelerate config, run-config overrides)
    "ddp": (None, ()),
    "zero2": (ACC / "cpu_deepspeed_zero2.yaml", ()),
    "zero3": (ACC / "cpu_deepspeed_zero3.yaml", ()),
    "fsdp2": (None, ("train.backend=fsdp2",)),
}
TRICK = 1e9 / 1e6  # lr / eps: the update per unit of gradient


def _run(tiny, small_data, tmp_path_factory, backend: str, env: dict | None = None) -> dict:
    name = backend + ("-bf16reduce" if env else "")
    tmp = tmp_path_factory.mktemp(name)
    raw = base_config(tiny, tmp / "out", lora={"r": 4, "alpha": 8, "dropout": 0.0}, model={"dtype": "auto"})
    raw["data"]["train"] = str(small_data)
    raw["data"]["eval"] = None
    raw["train"].update(micro_batch_size=2, gradient_accumulation_steps=2, max_steps=1, save_every=0,
                        mixed_precision="bf16", lr=1e9, adam_eps=1e6, weight_decay=0.0, max_grad_norm=None,
                        warmup_steps=0, lr_scheduler="constant")
    config_file, overrides = LAUNCH[backend]
    launch(2, write_config(tmp / "c.yaml", raw), *overrides, config_file=config_file, timeout=600,
           env={"DISTLORA_TEST_COMM": "1", **(env or {})})
    out = tmp / "out"
    grads = {k: -v / TRICK for k, v in load_adapter(out / "adapter").items() if "lora_B" in k}
    summary = json.loads((out / "summary.json").read_text())
    return {"grads": grads, "summary": summary, "loss": [r["loss"] for r in read_metrics(out) if "loss" in r][0],
            "out": out}


@pytest.fixture(scope="module")
def runs(tiny, small_data, tmp_path_factory) -> dict:
    return {b: _run(tiny, small_data, tmp_path_factory, b) for b in LAUNCH}


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)


@pytest.mark.parametrize("backend", ["zero2", "zero3", "fsdp2"])
def test_first_step_reduced_gradients_equal_ddp_under_bf16(backend, runs):
    ref, got = runs["ddp"], runs[backend]
    assert all(float(g.norm()) > 0 for g in ref["grads"].values())  # every lora_B got a gradient
    rel = _rel(got["grads"], ref["grads"])
    print(f"{backend} vs DDP, bf16, first-step reduced lora_B gradients: max relative {rel:.2e}")
    assert rel < 1e-5
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-3)  # a sanity check only (autocast forward)


@pytest.mark.parametrize("backend", list(LAUNCH))
def test_precision_of_every_piece_under_bf16(backend, runs):
    """The dtypes each backend really uses (read by the test hook from the live objects after training,
    and from the collectives that moved data during the step): gradient reductions in fp32, base in
    bf16, adapter, master weights and optimizer state in fp32, the saved adapter in fp32."""
    from safetensors import safe_open

    for rank in runs[backend]["summary"]["memory_per_rank"]:
        d = rank["dtypes"]
        assert d["base"] == ["torch.bfloat16"], d
        assert d["adapter"] == ["torch.float32"], d
        assert d["optimizer_state"] == ["torch.float32"], d
        assert d["master_weights"] in ([], ["torch.float32"]), d  # ZeRO's fp32 partitions; elsewhere the params
        reductions = sum((v for k, v in d["collectives"].items() if "reduce" in k), [])  # gradients, grad norm
        assert "torch.float32" in reductions and "torch.bfloat16" not in reductions, d["collectives"]
    with safe_open(str(runs[backend]["out"] / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F32"}


def test_a_bf16_gradient_reduction_is_caught(tiny, small_data, tmp_path_factory, runs):
    """The same FSDP2 run with its reduce-scatter in bf16 (accelerate's default FSDP2 policy) fails the
    comparison above: measured 1.9e-3 relative on the research model."""
    bad = _run(tiny, small_data, tmp_path_factory, "fsdp2", env={"DISTLORA_TEST_BF16_REDUCE": "1"})
    rel = _rel(bad["grads"], runs["ddp"]["grads"])
    print(f"fsdp2 with a bf16 reduce-scatter vs DDP: {rel:.2e}")
    assert rel > 1e-4
    reductions = bad["summary"]["memory_per_rank"][0]["dtypes"]["collectives"]
    assert "torch.bfloat16" in sum((v for k, v in reductions.items() if "reduce" in k), [])
