"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 real CPU processes (accelerate launch, gloo, DeepSpeed's CPU
accelerator), proven by comparison with the DDP run of the same config.

Tolerances: fp32, dropout 0, same seed and data. DDP and ZeRO differ only in how gradients are
reduced (all-reduce vs reduce-scatter of flat buffers) and where Adam runs (full vs partitioned
flat tensors): summation order, ~1e-8 (shared/reference/cpu-distributed-facts.md: ZeRO-2 was
bitwise equal to DDP, ZeRO-3 within 4.5e-8; measured here 2026-12-01: ZeRO-2 5.4e-8, ZeRO-3 3.5e-8).
The adapter bound is the README's 1e-7; losses and
grad norms keep 1e-5. Both fail loudly for a loss-scaling bug: a missing or doubled 1/accum or
1/world changes the first update by a factor of 2 (the adapter moves by > 1e-2 in these runs).

The first DeepSpeed launch on a machine compiles deepspeed_shm_comm (~27 s); the runs are shared
between tests through module-scoped fixtures to keep the number of launches small.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import N_SMALL, ROOT, base_config, launch, load_adapter, max_abs_diff, read_metrics, write_config

ACC = ROOT / "configs" / "accelerate"
ZERO2 = ACC / "cpu_deepspeed_zero2.yaml"
ZERO3 = ACC / "cpu_deepspeed_zero3.yaml"
N_TRAIN = N_SMALL
STEPS, SAVE = 6, 3


def _cfg(tiny, tmp: Path, small_data, name: str, **train) -> Path:
    raw = base_config(tiny, tmp / name / "out", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    raw["data"]["train"] = str(small_data)
    raw["train"].update(
        {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": STEPS, "save_every": SAVE,
         "keep_last": None, "log_every": 1, **train}
    )
    return write_config(tmp / name / "c.yaml", raw)


def _run(tiny, small_data, tmp_path_factory, name, config_file, *overrides, probed=False, **train) -> Path:
    """A 2-process run on the production path; `probed`: a separate, shorter run with the measuring
    test hooks (tests/hooks): each step's gradient memory (summary.json memory_per_rank[r]["gradients"])
    and the bytes the collectives move per step (comm-rank<R>.jsonl). The comparisons between backends
    use only unprobed runs, so they prove the code users run, not the instrumented one."""
    tmp = tmp_path_factory.mktemp(name)
    env = {"DISTLORA_TEST_GRAD_BYTES": "1", "DISTLORA_TEST_COMM": "1"} if probed else None
    if probed:
        train = {"max_steps": PROBED_STEPS, "save_every": 0, **train}
    launch(2, _cfg(tiny, tmp, small_data, name, **train), *overrides, config_file=config_file, timeout=600, env=env)
    return tmp / name / "out"


PROBED_STEPS = 2
PROBED = {"ddp": (None, ()), "zero2": (ZERO2, ()), "zero3": (ZERO3, ()), "fsdp2": (None, ("train.backend=fsdp2",))}


@pytest.fixture(scope="module")
def probed(tiny, small_data, tmp_path_factory) -> dict:
    """backend -> its probed run (made on first use)."""
    runs: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in runs:
            conf, overrides = PROBED[backend]
            runs[backend] = _run(tiny, small_data, tmp_path_factory, f"{backend}-probed", conf, *overrides, probed=True)
        return runs[backend]

    return get


@pytest.fixture(scope="module")
def ddp(tiny, small_data, tmp_path_factory) -> Path:
    return _run(tiny, small_data, tmp_path_factory, "ddp", None)


@pytest.fixture(scope="module")
def zero2(tiny, small_data, tmp_path_factory) -> Path:
    return _run(tiny, small_data, tmp_path_factory, "zero2", ZERO2)


EVAL_EVERY = 2


@pytest.fixture(scope="module")
def zero3(tiny, small_data, tmp_path_factory) -> Path:
    """With periodic eval (steps 2, 4, then the final one) and saves (step 3, the final checkpoint and
    the adapter): every place where parameters get gathered is followed by a partition check."""
    return _run(tiny, small_data, tmp_path_factory, "zero3", ZERO3, eval_every=EVAL_EVERY)


@pytest.fixture(scope="module")
def fsdp2(tiny, small_data, tmp_path_factory) -> Path:
    """Our fully_shard backend over the plain 2-process launch, selected by the run config; with periodic
    eval and saves like the ZeRO-3 run (the root unit must be resharded after each eval)."""
    return _run(tiny, small_data, tmp_path_factory, "fsdp2", None, "train.backend=fsdp2", eval_every=EVAL_EVERY)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_zero_matches_ddp(backend, ddp, request):
    out = request.getfixturevalue(backend)
    assert _summary(out)["backend"] == backend and _summary(ddp)["backend"] == "ddp"
    ref, got = load_adapter(ddp / "adapter"), load_adapter(out / "adapter")
    diff = max_abs_diff(ref, got)
    print(f"{backend} vs DDP: max |adapter diff| = {diff:.3e}")
    assert diff < 1e-7  # README: "ZeRO-2 and ZeRO-3 give the DDP adapter within 1e-7"
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-2  # it trained
    la, lb = _losses(ddp), _losses(out)
    assert len(la) == len(lb) == STEPS and max(abs(a - b) for a, b in zip(la, lb)) < 1e-5
    # grad norm before clipping, as DeepSpeed reports it, equals the DDP one: scaling is exact
    ga = [r["grad_norm"] for r in read_metrics(ddp) if "loss" in r]
    gb = [r["grad_norm"] for r in read_metrics(out) if "loss" in r]
    assert max(abs(a - b) / a for a, b in zip(ga, gb)) < 1e-5, (ga, gb)


def test_fsdp2_matches_ddp_bitwise(ddp, fsdp2, tiny):
    """FSDP2 (2 CPU processes, fp32, accumulation 2, variable lengths, shuffled, clipping active: grad norms
    ~2 against max_grad_norm 1) trains exactly the DDP adapter: the reduce-scatter of fp32 gradients
    averages like DDP's all-reduce, and the norm for clipping is computed over full gradients as DDP's
    clip_grad_norm_ does (with a DTensor norm, a different summation order, it was 5.9e-8 away)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert _summary(fsdp2)["backend"] == "fsdp2"
    ref, got = load_adapter(ddp / "adapter"), load_adapter(fsdp2 / "adapter")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), max_abs_diff(ref, got)
    assert _losses(ddp) == _losses(fsdp2)
    norms = [[r["grad_norm"] for r in read_metrics(out) if "loss" in r] for out in (ddp, fsdp2)]
    assert norms[0] == norms[1] and max(norms[0]) > 1.0  # clipping was active
    base = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, fsdp2 / "adapter")  # loads as a plain PEFT adapter
    live = {n.replace(".default.", "."): p for n, p in model.named_parameters() if ".lora_" in n}
    assert live.keys() == got.keys() and all(torch.equal(live[k], got[k]) for k in got)


def test_fsdp2_holds_half_the_base_after_train_eval_and_save(fsdp2, ddp):
    """Each rank holds its shard of every tensor (dim 0 split in 2: the 103-row embedding and lm_head give
    one rank 52 rows, the other 51, 256 bytes each) after prepare, training, eval and the saves; no
    full-shape base tensor is left (frozen_materialized: a root unit left unsharded after eval counts)."""
    ranks = _summary(fsdp2)["memory_per_rank"]
    for when in ("after_prepare", "after_train", "after_eval", "after_save"):
        total = _summary(ddp)["memory_per_rank"][0][when]["frozen_total"]
        assert sum(r[when]["frozen_local"] for r in ranks) == total
        for m in (r[when] for r in ranks):
            assert m["frozen_total"] == total and abs(2 * m["frozen_local"] - total) <= 2 * 256, (when, m)
            assert m["frozen_materialized"] == 0, (when, m)
            assert 2 * m["trainable_local"] == m["trainable_total"] and m["master_weights"] == 0, (when, m)


def test_fsdp2_resume_equals_uninterrupted(tiny, small_data, tmp_path_factory, fsdp2):
    ckpt = fsdp2 / "checkpoints" / f"step-{SAVE:08d}"
    assert (ckpt / "optimizer-full.pt").is_file()  # the full (FQN-keyed) optimizer state: reshardable
    tmp = tmp_path_factory.mktemp("fsdp2resumed")
    out = tmp / "resumed" / "out"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    res = launch(2, _cfg(tiny, tmp, small_data, "resumed", eval_every=EVAL_EVERY), "train.backend=fsdp2", timeout=600)
    assert f"resumed from {out / 'checkpoints' / ckpt.name} at step {SAVE}" in res.stdout + res.stderr
    a, b = load_adapter(fsdp2 / "adapter"), load_adapter(out / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a), f"not bitwise equal: {max_abs_diff(a, b)}"
    assert _losses(fsdp2)[SAVE:] == _losses(out)


def test_fsdp2_on_one_process(tiny, small_data, tmp_path_factory, ddp):
    """World size 1 (one GPU can run it): fully_shard over a group of one; the same global batch as the
    2-process runs (accumulation 4) gives their adapter up to summation order (README: 1e-5)."""
    tmp = tmp_path_factory.mktemp("fsdp2ws1")
    launch(1, _cfg(tiny, tmp, small_data, "one", gradient_accumulation_steps=4), "train.backend=fsdp2", timeout=600)
    out = tmp / "one" / "out"
    assert _summary(out)["backend"] == "fsdp2"
    assert max_abs_diff(load_adapter(ddp / "adapter"), load_adapter(out / "adapter")) < 1e-5


def test_qlora_under_fsdp2_is_refused_by_name(tiny, tmp_path):
    from distlora import backends
    from distlora import config as C

    raw = base_config(tiny, tmp_path / "out", model={"dtype": "auto", "quantization": {"compute_dtype": "float32",
                                                                                       "quant_storage": "float32"}},
                      train={"backend": "fsdp2"})
    cfg = C.load(write_config(tmp_path / "c.yaml", raw))
    problems = backends.launcher_conflicts(cfg)
    assert len(problems) == 1 and problems[0].startswith("model.quantization: 4-bit base weights"), problems


@pytest.mark.parametrize("backend", ["ddp", "zero2", "fsdp2"])
def test_comm_bytes_per_step_match_the_backend(backend, probed, request):
    """Bytes the collectives moved per optimizer step (accumulation 2, 2 processes), counted at the
    collectives by the test hook (CommCounter), against what each backend must move for an adapter of
    A fp32 gradient bytes, and against the formula the backend logs as comm_bytes: DDP all-reduces
    the gradients once per step (no sync on the accumulation micro step); ZeRO-2 reduces them on
    every micro step (DeepSpeed has no no_sync), all-gathers the updated adapter partitions after
    the step, and all-reduces one fp32 grad norm (4 bytes); FSDP2 see _fsdp2_comm. Measured on this
    machine: DDP 32,768, ZeRO-2 98,308, FSDP2 1,487,360 for A = 32,768."""
    out = probed(backend)
    adapter_bytes = sum(v.numel() * 4 for v in load_adapter(out / "adapter").values())
    accum = 2
    expected = {"ddp": adapter_bytes, "zero2": accum * adapter_bytes + adapter_bytes + 4,
                "fsdp2": _fsdp2_comm(request.getfixturevalue("tiny"), accum, adapter_bytes)}[backend]
    for rank in (0, 1):
        measured = [json.loads(x)["bytes"] for x in (out / f"comm-rank{rank}.jsonl").read_text().splitlines()]
        assert measured == [expected] * PROBED_STEPS, measured
    assert {r["comm_bytes"] for r in read_metrics(out) if "loss" in r} == {expected}


def _fsdp2_comm(tiny: Path, accum: int, adapter_bytes: int) -> int:
    """FSDP2 per optimizer step, from the model's shapes: every micro step all-gathers each decoder layer
    (base + its LoRA) for the forward and again for the backward (resharded after forward), and the root
    unit (embeddings, final norm, lm_head) once (kept until its backward); the last micro step
    reduce-scatters the fp32 adapter gradients, and clipping gathers them once. Each tensor counts at
    FSDP2's padded size (dim 0 rounded up to a multiple of the 2 ranks: the 103-token vocabulary pads
    to 104). Measured: 2 x (53,504 + 2 x (295,936 + 32,768)) + 2 x 32,768 = 1,487,360 bytes."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)

    def padded(p):
        return -(-p.shape[0] // 2) * 2 * (p.numel() // p.shape[0]) * 4

    layers = sum(padded(p) for p in base.model.layers.parameters()) + adapter_bytes  # LoRA: all in the layers
    root = sum(padded(p) for n, p in base.named_parameters() if ".layers." not in n)
    return accum * (root + 2 * layers) + 2 * adapter_bytes


# ------------------------------------------------------------------------------ ZeRO-3 sharding


def test_zero3_frozen_base_is_sharded_after_train_eval_and_save(zero3, zero2):
    mem3 = _summary(zero3)["memory_per_rank"]
    assert len(mem3) == 2
    n_frozen_tensors = 21  # tiny Llama: embeddings, 2 x (4 attn + 3 mlp + 2 norms), final norm, lm_head
    for rank in mem3:
        for when in ("after_prepare", "after_train", "after_eval", "after_save"):
            m = rank[when]
            # each rank holds half of every base tensor (a partition is ceil(numel / 2) elements)
            assert 0 <= 2 * m["frozen_local"] - m["frozen_total"] <= n_frozen_tensors * 4, (when, m)
            assert m["frozen_materialized"] == 0, (when, m)  # nothing left gathered
            assert 2 * m["trainable_local"] == m["trainable_total"], (when, m)
        # after every optimizer step, every eval (periodic and final) and every save (periodic
        # checkpoint, final checkpoint, final adapter), no base weight was left outside its partition
        g = rank["gathered_base"]
        assert g["max_bytes"] == 0 and g["at"] is None, g
        assert g["checks"] == {"step": STEPS, "eval": STEPS // EVAL_EVERY, "save": STEPS // SAVE + 1}, g
    # the contrast: ZeRO-2 keeps the whole base on every rank
    for rank in _summary(zero2)["memory_per_rank"]:
        m = rank["after_save"]
        assert m["frozen_local"] == m["frozen_materialized"] == m["frozen_total"] == mem3[0]["after_save"]["frozen_total"]


def test_gathered_base_bytes_counts_what_is_not_partitioned():
    """The partition check on parameters in each of DeepSpeed's states (its own ZeroParamStatus): a frozen
    parameter counts, at its full size, when it is AVAILABLE or INFLIGHT or still holds full data;
    trainable ones and those DeepSpeed keeps whole on purpose (ds_persist) never do; other backends: 0."""

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus as S

    from distlora.backends.deepspeed import partition_leaks

    def param(numel, status, trainable=False, persist=False):
        p = torch.nn.Parameter(torch.zeros(0 if status is S.NOT_AVAILABLE else numel), requires_grad=trainable)
        p.ds_status, p.ds_persist, p.ds_numel = status, persist, numel
        return p

    m = torch.nn.Module()
    m.a, m.b, m.c = param(10, S.NOT_AVAILABLE), param(100, S.AVAILABLE), param(1000, S.INFLIGHT)
    m.d, m.e = param(10_000, S.AVAILABLE, trainable=True), param(100_000, S.AVAILABLE, persist=True)
    from distlora.backends.deepspeed import DeepSpeed

    zero3 = DeepSpeed.__new__(DeepSpeed)
    zero3.stage, zero3._frozen_sharded = 3, None
    zero3.unwrap = lambda: m
    assert zero3.gathered_base_bytes() == (100 + 1000) * 4
    m.b.ds_status = S.NOT_AVAILABLE  # marked partitioned but its full data still attached: still counted
    assert zero3.gathered_base_bytes() == (100 + 1000) * 4
    for q in (m.b, m.c):  # back in their partitions
        q.data, q.ds_status = torch.zeros(0), S.NOT_AVAILABLE
    assert zero3.gathered_base_bytes() == partition_leaks([m.a, m.b, m.c]) == 0
    m.b.ds_status = S.AVAILABLE
    zero2 = DeepSpeed.__new__(DeepSpeed)
    zero2.stage = 2
    assert zero3.gathered_base_bytes() == 400 and zero2.gathered_base_bytes() == 0


@pytest.fixture(scope="module")
def zero3_gc_unguarded(tiny, small_data, tmp_path_factory):
    """One launch for two claims: ZeRO-3 + gradient checkpointing trains all steps, then the final
    adapter save, forced to skip the gather (DISTLORA_TEST_SKIP_GATHER), must be refused."""
    tmp = tmp_path_factory.mktemp("zero3gc")
    cfg = _cfg(tiny, tmp, small_data, "gc", save_every=0)
    res = launch(2, cfg, "model.gradient_checkpointing=true", config_file=ZERO3, check=False, timeout=600,
                 env={"DISTLORA_TEST_SKIP_GATHER": "1"})
    return tmp / "gc" / "out", res


@pytest.mark.slow
def test_zero3_with_gradient_checkpointing_trains(zero3_gc_unguarded, zero3):
    """transformers#47254 reports a CheckpointError for ZeRO-3 + non-reentrant gradient checkpointing
    on frozen parameters with stage3_param_persistence_threshold 0. With this stack (transformers
    5.24, deepspeed 0.19.8, torch 2.13) the combination trains, and recomputation is exact: the
    per-step losses equal the run without checkpointing (each loss depends on every earlier update)."""
    out, res = zero3_gc_unguarded
    assert "CheckpointError: torch.utils.checkpoint" not in res.stdout + res.stderr
    assert _losses(out) == pytest.approx(_losses(zero3), abs=1e-6)
    assert len(_losses(out)) == STEPS


# ------------------------------------------------------------------------------ adapter export


def _expected_shapes(tiny) -> dict[str, tuple]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from distlora.checkpoint import expected_adapter_shapes

    base = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    return expected_adapter_shapes(model)


def test_zero3_adapter_is_the_gathered_params_and_reloads(tiny, zero3):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    saved = load_adapter(zero3 / "adapter")
    expected = _expected_shapes(tiny)
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected  # exactly the adapter: no base, nothing missing
    with safe_open(str(zero3 / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        assert all(fh.get_slice(k).get_dtype() == "F32" for k in fh.keys())

    # An independent gather: the fp32 master weights of the final checkpoint's optimizer state, which
    # DeepSpeed assembles from each rank's flat fp32 partition (safe_get_full_fp32_param), not from the
    # module's parameter partitions the adapter is gathered from.
    ckpt = zero3 / "checkpoints" / f"step-{STEPS:08d}"
    masters = torch.load(ckpt / "optimizer-zero.pt", weights_only=True)["params"]
    gathered = {k.replace(".default.", "."): v["master"] for k, v in masters.items()}
    assert gathered.keys() == saved.keys()
    assert all(torch.equal(gathered[k], saved[k]) for k in saved), max_abs_diff(gathered, saved)
    ck = load_adapter(ckpt / "adapter")
    assert all(torch.equal(ck[k], saved[k]) for k in saved)

    base = AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, zero3 / "adapter")
    live = {n.replace(".default.", "."): p for n, p in model.named_parameters() if ".lora_" in n}
    assert live.keys() == saved.keys() and all(torch.equal(live[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_forced_empty_zero3_save_is_caught(zero3_gc_unguarded):
    """Saving what a ZeRO-3 rank holds without gathering (the 40-byte-adapter bug) must fail loudly
    and publish nothing."""
    out, res = zero3_gc_unguarded
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "CheckpointError" in text and "adapter is wrong" in text and "mis-shaped" in text, text[-3000:]
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


# ------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_zero3_resume_equals_uninterrupted(tiny, small_data, tmp_path_factory, zero3):
    ckpt = zero3 / "checkpoints" / f"step-{SAVE:08d}"
    assert (ckpt / "optimizer-zero.pt").is_file() and not (ckpt / "deepspeed").exists()  # full state, no partitions
    tmp = tmp_path_factory.mktemp("resumed")
    out = tmp / "resumed" / "out"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    res = launch(2, _cfg(tiny, tmp, small_data, "resumed", eval_every=EVAL_EVERY), config_file=ZERO3, timeout=600)
    assert f"resumed from {out / 'checkpoints' / ckpt.name} at step {SAVE}" in res.stdout + res.stderr
    a, b = load_adapter(zero3 / "adapter"), load_adapter(out / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a), f"not bitwise equal: {max_abs_diff(a, b)}"
    assert _losses(zero3)[SAVE:] == _losses(out)


# ------------------------------------------------------------------------------ refusals


def test_conflicting_deepspeed_json_is_refused(tiny, tmp_path):
    bad = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4,
        "gradient_clipping": 0.5, "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 2},
    }
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    yaml_text = ZERO2.read_text().replace("configs/deepspeed/cpu_zero2.json", str(tmp_path / "bad.json"))
    (tmp_path / "bad.yaml").write_text(yaml_text)
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "out", train={"micro_batch_size": 2}))
    res = launch(2, cfg, config_file=tmp_path / "bad.yaml", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "exitcode  : 2" in out
    assert out.count("the run config has 5 problem(s)") == 1, out[-3000:]
    for needle in ("train.micro_batch_size", "train_micro_batch_size_per_gpu: 8", "train.gradient_accumulation_steps",
                   "train.max_grad_norm", "train.mixed_precision", "bf16.enabled", "\"optimizer\" section"):
        assert needle in out, needle
    assert not (tmp_path / "out").exists()


def test_cpu_flag_under_deepspeed_is_refused(tiny, tmp_path):
    """ACCELERATE_USE_CPU under a DeepSpeed launch would make accelerate build plain CPU DDP (no ZeRO)."""
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "out"))
    res = launch(2, cfg, config_file=ZERO3, env={"ACCELERATE_USE_CPU": "true"}, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "use_cpu" in out and "plain DDP without ZeRO" in out, out[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("yaml_path", sorted(ACC.glob("*deepspeed*.yaml")), ids=lambda p: p.name)
def test_shipped_deepspeed_configs_leave_owned_values_auto(yaml_path):
    """Every shipped DeepSpeed JSON leaves what the run config owns to it ("auto") and has no
    optimizer/scheduler of its own, so the conflict check can never fire on a shipped file."""
    import yaml

    conf = yaml.safe_load(yaml_path.read_text())
    assert conf["distributed_type"] == "DEEPSPEED" and "mixed_precision" not in conf
    ds = json.loads((ROOT / conf["deepspeed_config"]["deepspeed_config_file"]).read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"
    assert "optimizer" not in ds and "scheduler" not in ds
    assert (ds["zero_optimization"]["stage"] == 3) == bool(conf["deepspeed_config"]["zero3_init_flag"])
    if yaml_path.name.startswith("cpu_") and ds["zero_optimization"]["stage"] == 3:
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0  # real sharding on a tiny model


# ------------------------------------------------------------------------------ distlora plan


@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero3", "fsdp2"])
def test_plan_model_state_matches_measured_bytes_per_rank(backend, probed):
    """`distlora plan` (model config only) vs the bytes each of the 2 ranks held, measured from the live
    parameters, ZeRO partitions and optimizer state after training, and the gradient peak of every
    step (the GradientBytes test hook) (summary.json). Measured here (A = 32,768 adapter bytes, hidden 64,
    fp32, accumulation 2): DDP 348,928 base + 32,768 adapter + 32,768 gradients (bucket views) + 65,648
    Adam (the 112 extra bytes are the per-tensor step counters); ZeRO-2 348,928 + 32,768 + 16,384 fp32
    master + 49,152 gradients (a 16,384-byte reduce bucket and two 16,384-byte partitions) + 32,772;
    ZeRO-3 174,464 + 16,384 + 16,384 + 49,152 (bucket, partition buffer, fp32 copy) + 32,772."""
    from distlora import config as C
    from distlora.plan import estimate

    out = probed(backend)
    plan = estimate(C.load(out.parent / "c.yaml"), gpus=2, backend=backend)
    pairs = {"frozen_base": "frozen_local", "adapter_params": "trainable_local",
             "master_weights": "master_weights", "gradients": "gradients", "optimizer_state": "optimizer_state"}
    for rank in _summary(out)["memory_per_rank"]:
        m = {**rank["after_train"], "gradients": rank["gradients"]["peak_bytes"]}
        for mine, measured in pairs.items():
            assert plan.rows[mine] == pytest.approx(m[measured], rel=0.05), (mine, plan.rows[mine], m[measured])
        total = sum(m[k] for k in pairs.values())
        assert plan.model_state == pytest.approx(total, rel=0.05)
    if backend == "zero3":
        assert plan.rows["frozen_base"] * 2 == pytest.approx(estimate(C.load(out.parent / "c.yaml"), 2, "ddp").rows["frozen_base"], rel=1e-3)


def test_ddp_gradients_are_bucket_views(probed):
    """gradient_as_bucket_view with gradients zeroed in place (backends.ddp.DDP.zero_grad) and created
    before DDP is built (DDP.prepare): from the first micro step on, every adapter gradient is a
    view of the reducer's all-reduce buckets, so a step holds the adapter's gradients once. Without
    these the same probes measure 65,536 bytes (32,768 of p.grad next to 32,768 of buckets), and the
    adapter trained is bitwise equal to this run's (both measured once on this config)."""
    ddp = probed("ddp")
    adapter_bytes = sum(v.numel() * 4 for v in load_adapter(ddp / "adapter").values())
    for rank in _summary(ddp)["memory_per_rank"]:
        g = rank["gradients"]
        assert g["by_kind"] == {"ddp_buckets": adapter_bytes}, g  # no gradient outside the buckets
        assert g["peak_bytes"] == adapter_bytes and g["probes"] == PROBED_STEPS * (2 + 1), g  # 2 forwards + 1 update


UNWRAPPED = """
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from distlora.backends import DistributedSetupError
from distlora.backends.ddp import DDP
# the trap from shared/reference/cpu-distributed-facts.md: gloo without cpu=True on a CPU machine
acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
from types import SimpleNamespace
backend = DDP(SimpleNamespace(train=SimpleNamespace(mixed_precision="no")))
backend.acc, backend.model = acc, acc.prepare(torch.nn.Linear(2, 2))
try:
    backend.check_wrapped()
    print("NOT REFUSED", acc.num_processes, flush=True)
except DistributedSetupError as e:
    print("REFUSED", acc.num_processes, e, flush=True)
"""


def test_two_processes_with_an_unwrapped_model_are_refused(tmp_path):
    """A real 2-process launch where accelerate builds a world of 2 but never wraps the model
    (gradients would not be synchronised): check_wrapped refuses it on every rank."""
    import os
    import subprocess
    import sys

    from conftest import CPU_DDP, free_port

    script = tmp_path / "unwrapped.py"
    script.write_text(UNWRAPPED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
                          "--main_process_port", str(free_port()), str(script)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    lines = [ln for ln in res.stdout.splitlines() if "REFUSED" in ln]
    assert len(lines) == 2 and all(ln.startswith("REFUSED 2 ") for ln in lines), res.stdout + res.stderr[-2000:]
    assert "not wrapped for distributed training" in lines[0]
