"""Chunked cross-entropy: the same per-example NLL and the same adapter gradient as the plain loss,
and lm_head never sees more than one chunk of positions at a time.

Tolerances: fp32 on CPU; the chunked path only changes the order of summation inside each example
(index_add over target tokens instead of a row sum) and the matmul shapes of lm_head. Measured on
this machine (tiny Llama, 6 examples, chunks of 1, 7 and all): per-example NLL within 9.7e-8 relative,
gradients within 5.5e-7 relative of each tensor's largest entry, for all three lm_head setups; the
bound is 1e-5 (a wrong shift, a lost token or a missing lm_head gradient moves them by >1e-2).
"""

from __future__ import annotations

import pytest
import torch

from conftest import base_config, write_config


def _setup(tiny, tmp_path, **lora):
    from distlora import config as C
    from distlora import data as D
    from distlora.model import load_model, load_tokenizer

    raw = base_config(tiny, tmp_path / "out", lora={"r": 4, "alpha": 8, "dropout": 0.0, **lora})
    cfg = C.load(write_config(tmp_path / "c.yaml", raw))
    tok = load_tokenizer(cfg)
    recs, _, _ = D.build_datasets(cfg, tok, log=lambda *_: None)
    model = load_model(cfg, "no")
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: lora_B starts at 0, which would hide errors in A's gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = D.Collator(tok.pad_token_id)(recs[:6])  # variable lengths: padding inside the batch
    return model, batch


def _nll_and_grad(model, batch, chunk):
    from distlora.train import forward_nll

    model.zero_grad(set_to_none=True)
    nll, n = forward_nll(model, batch, chunk)
    (nll.sum() / n.sum()).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return nll.detach(), n, grads


@pytest.mark.parametrize(
    "lora",
    [
        {},  # all-linear: lm_head frozen, gradient flows through the hidden states
        {"target_modules": ["q_proj", "v_proj", "lm_head"]},  # LoRA on lm_head
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},  # lm_head trained in full
    ],
    ids=["all-linear", "lora-lm_head", "modules_to_save-lm_head"],
)
def test_chunked_equals_plain_loss_and_gradient(tiny, tmp_path, lora):
    model, batch = _setup(tiny, tmp_path, **lora)
    nll0, n0, g0 = _nll_and_grad(model, batch, 0)
    for chunk in (1, 7, 10_000):  # 7 divides neither the row lengths nor the target count
        nll, n, g = _nll_and_grad(model, batch, chunk)
        assert torch.equal(n, n0)
        assert float((nll - nll0).abs().max() / nll0.abs().max()) < 1e-5, (chunk, nll, nll0)
        assert g.keys() == g0.keys() and len(g) > 0
        for k in g0:
            scale = float(g0[k].abs().max())
            assert scale > 0, k
            assert float((g[k] - g0[k]).abs().max()) / scale < 1e-5, (chunk, k)
    if lora.get("modules_to_save") or "lm_head" in lora.get("target_modules", []):
        assert any("lm_head" in k for k in g0), "lm_head's trainable weights got a gradient"


def test_lm_head_sees_one_chunk_at_a_time(tiny, tmp_path):
    """Forward and backward (the recompute) call lm_head on at most `chunk` positions; only the
    model's own call with logits_to_keep=1 sees one position per row."""
    model, batch = _setup(tiny, tmp_path, target_modules=["q_proj", "lm_head"])
    from distlora.loss import _hf_model

    head = _hf_model(model).get_output_embeddings()
    rows = []
    handle = head.register_forward_hook(lambda _m, _a, out: rows.append(tuple(out.shape)))
    try:
        _nll_and_grad(model, batch, 16)
    finally:
        handle.remove()
    n_target = int((batch["labels"][:, 1:] != -100).sum())
    vocab = model.get_base_model().config.vocab_size
    model_call = [s for s in rows if len(s) == 3]
    chunk_calls = [s for s in rows if len(s) == 2]
    assert model_call == [(batch["input_ids"].shape[0], 1, vocab)]
    assert all(s[0] <= 16 for s in chunk_calls)
    n_chunks = -(-n_target // 16)
    assert len(chunk_calls) == 2 * n_chunks  # each chunk once in forward, once recomputed in backward
    assert sum(s[0] for s in chunk_calls) == 2 * n_target


def test_chunked_refuses_transformed_logits(tiny, tmp_path):
    model, batch = _setup(tiny, tmp_path)
    model.get_base_model().config.final_logit_softcapping = 30.0
    from distlora.train import forward_nll

    with pytest.raises(ValueError, match="loss_chunk_size"):
        forward_nll(model, batch, 8)


def test_chunked_batch_without_targets_still_reaches_every_parameter(tiny, tmp_path):
    """A micro batch of padding examples (the end of an epoch) has no target token; under DDP every
    trainable parameter must still get a (zero) gradient, as with the plain loss."""
    from distlora import data as D
    from distlora.train import forward_nll

    model, _ = _setup(tiny, tmp_path, target_modules=["q_proj", "lm_head"])
    batch = D.Collator(2)([D.Records([], 2)[-1]] * 2)
    for chunk in (0, 4):
        model.zero_grad(set_to_none=True)
        nll, n = forward_nll(model, batch, chunk)
        assert n.tolist() == [0, 0] and nll.tolist() == [0.0, 0.0]
        nll.sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and float(g.abs().max()) == 0.0 for g in grads), chunk
