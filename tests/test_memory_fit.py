"""Memory that fits, checked before launch: the "auto" memory settings (one rule, distlora.plan.resolve_memory,
for the launcher, `distlora plan` and the trainer), the refusal of a run whose plan exceeds the device, and
no full-sequence fp32 logits under bf16 with the chunked loss.

The rule's thresholds are tested at the byte where they flip; the launcher's and the trainer's resolutions
are compared on the same device memory (the trainer's torch.cuda answers replaced: this machine has no GPU).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import base_config, write_config


@pytest.fixture
def cfg_path(tiny, tmp_path):
    return write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o"))


def _load(path, *overrides):
    from distlora import config as C

    return C.load(path, list(overrides))


# ------------------------------------------------------------------------------ the auto rule
def test_auto_rule_flips_at_the_usable_fraction(cfg_path):
    from distlora.plan import AUTO_CHUNK, USABLE_FRACTION, estimate, model_shape, resolve_memory

    cfg = _load(cfg_path)
    shape = model_shape(cfg)
    # CPU: nothing planned, both off, whatever memory is claimed (today's CPU behaviour, unchanged)
    cpu = resolve_memory(cfg, on_gpu=False, device_bytes=1, shape=shape)
    assert (cpu.gradient_checkpointing, cpu.loss_chunk_size, cpu.plan, cpu.problem()) == (False, 0, None, None)
    without = estimate(cfg, 1, "ddp", shape, True, AUTO_CHUNK).total(False)
    fits = math.ceil(without / USABLE_FRACTION) + 1  # the smallest device (to a byte or two) it fits without checkpointing
    while int(USABLE_FRACTION * (fits - 1)) >= without:
        fits -= 1
    for dev, gc in ((fits, False), (fits - 1, True)):
        mem = resolve_memory(cfg, on_gpu=True, device_bytes=dev, shape=shape)
        assert (mem.gradient_checkpointing, mem.loss_chunk_size) == (gc, AUTO_CHUNK), (dev, mem.why)
        assert mem.fits and mem.need == mem.plan.total(gc)
    # unknown device memory (no nvidia-smi, no --device-memory-gib): checkpointing stays off, fit unchecked
    unknown = resolve_memory(cfg, on_gpu=True, shape=shape)
    assert (unknown.gradient_checkpointing, unknown.fits) == (False, None)
    # liger chunks in its kernel: auto gives 0; explicit values are kept as given
    liger = cfg.model_copy(update={"train": cfg.train.model_copy(update={"loss_impl": "liger"})})  # no liger here
    assert resolve_memory(liger, on_gpu=True, shape=shape).loss_chunk_size == 0
    explicit = resolve_memory(_load(cfg_path, "model.gradient_checkpointing=false", "train.loss_chunk_size=0"),
                              on_gpu=True, device_bytes=fits - 1, shape=shape)
    assert (explicit.gradient_checkpointing, explicit.loss_chunk_size, explicit.fits) == (False, 0, False)  # 0: the same logits as 1024 at 256 tokens
    # train.device_memory_gib wins over what the device reports
    told = resolve_memory(_load(cfg_path, "train.device_memory_gib=0.5"), on_gpu=True, device_bytes=1, shape=shape)
    assert told.device_bytes == 2**29


def test_refusal_names_fixes_that_fit(cfg_path):
    """A device smaller than the plan: one line naming a config field; every fix it says fits alone does
    fit when re-planned, and the ones it says do not, do not."""
    from distlora.plan import USABLE_FRACTION, estimate, model_shape, resolve_memory

    cfg = _load(cfg_path, "model.gradient_checkpointing=false", "train.loss_chunk_size=0", "train.micro_batch_size=8")
    shape = model_shape(cfg)
    full = estimate(cfg, 2, "ddp", shape, True, 0)
    dev = int(full.total(True) / USABLE_FRACTION) + 1  # fits with checkpointing, not without
    mem = resolve_memory(cfg, on_gpu=True, gpus=2, device_bytes=dev, shape=shape)
    line = mem.problem()
    assert mem.fits is False and line is not None and "\n" not in line
    assert line.startswith("model.gradient_checkpointing: the plan needs"), line
    assert "fix, each fits alone: model.gradient_checkpointing=true" in line, line
    changes = dict(mem.fixes)  # the chunked loss is not among them: 512 tokens are fewer than a chunk of 1024
    assert set(changes) == {"model.gradient_checkpointing=true", "train.sequence_parallel_size=2", "train.micro_batch_size=4",
                            "--backend zero3", "model.quantization={bits: 4}"}, changes
    assert changes["model.gradient_checkpointing=true"] == full.total(True) <= mem.usable
    for change, need in mem.fixes:  # each lowers the plan; the line names exactly those that fit alone
        assert need < mem.need and (f"{change} (" in line) == (need <= mem.usable), (change, need, line)
        if change.startswith("train.micro_batch_size="):  # the largest micro batch that fits
            bigger = _load(cfg_path, "model.gradient_checkpointing=false", "train.loss_chunk_size=0",
                           f"train.micro_batch_size={int(change.split('=')[1]) + 1}")
            assert estimate(bigger, 2, "ddp", shape, True, 0).total(False) > mem.usable
    fits_too = resolve_memory(cfg, on_gpu=True, gpus=2, device_bytes=10 * dev, shape=shape)
    assert fits_too.problem() is None


# ------------------------------------------------------------------------------ one rule: launcher = trainer
def test_launcher_and_trainer_resolve_alike(cfg_path, monkeypatch):
    """launch.memory_check (nvidia-smi's number) and the trainer's resolve_for_training (torch.cuda's) on
    the same device memory: the same settings and plan, and the same refusal line (exit 2 in both)."""
    from distlora import config as C
    from distlora import launch
    from distlora.plan import model_shape, resolve_for_training, resolve_memory

    cfg = _load(cfg_path, "train.micro_batch_size=8")
    need_off = resolve_memory(cfg, on_gpu=True, gpus=2, device_bytes=2**50).plan.total(False)
    props = SimpleNamespace(total_memory=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    said = []
    for dev in (2 * need_off, need_off, 1024):  # fits as is; fits with checkpointing on; fits nothing
        props.total_memory = dev
        mem, note = launch.memory_check(cfg, launch.Shape(1, 2, "ddp"), smi=lambda dev=dev: dev)
        trainer_cfg = _load(cfg_path, "train.micro_batch_size=8")
        if mem.problem():
            with pytest.raises(C.ConfigError) as err:
                resolve_for_training(trainer_cfg, "ddp", 2, say=said.append)
            assert err.value.problems == [mem.problem()]
            continue
        got = resolve_for_training(trainer_cfg, "ddp", 2, say=said.append)
        assert got.record() == mem.record() and note == said[-1].removeprefix("distlora: ")
        assert (trainer_cfg.model.gradient_checkpointing, trainer_cfg.train.loss_chunk_size) == \
            (mem.gradient_checkpointing, mem.loss_chunk_size) == (dev == need_off, 1024)
    assert model_shape(cfg).vocab == 103  # the tiny model: its plan is a few MiB, so 1 KiB fits nothing


def test_launch_and_plan_refuse_before_any_worker(cfg_path, tmp_path, capsys):
    from distlora import launch
    from distlora.cli import main as cli

    out = tmp_path / "o"
    assert launch.main(["--config", str(cfg_path), "--device-memory-gib", "0.000001"]) == 2
    err = capsys.readouterr().err
    refusal = [ln for ln in err.splitlines() if "the plan needs" in ln]
    assert len(refusal) == 1 and refusal[0].startswith(("distlora: train.", "distlora: model.")), err
    assert "nothing launched" in err
    assert not (out / "launch").exists() and not (out / "logs").exists()  # no accelerate config, no worker log
    assert cli(["plan", "--config", str(cfg_path), "--gpus", "1", "--backend", "ddp", "--device-memory-gib", "0.000001"]) == 2
    assert "the plan needs" in capsys.readouterr().err
    assert cli(["plan", "--config", str(cfg_path), "--gpus", "1", "--backend", "ddp", "--device-memory-gib", "80"]) == 0
    out_text = capsys.readouterr().out
    assert "distlora: memory: gradient checkpointing off, loss chunk 1024" in out_text, out_text
    # a CPU launch plans nothing (the CPU trainer resolves auto to off without a plan): not refused here
    mem, note = launch.memory_check(_load(cfg_path, "train.device_memory_gib=0.000001"), launch.Shape(1, 2, "ddp", cpu=True))
    assert mem.problem() is None and "auto -> off (no GPU)" in note


def test_plan_notes_the_fp32_logits_of_an_unchunked_loss(cfg_path):
    from distlora.plan import MIB, estimate

    cfg = _load(cfg_path, "train.loss_chunk_size=0")
    plain = estimate(cfg, 1, "ddp")
    tok = plain.micro_batch_size * plain.seq_len
    assert f"{tok * 103 * 4 / MIB:,.1f} MiB of them fp32" in " ".join(plain.notes)
    chunked = estimate(cfg, 1, "ddp", loss_chunk=16)
    assert chunked.rows["logits"] * tok == plain.rows["logits"] * 16  # the same bytes per token, 16 of 256 tokens


# ------------------------------------------------------------------------------ no full-sequence fp32 logits
def _largest_fp32_vocab_rows(model, batch, chunk: int, vocab: int) -> int:
    """Rows (elements / vocab) of the largest fp32 tensor whose last dimension is the vocabulary, made by
    any op during one training forward + backward (the trainer's loss) of `model`."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from distlora.loop import forward_nll

    largest = [0]

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() and t.shape[-1] == vocab:
                    largest[0] = max(largest[0], t.numel() // vocab)
            return out

    with Probe():
        forward_nll(model, batch, chunk, total=True).backward()
    return largest[0]


@pytest.mark.parametrize("chunk", [0, 16])
def test_no_full_sequence_fp32_logits_with_the_chunked_loss(tiny, tmp_path, chunk):
    """Under bf16 autocast, through accelerate's prepared forward (autocast + convert_outputs_to_fp32), as
    the trainer runs it: chunk 0 makes a [tokens, vocab] fp32 tensor; chunk 16 none over 16 x vocab."""
    from accelerate import Accelerator

    from distlora import data as D
    from distlora.model import load_model, load_tokenizer

    cfg = _load(write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o", model={"dtype": "bfloat16"})))
    tok = load_tokenizer(cfg)
    recs, _, _ = D.build_datasets(cfg, tok, log=lambda *_: None)
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    model = acc.prepare(load_model(cfg, "bf16"))
    assert getattr(model.forward, "__wrapped__", None) is not None  # accelerate wrapped the forward
    batch = D.Collator(tok.pad_token_id)(recs[:4])
    b, s = batch["input_ids"].shape
    targets = int((batch["labels"][:, 1:] != -100).sum())
    vocab = model.get_output_embeddings().weight.shape[0]
    assert vocab == 103 and targets > 16 and b * s > targets
    rows = _largest_fp32_vocab_rows(model, batch, chunk, vocab)
    print(f"chunk {chunk}: largest fp32 [*, vocab] tensor has {rows} rows; {b * s} tokens, {targets} targets")
    if chunk:
        assert rows <= chunk  # a chunk's logits, or the model's own one-position output (b rows)
    else:
        assert rows >= b * s  # accelerate's fp32 copy of the whole [b, s, vocab] output
