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
    from distlora.loop import forward_nll

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
    # each chunk once in forward and once recomputed in backward, but the last one (kept: backward starts there)
    assert n_chunks > 1 and len(chunk_calls) == 2 * n_chunks - 1
    last = n_target - (n_chunks - 1) * 16
    assert sum(s[0] for s in chunk_calls) == 2 * n_target - last


def test_chunked_refuses_transformed_logits(tiny, tmp_path):
    model, batch = _setup(tiny, tmp_path)
    model.get_base_model().config.final_logit_softcapping = 30.0
    from distlora.loop import forward_nll

    with pytest.raises(ValueError, match="loss_chunk_size"):
        forward_nll(model, batch, 8)


def test_chunked_batch_without_targets_still_reaches_every_parameter(tiny, tmp_path):
    """A micro batch of padding examples (the end of an epoch) has no target token; under DDP every
    trainable parameter must still get a (zero) gradient, as with the plain loss."""
    from distlora import data as D
    from distlora.loop import forward_nll

    model, _ = _setup(tiny, tmp_path, target_modules=["q_proj", "lm_head"])
    batch = D.Collator(2)([D.Records([], 2)[-1]] * 2)
    for chunk in (0, 4):
        model.zero_grad(set_to_none=True)
        nll, n = forward_nll(model, batch, chunk)
        assert n.tolist() == [0, 0] and nll.tolist() == [0.0, 0.0]
        nll.sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and float(g.abs().max()) == 0.0 for g in grads), chunk


# ------------------------------------------------------------------------------ fused loss (train.loss_impl: liger)
# liger-kernel's kernels need triton and CUDA, which CI does not have: the kernel itself is tested in
# tests/test_gpu_paths.py (`pytest --gpu`). Here a torch stand-in with the documented semantics of
# liger_fused_linear_cross_entropy (input [N, H], weight [V, H], target [N], bias, ignore_index,
# reduction "none" | "sum"; fp32 NLL) takes its place, so everything distlora does around the kernel
# (target positions, shift, packed owners, which lm_head weight, sums, the loop's plumbing) is checked
# on CPU against the chunked loss, with the same 1e-5 bound as above.


def torch_fused_ce(calls=None):
    import torch.nn.functional as F

    def fused(input, weight, target, bias=None, ignore_index=-100, reduction="mean"):
        if calls is not None:
            calls.append({"rows": input.shape[0], "ignore_index": ignore_index, "reduction": reduction})
        logits = F.linear(input, weight, bias).float()
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)

    return fused


def _grads_of(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    out.backward()
    return out.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_close(a, b, bound=1e-5):
    assert float((a - b).abs().max()) <= bound * float(b.abs().max()), (a, b)


def _packed_batch(tmp_path, n=8):
    """The first `n` examples of the config in tmp_path packed into rows of 160 tokens (as tests/test_packing.py)."""
    from distlora import config as C
    from distlora import data as D
    from distlora.model import load_tokenizer

    cfg = C.load(tmp_path / "c.yaml")
    tok = load_tokenizer(cfg)
    recs = D.build_datasets(cfg, tok, log=lambda *_: None)[0][:n]
    rows = D.pack_rows(list(range(n)), [len(r["input_ids"]) for r in recs], 160)
    assert max(len(r) for r in rows) >= 2, "needs rows holding several examples"
    return D.PackedCollator(tok.pad_token_id)([[recs[i] for i in row] for row in rows])


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(
    "lora",
    [{}, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}],
    ids=["all-linear", "modules_to_save-lm_head"],
)
def test_fused_path_equals_chunked_with_a_torch_kernel(tiny, tmp_path, monkeypatch, lora, packed):
    from distlora import loss as L

    model, batch = _setup(tiny, tmp_path, **lora)
    if packed:
        batch = _packed_batch(tmp_path)
    calls = []
    monkeypatch.setattr(L, "_liger_ce", lambda device: torch_fused_ce(calls))
    total0, g0 = _grads_of(model, lambda: L.batch_nll(model, batch, 16))
    total, g = _grads_of(model, lambda: L.batch_nll(model, batch, 0, "liger"))
    n_target = int((batch["labels"][:, 1:] != L.IGNORE).sum())
    assert calls == [{"rows": n_target, "ignore_index": L.IGNORE, "reduction": "sum"}]  # target positions only
    _assert_close(total, total0)
    assert g.keys() == g0.keys() and len(g) > 0
    for k in g0:
        assert float(g0[k].abs().max()) > 0, k
        _assert_close(g[k], g0[k])
    if lora.get("modules_to_save"):
        assert any("modules_to_save" in k and "lm_head" in k for k in g0)
    with torch.no_grad():  # per-example sums (eval) use reduction "none"
        ex0, n0 = L.example_nll(model, batch, 16)
        ex, n = L.example_nll(model, batch, 0, "liger")
    assert calls[-1]["reduction"] == "none" and torch.equal(n, n0)
    _assert_close(ex, ex0)


def test_fused_padding_only_batch_reaches_every_parameter(tiny, tmp_path, monkeypatch):
    from distlora import data as D
    from distlora import loss as L

    model, _ = _setup(tiny, tmp_path, target_modules=["q_proj"], modules_to_save=["lm_head"])
    monkeypatch.setattr(L, "_liger_ce", lambda device: torch_fused_ce())
    batch = D.Collator(2)([D.Records([], 2)[-1]] * 2)
    for per_example in (False, True):
        model.zero_grad(set_to_none=True)
        out = L.example_nll(model, batch, 0, "liger") if per_example else (L.batch_nll(model, batch, 0, "liger"), None)
        nll = out[0]
        assert float(nll.detach().abs().sum()) == 0.0 and (out[1] is None or out[1].tolist() == [0, 0])
        nll.sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and float(g.abs().max()) == 0.0 for g in grads), per_example


def test_fused_path_refuses_what_it_cannot_compute(tiny, tmp_path):
    """The real entry point, no stand-in: on CPU tensors, with a LoRA-adapted lm_head, or with a weight
    that is not whole here (what ZeRO-3 leaves outside its forward), each refused naming the field."""
    from distlora import loss as L
    from distlora.loop import forward_nll

    model, batch = _setup(tiny, tmp_path)
    with pytest.raises(ValueError, match=r"train\.loss_impl: liger runs on CUDA GPUs only.*cpu"):
        forward_nll(model, batch, 0, "liger", total=True)
    head = L._hf_model(model).get_output_embeddings()
    h, y = torch.zeros(3, head.in_features), torch.zeros(3, dtype=torch.long)
    partitioned = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    partitioned.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    with pytest.raises(ValueError, match=r"train\.loss_impl: .*shape \(0,\)"):
        L.fused_linear_nll(partitioned, h, y, "sum")
    lora_head, _ = _setup(tiny, tmp_path / "b", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"train\.loss_impl: .*lm_head here is a Linear.*lora\.target_modules"):
        L.fused_linear_nll(L._hf_model(lora_head).get_output_embeddings(), h, y, "sum")
    model.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"train\.loss_impl: .*final_logit_softcapping"):
        forward_nll(model, batch, 0, "liger", total=True)


def test_default_loss_path_is_untouched(tiny, tmp_path, monkeypatch):
    """impl="torch" (the default) never reaches liger, and the loop's batch sum is exactly the sum of the
    per-example sums it used before train.loss_impl existed."""
    import sys

    from distlora import loss as L

    def boom(device):
        raise AssertionError("the default path reached liger")

    monkeypatch.setattr(L, "_liger_ce", boom)
    model, batch = _setup(tiny, tmp_path)
    for chunk in (0, 7):
        with torch.no_grad():
            assert torch.equal(L.batch_nll(model, batch, chunk), L.example_nll(model, batch, chunk)[0].sum())
    assert "liger_kernel" not in sys.modules


def test_loop_with_fused_loss_matches_chunked_run(tiny, tmp_path, monkeypatch):
    """The training loop and eval pass train.loss_impl through: a 6-step run with the (stand-in) fused
    loss logs the chunked run's losses and eval loss (fp32, CPU; same bound as above)."""
    from conftest import read_metrics, run_inprocess

    from distlora import config as C
    from distlora import loss as L

    calls = []
    monkeypatch.setattr(L, "_liger_ce", lambda device: torch_fused_ce(calls))
    monkeypatch.setattr(C, "_check_liger", lambda train, check_device: [])  # no liger or CUDA here: the stand-in runs
    runs = {}
    for name, train in (("chunked", {"loss_chunk_size": 16}), ("fused", {"loss_impl": "liger"})):
        raw = base_config(tiny, tmp_path / name, train={**train, "max_steps": 6})
        assert run_inprocess(write_config(tmp_path / f"{name}.yaml", raw)) == 0
        runs[name] = read_metrics(tmp_path / name)
    assert {c["reduction"] for c in calls} == {"sum", "none"}  # training steps and eval both went through it
    for key in ("loss", "eval_loss"):
        a = [r[key] for r in runs["chunked"] if key in r]
        b = [r[key] for r in runs["fused"] if key in r]
        assert len(a) == len(b) > 0 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (key, a, b)
