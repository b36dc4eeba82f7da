"""Packed micro batches on each attention implementation (distlora.attention): per-example NLL and LoRA
gradients of a packed batch equal the unpacked batch's, for sdpa (per-segment), eager (dense block mask)
and flash_attention_2 (transformers' own integration with only the CUDA kernel replaced), with one or
several rows per micro batch and with the plain or the chunked loss; the refusals fire at config time.

Tolerance 1e-5 (relative to the largest per-example NLL, and to each gradient tensor's largest entry),
fp32 on CPU: packed and unpacked attend over the same keys per example, only matmul shapes and
summation order differ. Measured on this machine, max over the 12 cases: per-example NLL within
1.8e-7 relative, gradients within 7.1e-7 (MEASURED below, per route). The failure the flash cases
guard against (rows not flattened: transformers' flash derives boundaries from position ids only for
one row) moves the NLL by 5.4e-2 relative and gradients by 0.4, far above the bound.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import base_config, lora_model_and_data, write_config
from distlora import attention as A
from distlora import data as D

# ------------------------------------------------------------------------------ reference flash kernel
# Test instrumentation, never production code: flash_attn's varlen and dense entry points in plain torch
# (fp32 softmax), with flash_attn 2.x's exact signatures, since transformers passes only the kwargs a
# kernel's signature names (modeling_flash_attention_utils._lazy_define_process_function).


def _attend(q, k, v, softmax_scale, causal, window_size):
    """q [Lq, H, D], k/v [Lk, Hkv, D]; query head h reads key head h // (H / Hkv), as flash_attn does."""
    lq, h, d = q.shape
    lk, hkv = k.shape[0], k.shape[1]
    k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    i = torch.arange(lq)[:, None] + (lk - lq)  # flash_attn >= 2.1 aligns causal masks bottom-right
    j = torch.arange(lk)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window_size[0] >= 0:
        keep &= j >= i - window_size[0]
    if window_size[1] >= 0:
        keep &= j <= i + window_size[1]
    p = s.masked_fill(~keep, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and block_table is None
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max_seqlen_q == max(b - a for a, b in itertools.pairwise(cq)), "max_length must match cu_seq_lens"
    CALLS.append(cq)
    return torch.cat([
        _attend(q[qa:qb], k[ka:kb], v[ka:kb], softmax_scale, causal, window_size)
        for qa, qb, ka, kb in zip(cq, cq[1:], ck, ck[1:])
    ])


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal, window_size) for b in range(q.shape[0])])


CALLS: list[list[int]] = []  # cu_seqlens of each varlen call


@pytest.fixture
def flash_reference(monkeypatch):
    """flash_attention_2 on CPU: transformers' loader (`_lazy_imports`) hands out the reference kernels,
    and its availability check (flash_attn installed, a CUDA device) is waived; everything between the
    model and the kernel is transformers' own code."""
    import transformers.modeling_flash_attention_utils as fa
    from transformers.modeling_utils import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "_flash_attn_can_dispatch", lambda self, *a, **k: True)
    monkeypatch.setattr(fa, "_lazy_imports", lambda *a, **k: (
        flash_attn_func, flash_attn_varlen_func, None, fa._pad_input, fa._unpad_input))
    monkeypatch.setattr(fa, "_loaded_implementation", None)  # loaded again through the patch, restored after
    CALLS.clear()


# ------------------------------------------------------------------------------ packed == unpacked


def _setup(tiny, tmp_path, attn, n=12):
    model, tok, recs, _, _ = lora_model_and_data(tiny, tmp_path, attn, packing=True)
    return model, tok, recs[:n]


def _grads(model, batch, chunk=0, impl="torch"):
    from distlora.loop import forward_nll

    model.zero_grad(set_to_none=True)
    nll, n = forward_nll(model, batch, chunk, impl)
    (nll.sum() / n.sum()).backward()
    return nll.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _packed_vs_unpacked(model, tok, recs, capacity, chunk, impl="torch"):
    """(per-example NLL relative error, worst gradient error relative to each tensor's largest entry)."""
    rows = D.pack_rows(list(range(len(recs))), [len(r["input_ids"]) for r in recs], capacity)
    packed = D.PackedCollator(tok.pad_token_id)([[recs[i] for i in row] for row in rows])
    nll_p, n_p, g_p = _grads(model, packed, chunk, impl)
    nll_u, n_u, g_u = _grads(model, D.Collator(tok.pad_token_id)(recs), 0)
    order = torch.argsort(packed["ids"])
    assert packed["ids"][order].tolist() == list(range(len(recs)))
    assert torch.equal(n_p[order], n_u)
    rel = float((nll_p[order] - nll_u).abs().max() / nll_u.abs().max())
    assert all(float(g.abs().max()) > 0 for g in g_u.values())
    grad = max(float((g_p[k] - g_u[k]).abs().max() / g_u[k].abs().max()) for k in g_u)
    return rel, grad, packed


ATTN = {  # model.attn_implementation -> what the loaded model runs
    "sdpa": A.VARLEN_SDPA,
    "eager": "eager",
    "flash_attention_2": "flash_attention_2",
}
ROWS = {1: 640, 4: 160}  # rows per micro batch -> row capacity that packs the 12 examples (38-48 tokens) so
# that a micro batch holds that many rows. MEASURED (max over rows 1 / 4 and plain / chunked; NLL relative,
# gradient relative): sdpa (per-segment) 1.8e-7 / 7.1e-7, eager 9e-8 / 7.1e-7, flash_attention_2 9e-8 / 7.1e-7.


@pytest.mark.parametrize("chunk", [0, 5], ids=["plain", "chunked"])
@pytest.mark.parametrize("rows", sorted(ROWS), ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("attn", sorted(ATTN))
def test_packed_equals_unpacked(tiny, tmp_path, request, attn, rows, chunk):
    if attn.startswith("flash"):
        request.getfixturevalue("flash_reference")
    model, tok, recs = _setup(tiny, tmp_path, attn)
    assert model.config._attn_implementation == ATTN[attn]
    rel, grad, packed = _packed_vs_unpacked(model, tok, recs, ROWS[rows], chunk)
    assert packed["input_ids"].shape[0] == rows and len(packed["ids"]) == len(recs)
    print(f"{attn} rows={rows} chunk={chunk}: nll {rel:.2g} grad {grad:.2g}")
    assert rel < 1e-5, rel
    assert grad < 1e-5, grad
    if attn.startswith("flash"):  # the varlen kernel saw the collator's segments, not per-row ones
        assert packed["cu_seq_lens"].tolist() in CALLS


@pytest.mark.parametrize("attn", ["flash_attention_2", "sdpa"])
def test_packed_equals_unpacked_fused_loss(tiny, tmp_path, request, monkeypatch, attn):
    """train.loss_impl=liger's path on the flattened row (liger's kernel replaced by torch's cross-entropy,
    as in test_loss: liger runs on CUDA only), 4 rows per micro batch. Measured: NLL 1.8e-7 (sdpa) /
    9e-8 (flash) relative, gradients 6.4e-7 / 7.1e-7."""
    from test_loss import torch_fused_ce

    from distlora import loss as L

    if attn.startswith("flash"):
        request.getfixturevalue("flash_reference")
    monkeypatch.setattr(L, "_liger_ce", lambda device: torch_fused_ce())
    model, tok, recs = _setup(tiny, tmp_path, attn)
    rel, grad, _ = _packed_vs_unpacked(model, tok, recs, ROWS[4], 0, "liger")
    print(f"{attn} liger: nll {rel:.2g} grad {grad:.2g}")
    assert rel < 1e-5 and grad < 1e-5, (rel, grad)


@pytest.mark.parametrize("attn", ["flash_attention_3", "flash_attention_4"])
def test_other_flash_versions_take_the_same_route(tiny, tmp_path, flash_reference, attn):
    """flash_attention_3 / 4 reach the kernel through the same transformers code as flash_attention_2
    (modeling_flash_attention_utils._flash_attention_forward); with the reference kernel behind each name,
    packed rows are flattened and exact here too (4 rows, plain loss). Their CUDA kernels themselves are
    not modelled: only their varlen contract (cu_seqlens, max_seqlen) is the one used."""
    model, tok, recs = _setup(tiny, tmp_path, attn)
    assert model.config._attn_implementation == attn
    rel, grad, packed = _packed_vs_unpacked(model, tok, recs, ROWS[4], 0)
    assert rel < 1e-5 and grad < 1e-5, (rel, grad)
    assert packed["cu_seq_lens"].tolist() in CALLS


def test_flash_rows_not_flattened_is_caught(tiny, tmp_path, flash_reference, monkeypatch):
    """The trap the flash route avoids, shown to be visible to the test above: with flattening off,
    B = 4 packed rows reach transformers' flash code as 4 rows, it runs plain causal attention over
    each whole row, and examples attend to each other. Measured: NLL off by 5.4e-2 relative, gradients 0.4."""
    monkeypatch.setattr(A, "uses_varlen", lambda impl: False)
    model, tok, recs = _setup(tiny, tmp_path, "flash_attention_2")
    rel, grad, _ = _packed_vs_unpacked(model, tok, recs, ROWS[4], 0)
    print(f"not flattened: nll {rel:.2g} grad {grad:.2g}")
    assert rel > 1e-3 and grad > 1e-3, (rel, grad)


def test_varlen_sdpa_takes_segments_from_position_ids_without_kwargs(tiny, tmp_path, monkeypatch):
    """Whoever calls the per-segment sdpa with packed rows and no segment kwargs (here: flattening off)
    still gets exact attention: the segments come from the position ids. A padded batch goes to
    transformers' sdpa with its own mask (the unpacked side of the comparison)."""
    monkeypatch.setattr(A, "uses_varlen", lambda impl: False)
    model, tok, recs = _setup(tiny, tmp_path, "sdpa")
    rel, grad, _ = _packed_vs_unpacked(model, tok, recs, ROWS[4], 0)
    assert rel < 1e-5 and grad < 1e-5, (rel, grad)


@pytest.mark.parametrize("window", [None, 3], ids=["full", "sliding3"])
def test_varlen_sdpa_equals_reference_per_segment(window):
    """The per-segment sdpa against the reference kernel above, segment by segment, with grouped-query
    heads (4 query heads on 2 key/value heads) and a sliding window shorter than some segments
    (transformers' band: query - key < window, flash_attn's window_size (window - 1, 0)). Measured:
    equal within 3.6e-7 in fp32; the bound is 1e-5."""
    import types

    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 6, 13, 20], dtype=torch.int32)
    q, k, v = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    out, _ = A.varlen_sdpa_forward(types.SimpleNamespace(is_causal=True), q, k, v, None, scaling=0.3,
                                   cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7,
                                   sliding_window=window)
    w = (window - 1, 0) if window else (-1, -1)
    ref = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 7, 7,
                                 softmax_scale=0.3, causal=True, window_size=w)
    assert out.shape == (1, 20, 4, 8)
    assert float((out[0] - ref).abs().max()) < 1e-5


def test_varlen_sdpa_padded_batch_equals_sdpa():
    """A padded batch (left and right padding) on a model switched to the per-segment sdpa gets sdpa's
    own mask through the registered mask function: logits of real tokens equal plain sdpa's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(conf).eval()
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        A.use_varlen_sdpa(model)
        assert model.config._attn_implementation == A.VARLEN_SDPA
        out = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert float((out[real] - ref[real]).abs().max()) < 1e-6  # the same sdpa call: measured 0


def test_collator_segments():
    """cu_seq_lens over the flattened rows: each example, then each row's padding as a segment of its own."""
    recs = [{"input_ids": [1] * n, "labels": [1] * n, "id": i} for i, n in enumerate([5, 3, 7, 2])]
    b = D.PackedCollator(0)([[recs[0], recs[1]], [recs[2]], [recs[3]]])
    assert b["input_ids"].shape == (3, 8)
    assert b["cu_seq_lens"].dtype == torch.int32
    assert b["cu_seq_lens"].tolist() == [0, 5, 8, 15, 16, 18, 24]
    assert b["max_length"] == 7 and type(b["max_length"]) is int
    flat = A.flatten(b)
    assert flat["input_ids"].shape == flat["labels"].shape == flat["example_index"].shape == (1, 24)
    assert flat["position_ids"][0].tolist() == [*range(5), *range(3), *range(7), 0, *range(2), *range(6)]


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("attn,overrides,needle", [
    ("flex_attention", [], "runs its backward on CUDA GPUs only"),
    ("paged|sdpa", [], "'paged|sdpa' with data.packing"),
    ("kernels-community/some-kernel", [], "'kernels-community/some-kernel' with data.packing"),
])
def test_packed_attention_refused_at_config_time(tiny, tmp_path, capsys, attn, overrides, needle):
    """One line naming model.attn_implementation and data.packing, and the fix; exit 2, nothing written.
    The same implementations without packing, and the exact ones with it, pass the check."""
    from conftest import run_inprocess

    from distlora import config as C

    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "o", model={"attn_implementation": attn},
                                                        data={"packing": True}))
    assert run_inprocess(path, *overrides) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "model.attn_implementation" in ln]
    assert len(err) == 1 and needle in err[0] and "data.packing" in err[0], err
    assert "set model.attn_implementation to sdpa, eager or flash_attention_2, or data.packing=false" in err[0]
    assert not (tmp_path / "o").exists()
    for ok in (["data.packing=false"], ["model.attn_implementation=sdpa"], ["model.attn_implementation=eager"],
               ["model.attn_implementation=flash_attention_3"], ["model.attn_implementation=null"]):
        C.load(path, ok, check_model=False, check_device=True)


def test_flash_rule_is_transformers_rule():
    """attention.is_flash (torch-free, for the config check) names exactly what transformers treats as flash."""
    from transformers.utils.generic import is_flash_attention_requested

    for impl in ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2", "sdpa", "eager",
                 "flex_attention", A.VARLEN_SDPA):
        assert A.is_flash(impl) == is_flash_attention_requested(requested_attention_implementation=impl), impl


# ------------------------------------------------------------------------------ through the real loop


def test_packed_run_on_per_segment_sdpa_equals_unpacked_run(tiny, tmp_path, monkeypatch):
    """The trainer, in process: 12 examples, each step the whole data set (unpacked: one micro batch of 12
    padded rows; packed: one row of <= 640 tokens through the per-segment sdpa), 3 steps of Adam. Same
    adapter, losses and eval loss within the packing tests' 1e-5. Measured: adapter within 6.3e-7,
    losses within 5.4e-7, eval loss equal to the last digit."""
    from conftest import load_adapter, max_abs_diff, read_metrics, run_inprocess

    data = tmp_path / "twelve.jsonl"
    data.write_text("\n".join((tiny / "data" / "train.jsonl").read_text().splitlines()[:12]) + "\n")
    segments = []
    forward = A.varlen_sdpa_forward

    def spy(*args, **kwargs):
        segments.append(kwargs.get("cu_seq_lens_q") is not None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(A, "varlen_sdpa_forward", spy)  # register() installs the module's function at load
    train = {"max_steps": 3, "lr": 1e-2, "warmup_steps": 0, "lr_scheduler": "constant"}
    runs = {
        "unpacked": ({}, {**train, "micro_batch_size": 12}),
        "packed": ({"packing": True}, {**train, "micro_batch_size": 1, "micro_batch_tokens": 640}),
    }
    for name, (d, t) in runs.items():
        raw = base_config(tiny, tmp_path / name, data={"train": str(data), "eval": str(data), "shuffle": False, **d},
                          train=t)
        assert run_inprocess(write_config(tmp_path / f"{name}.yaml", raw)) == 0
    assert segments and all(segments), "the packed run went through the per-segment sdpa with segments"
    a, b = load_adapter(tmp_path / "unpacked" / "adapter"), load_adapter(tmp_path / "packed" / "adapter")
    assert max(float(v.abs().max()) for v in a.values()) > 1e-3  # it trained
    m_u, m_p = read_metrics(tmp_path / "unpacked"), read_metrics(tmp_path / "packed")
    l_u, l_p = [r["loss"] for r in m_u if "loss" in r], [r["loss"] for r in m_p if "loss" in r]
    e_u, e_p = [r["eval_loss"] for r in m_u if "eval_loss" in r], [r["eval_loss"] for r in m_p if "eval_loss" in r]
    print("adapter", max_abs_diff(a, b), "losses", max(abs(x - y) for x, y in zip(l_u, l_p)), "eval", abs(e_u[-1] - e_p[-1]))
    assert len(l_u) == len(l_p) == 3
    assert max_abs_diff(a, b) < 1e-5
    assert max(abs(x - y) for x, y in zip(l_u, l_p)) < 1e-5
    assert abs(e_u[-1] - e_p[-1]) < 1e-5
