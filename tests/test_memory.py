"""Memory, measured honestly (issue 11, point 2): what each backend really holds per rank.

Each backend trains a >= 50 MB fp32 Llama (LoRA r=4, 2 steps, eval, a checkpoint save) on 2 processes
with the live-memory hook (tests/hooks: DISTLORA_TEST_LIVE_MEMORY). Per rank, after prepare, training,
eval and save:
- live tensor bytes (unique storages of every live tensor, a DTensor as its local shard): FSDP2 and
  ZeRO-3 hold at most 1/2 of the base + 5% of it, DDP the base and at most 5% more;
- RssAnon growth since before the model loaded, minus the same run's growth with the 0.35 MB tiny
  model (imports, the engines, gloo: 137-155 MB, base-independent): what the base's size costs in
  anonymous memory. Sharded < 0.75 x base (a shard is 0.5; any full copy of the base makes it >= 1.0),
  DDP < 1.5 x base (one copy is 1.0; a second makes it >= 2.0).

The test fails when a backend keeps a second copy. Measured by monkeypatching FSDP2.prepare (a one-off,
not committed) to keep `list(model.parameters())` taken before fully_shard, the bug issue 11 describes:
live tensors 1.513 x base after prepare and 1.522 after train/eval/save on both ranks (bound 0.55),
base-dependent RssAnon 1.524-1.555 x base (bound 0.75); the largest live storages named then are the
unsharded originals ([8192, 384] x 2, [384, 1024], ... fp32, backing no module parameter) next to
the [4096, 384] shards.

110-170 s for the six launches on 2 shared cores (measured twice) (three backends, each with its tiny-model twin): slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, base_config, launch, write_config

pytestmark = pytest.mark.slow

ZERO3 = ROOT / "configs" / "accelerate" / "cpu_deepspeed_zero3.yaml"
WHERE = ("after_prepare", "after_train", "after_eval", "after_save")
MB = 1e6


def build_big(d: Path, tiny: Path) -> Path:
    """A random Llama of >= 50 MB fp32 (untied embeddings) with the tiny character tokenizer (the model's
    vocab exceeds the tokenizer's: the ids above it are never used)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=6, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert nbytes >= 50 * MB, nbytes
    model.save_pretrained(d, safe_serialization=True)
    for f in (tiny / "model").iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def big(tiny, tmp_path_factory) -> Path:
    return build_big(tmp_path_factory.mktemp("big") / "model", tiny)


def run_backend(name: str, model: Path, tiny: Path, tmp: Path) -> list[dict]:
    out = tmp / f"{name}-{model.parent.name}"
    cfg = base_config(tiny, out, model={"name_or_path": str(model), "dtype": "float32"},
                      lora={"r": 4, "alpha": 8, "dropout": 0.0},
                      train={"max_steps": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
                             "save_every": 2})
    path = write_config(out.with_suffix(".yaml"), cfg)
    overrides = ["train.backend=fsdp2"] if name == "fsdp2" else []
    launch(2, path, *overrides, env={"DISTLORA_TEST_LIVE_MEMORY": "1"},
           config_file=ZERO3 if name == "zero3" else None, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == name
    return summary["memory_per_rank"]


# Bounds, as fractions of the frozen base's fp32 bytes (53.49 MB). Measured on 2 CPU ranks (torch 2.13,
# deepspeed 0.19.8), live/base at the four points: DDP 1.009-1.035, ZeRO-3 0.524-0.533, FSDP2
# 0.504-0.513; the rest over the base or its half is LoRA (0.47 MB), its gradients, Adam moments
# (0.035 of the base under DDP) and small buffers. Base-dependent RssAnon (this run minus the tiny
# run): DDP 1.021-1.049 (the base is anonymous memory after DDP's wrap), ZeRO-3 0.596-0.622, FSDP2
# 0.518-0.560. See the printed table (-s).
LIVE = {"ddp": (1.0, 1.05), "zero3": (0.0, 0.55), "fsdp2": (0.0, 0.55)}  # issue 11: 1/N (+ < 5%); DDP: one copy
RSS = {"ddp": 1.5, "zero3": 0.75, "fsdp2": 0.75}  # one copy = 1.0 (DDP) / a shard = 0.5; a second full copy >= +1.0


@pytest.mark.parametrize("name", ["ddp", "zero3", "fsdp2"])
def test_live_memory(name, big, tiny, tmp_path):
    per_rank = run_backend(name, big, tiny, tmp_path)
    fixed = run_backend(name, tiny / "model", tiny, tmp_path)  # the same run on a 0.35 MB base
    base = per_rank[0]["after_prepare"]["frozen_total"]
    lo, hi = LIVE[name]
    print(f"\n{name}: base {base / MB:.2f} MB; RSS = RssAnon growth since before_model; "
          "base RSS = that minus the tiny-model run's")
    print(f"{'rank':>4} {'where':<14} {'live MB':>8} {'/base':>6} {'RSS MB':>7} {'tiny MB':>7} {'base RSS':>8} {'/base':>6}")
    failures = []
    for r, mem in enumerate(per_rank):
        for w in WHERE:
            live, small = mem[f"live_{w}"], fixed[r][f"live_{w}"]
            lb, rss = live["live_tensor_bytes"], live["rss_anon_delta"]
            extra = rss - small["rss_anon_delta"]
            print(f"{r:>4} {w:<14} {lb / MB:8.2f} {lb / base:6.3f} {rss / MB:7.1f} {small['rss_anon_delta'] / MB:7.1f} "
                  f"{extra / MB:8.1f} {extra / base:6.3f}")
            largest = [(x["bytes"], x["shape"], x["dtype"], x["param"]) for x in live["largest"][:4]]
            if not lo * base <= lb <= hi * base:
                failures.append(f"rank {r} {w}: live tensors {lb / base:.3f} x base, not in [{lo}, {hi}]; "
                                f"largest storages: {largest}")
            if extra >= RSS[name] * base:
                failures.append(f"rank {r} {w}: base-dependent RssAnon {extra / base:.3f} x base >= {RSS[name]}; "
                                f"largest live storages: {largest}")
    assert not failures, f"{name}:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------ the plan against a step's peak RSS
STEP_PROBE = """import json, sys
import torch, transformers, peft, accelerate  # noqa: F401  what every run imports before its model
import distlora.train, distlora.loop, distlora.model, distlora.data, distlora.datacache, distlora.backends  # noqa: F401
from distlora import hooks

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

seen = {"baseline": status("VmRSS")}

def step(step, **_):
    if step != 1:  # the second step: the first one's transients (pages of the mapped base touched for the
        return     # first time, lazily built kernels and buffers) are not what the plan describes
    seen["before_step"] = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM: from here on it is the step's peak

def done(step, **_):
    if step == 2:
        seen["peak"] = status("VmHWM")

hooks.add("step", step)
hooks.add("window_done", done)
seen["rc"] = distlora.train.main(["--config", sys.argv[2]])
json.dump(seen, open(sys.argv[1], "w"))
"""


def test_plan_matches_peak_rss_of_a_training_step(tiny, tmp_path):
    """A 271M-parameter fp32 Llama (vocab 32,000), one packed row of 512 tokens, the trainer's second optimizer
    step on CPU: its peak RSS (VmHWM reset at the step's start) minus the RSS right after the imports, against
    the plan's total for the settings the trainer resolved (CPU: no checkpointing, the plain loss). The frozen
    base is memory-mapped from safetensors: file-backed pages count in RSS as they would in device memory.
    glibc returns every freed block of 64 KiB or more at once (MALLOC_MMAP_THRESHOLD_), so RSS follows live
    memory as a GPU's max_memory_allocated does; with its default, adaptive threshold the memory a first step
    frees stays in the heap and the second step's RSS held 2,431 MiB before it started. The second step: the
    first one's transients (the mapped base paged in, lazily built buffers) are not what the plan describes.
    Measured on this machine: 1,896 MiB (1,121 before the step); the plan says 1,873, -1.2%. About 30 s."""
    import subprocess
    import sys

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distlora import config as C
    from distlora.plan import MIB, estimate, resolve_memory

    conf = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(conf).save_pretrained(model_dir, safe_serialization=True)
    for f in (tiny / "model").iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, model_dir / f.name)
    raw = base_config(tiny, tmp_path / "out", model={"name_or_path": str(model_dir), "dtype": "float32"},
                      lora={"r": 8, "alpha": 16, "dropout": 0.0},
                      data={"eval": None, "packing": True},
                      train={"micro_batch_size": 1, "micro_batch_tokens": 512, "max_steps": 2, "save_every": 0,
                             "mixed_precision": "no"})
    path = write_config(tmp_path / "c.yaml", raw)
    res = subprocess.run([sys.executable, "-c", STEP_PROBE, str(tmp_path / "r.json"), str(path)], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["rc"] == 0, r
    measured, before = r["peak"] - r["baseline"], r["before_step"] - r["baseline"]
    cfg = C.load(path)
    mem = resolve_memory(cfg, on_gpu=False)  # what the trainer ran with
    assert (mem.gradient_checkpointing, mem.loss_chunk_size) == (False, 0)
    plan = estimate(cfg, 1, "ddp", gpu_bf16=False, loss_chunk=mem.loss_chunk_size)
    planned = plan.total(mem.gradient_checkpointing)
    print(f"\nstep peak RSS over the post-import baseline {measured / MIB:,.0f} MiB ({before / MIB:,.0f} before the "
          f"step); plan {planned / MIB:,.0f} MiB ({planned / measured - 1:+.1%}): " +
          ", ".join(f"{k} {v / MIB:,.1f}" for k, v in plan.rows.items()))
    assert planned == pytest.approx(measured, rel=0.10)  # the bound for CPU shapes up to ~1B parameters
