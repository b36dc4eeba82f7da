"""Per-example summed NLL and target-token counts, for padded or packed batches, plain or chunked.

Every loss in distlora is sum(token NLL) / target tokens, so the forward returns per-example sums:
the loop sums them over the accumulation window, eval gathers them per example id.

- Padded batches (one example per row): `input_ids`, `attention_mask`, `labels`.
- Packed batches (`data.packing`): several examples per row, `position_ids` restarting at 0 for each
  example and no attention mask. On a varlen attention (flash, distlora's per-segment sdpa) the rows
  are flattened to one and the example boundaries passed as kwargs (`packed_view`, distlora.attention);
  the loss reads labels and example_index from the same flattened view. On eager, transformers
  (`masking_utils.find_packed_sequence_indices`) builds the block-diagonal causal mask from the
  position ids. That detection only runs without a KV cache, hence `use_cache=False` on every
  training forward.
  `example_index` maps each token to its example's slot in `ids`; each example's first label is
  IGNORE (the collator sets it), so no token is trained on the previous example's last token.
- Chunked loss (`train.loss_chunk_size` > 0): the model runs with `logits_to_keep=1` (its own lm_head
  sees one position), the body's final hidden states are captured with a forward hook, and lm_head +
  cross-entropy run over the target positions only, `chunk` tokens at a time, each chunk under
  `torch.utils.checkpoint`: backward recomputes one chunk's logits at a time instead of keeping
  all of them. Peak logits memory: chunk x vocab instead of batch x seq x vocab in fp32. The call
  still goes through the (DDP-/PEFT-wrapped) model's forward, so DDP's sync logic is untouched, and
  lm_head is called as a module, so a LoRA-adapted or `modules_to_save` lm_head trains as usual.
- Fused loss (`train.loss_impl: liger`, CUDA only, `pip install 'distlora[liger]'`): the same hidden
  states and target positions go to liger-kernel's fused lm_head + cross-entropy
  (`liger_fused_linear_cross_entropy`: logits in chunks inside the kernel, gradients of the hidden
  states and of lm_head's weight computed in the forward). The training loop asks for the micro
  batch's sum (`batch_nll`: reduction "sum", liger's fast path); per-example sums (eval) use
  reduction "none". It takes lm_head's weight and bias, not the module: lm_head must be a plain
  `nn.Linear` (or a `modules_to_save` copy of one), held whole by this process. A LoRA-adapted,
  quantized or sharded (ZeRO-3, FSDP) lm_head is refused with a message naming the field.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def shifted_nll(logits, target):
    """Token NLL (rows x positions) of the first target-width positions of `logits` against `target`
    (= labels[:, 1:]; one position fewer than logits, or as many on a sequence-parallel shard, whose
    labels reach one token into the next shard), in the (tokens, vocab) layout of transformers' own
    loss: gradients then match Trainer's bit for bit."""
    b, t, v = logits[:, : target.shape[1], :].shape
    flat = logits[:, :t, :].float().reshape(-1, v)
    return F.cross_entropy(flat, target.reshape(-1), ignore_index=IGNORE, reduction="none").view(b, t)


def token_nll(logits, labels):
    """Per-row summed NLL and target-token counts (labels are aligned with inputs; shift here)."""
    target = labels[:, 1:]
    return shifted_nll(logits, target).sum(dim=1), (target != IGNORE).sum(dim=1)


def model_inputs(batch, model=None) -> dict:
    """Forward kwargs for a padded or a packed batch (packed: position ids, no attention mask; on a varlen
    attention of `model`, the rows flattened to one with the segment kwargs: distlora.attention)."""
    if "position_ids" in batch:
        if model is not None:
            batch = packed_view(model, batch)
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None}
        return {**kwargs, **batch.get("attn_kwargs", {})}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def packed_view(model, batch) -> dict:
    """`batch` laid out as `model`'s attention takes it; the loss reads labels and example_index from the same view."""
    from distlora.attention import for_model

    return for_model(_hf_model(model).config, batch)


def _hf_model(model):
    """The transformers model inside DDP / PEFT wrappers (its submodules carry the LoRA layers)."""
    m = getattr(model, "module", model)  # DDP
    if hasattr(m, "get_base_model"):  # PeftModel
        m = m.get_base_model()
    return m


def _check_plain_head(hf, field: str, fix: str) -> None:
    conf = hf.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(conf, attr, None) not in (None, 1, 1.0):
            raise ValueError(
                f"{field}: {type(hf).__name__} transforms its logits ({attr}={getattr(conf, attr)}), which "
                f"this loss does not reproduce; {fix}"
            )


def _chunk_nll(head, h, y):
    return F.cross_entropy(head(h).float(), y, reduction="none")


def chunked_target_nll(head, hidden, target, chunk: int):
    """NLL of each row of `hidden` [N, H] for `target` [N], `chunk` rows at a time, logits recomputed in
    backward, except the last chunk's: backward starts with it, while every activation is still held, so
    a recompute there would allocate the same logits at the same moment; keeping them costs no peak memory
    and saves its lm_head forward (all of the recompute when the targets fit in one chunk)."""
    out = []
    last = (hidden.shape[0] - 1) // chunk * chunk if hidden.shape[0] else 0
    for i in range(0, hidden.shape[0], chunk):
        h, y = hidden[i : i + chunk], target[i : i + chunk]
        if torch.is_grad_enabled() and i != last:
            out.append(checkpoint(_chunk_nll, head, h, y, use_reentrant=False))
        else:
            out.append(_chunk_nll(head, h, y))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _hidden_states(model, kwargs, field="train.loss_chunk_size", fix="set train.loss_chunk_size=0"):
    """Final hidden states of the model's body (what lm_head consumes), from a full forward of `model`."""
    hf = _hf_model(model)
    _check_plain_head(hf, field, fix)
    body = hf.get_decoder()
    captured = {}

    def hook(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output.last_hidden_state
        dev = h.device.type
        # the autocast state the model's own lm_head would run under (accelerate wraps forward only)
        captured["h"], captured["autocast"] = h, (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))

    handle = body.register_forward_hook(hook)
    try:
        model(**kwargs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["h"], hf.get_output_embeddings(), captured["autocast"]


def example_nll(model, batch, chunk: int = 0, impl: str = "torch"):
    """(summed NLL, target tokens) per example of `batch["ids"]`, in that order."""
    if impl == "liger":
        return _liger_nll(model, batch, per_example=True)
    batch = packed_view(model, batch)
    kwargs = model_inputs(batch)
    labels = batch["labels"]
    target = labels[:, 1:]
    packed = "example_index" in batch
    if chunk <= 0:
        logits = model(**kwargs, use_cache=False).logits
        if not packed:
            return token_nll(logits, labels)
        nll = shifted_nll(logits, target)
        return _per_example(nll.flatten(), target.flatten(), batch["example_index"][:, 1:].flatten(), len(batch["ids"]))
    hidden, head, (dev, dtype, enabled) = _hidden_states(model, kwargs)
    with torch.autocast(dev, dtype=dtype, enabled=enabled):
        return _chunked_example_nll(hidden, head, batch, chunk)


def batch_nll(model, batch, chunk: int = 0, impl: str = "torch"):
    """Summed target-token NLL of the whole micro batch (a 0-d fp32 tensor): what the loop back-propagates."""
    if impl == "liger":
        return _liger_nll(model, batch, per_example=False)
    return example_nll(model, batch, chunk)[0].sum()


def _target_positions(batch, keep):
    """Flat indices (row-major over `keep`, the target mask of labels[:, 1:]) of the micro batch's target
    tokens, and each one's slot in `ids`. The count comes from the collator (host) and `nonzero_static`
    takes it as the output size: selecting the targets reads nothing back from the device."""
    pos = torch.nonzero_static(keep.reshape(-1), size=batch["host"]["targets"]).squeeze(1)
    if "example_index" in batch:  # packed
        return pos, batch["example_index"][:, 1:].reshape(-1)[pos]
    return pos, pos // keep.shape[1]


def _target_hidden(hidden, pos, width: int):
    """Rows of `hidden` [B, L, H] one position before each target position `pos` (flat over [B, width]:
    width L - 1, or L on a sequence-parallel shard)."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # a view: no copy of the whole batch's hidden states
    return flat.index_select(0, pos // width * hidden.shape[1] + pos % width)


def _chunked_example_nll(hidden, head, batch, chunk):
    labels = batch["labels"]
    target = labels[:, 1:]
    if batch["host"]["targets"] == 0:
        # A micro batch of padding examples: no target, but backward must still reach every trainable
        # parameter (DDP expects each one's gradient, here zero), as the plain loss's graph does.
        n = len(batch["ids"])
        zero = 0.0 * chunked_target_nll(head, hidden[:1, 0], labels.new_zeros(1), chunk)
        sums = torch.zeros(n, dtype=zero.dtype, device=zero.device).index_add(0, labels.new_zeros(1), zero)
        return sums, torch.zeros(n, dtype=torch.long, device=labels.device)
    pos, owner = _target_positions(batch, target != IGNORE)
    h = _target_hidden(hidden, pos, target.shape[1])  # only target positions reach lm_head
    nll = chunked_target_nll(head, h, target.reshape(-1)[pos], chunk)
    return _sum_by_owner(nll, owner, len(batch["ids"]))


def _per_example(nll, target, owner, n):
    """Per-example sums over every position (an ignored target's NLL is 0): no selection, no device read."""
    return _sum_by_owner(nll, owner, n, (target != IGNORE).long())


def _sum_by_owner(nll, owner, n, counted=None):
    """Per-example sums of token NLLs and token counts; `owner` holds each token's slot in `ids`,
    `counted` (default: all ones) whether the token is a target."""
    sums = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, owner, nll)
    counted = torch.ones_like(owner) if counted is None else counted
    counts = torch.zeros(n, dtype=torch.long, device=nll.device).index_add(0, owner, counted)
    return sums, counts


# ---------------------------------------------------------------------------------------------
# liger-kernel's fused lm_head + cross-entropy (train.loss_impl: liger)


def _liger_nll(model, batch, per_example: bool):
    """The fused loss over the batch's target positions, chosen exactly as the chunked path chooses them
    (labels[:, 1:] against the hidden state one position earlier; packed rows' first label per example
    is IGNORE): per-example (sums, counts), or the batch's summed NLL."""
    batch = packed_view(model, batch)
    hidden, head, (dev, dtype, enabled) = _hidden_states(
        model, model_inputs(batch), field="train.loss_impl", fix="set train.loss_impl=torch"
    )
    labels = batch["labels"]
    target = labels[:, 1:]
    n = len(batch["ids"])
    empty = batch["host"]["targets"] == 0
    if empty:
        # A micro batch of padding examples: one ignored row (NLL 0, zero gradient) keeps every trainable
        # parameter in the graph, as the plain and chunked losses do (DDP expects each one's gradient).
        h, y = hidden[:1, 0], labels.new_full((1,), IGNORE)
    else:
        pos, owner = _target_positions(batch, target != IGNORE)
        h, y = _target_hidden(hidden, pos, target.shape[1]), target.reshape(-1)[pos]  # only targets reach lm_head
    with torch.autocast(dev, dtype=dtype, enabled=enabled):  # the state the model's own lm_head runs under
        nll = fused_linear_nll(head, h, y, "none" if per_example else "sum")
    if not per_example:
        return nll
    if empty:
        sums = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, labels.new_zeros(1), 0.0 * nll)
        return sums, torch.zeros(n, dtype=torch.long, device=labels.device)
    return _sum_by_owner(nll, owner, n)


def fused_linear_nll(head, hidden, target, reduction: str):
    """liger-kernel's fused `head` + cross-entropy of `hidden` [N, H] for `target` [N] (IGNORE rows give 0):
    fp32 per-row NLL (reduction "none") or their sum ("sum")."""
    lin = _plain_linear(head)
    w = lin.weight
    if type(w) not in (torch.Tensor, torch.nn.Parameter) or w.dim() != 2 or w.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"train.loss_impl: liger reads lm_head's weight directly and needs all of it in this process, but here it is "
            f"a {type(w).__name__} of shape {tuple(w.shape)} (sharded by ZeRO-3 / FSDP, or quantized); "
            "set train.loss_impl=torch (train.loss_chunk_size bounds the logits memory)"
        )
    fused = _liger_ce(hidden.device)
    return fused(input=hidden, weight=w, target=target, bias=lin.bias, ignore_index=IGNORE, reduction=reduction)


def _plain_linear(head) -> torch.nn.Linear:
    """The nn.Linear whose weight and bias `head(x)` applies, or a ValueError naming the field."""
    from peft.utils.other import ModulesToSaveWrapper

    inner = head
    if isinstance(head, ModulesToSaveWrapper):  # lora.modules_to_save: the trained copy, unless adapters are off
        active = head.active_adapters
        inner = head.original_module if head.disable_adapters or not active else head.modules_to_save[active[0]]
    if type(inner) is not torch.nn.Linear:
        raise ValueError(
            f"train.loss_impl: liger computes lm_head from its weight and bias alone, but lm_head here is a "
            f"{type(inner).__name__} (LoRA on lm_head, or a quantized head); drop lm_head from lora.target_modules "
            "(lora.modules_to_save trains it in full), or set train.loss_impl=torch"
        )
    return inner


def _liger_ce(device: torch.device):
    """liger-kernel's functional fused linear + cross-entropy, imported on first use (it needs triton and CUDA)."""
    if device.type != "cuda":
        raise ValueError(
            f"train.loss_impl: liger runs on CUDA GPUs only, and this process computes on {device.type}; "
            "set train.loss_impl=torch"
        )
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy
