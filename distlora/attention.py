"""Packed micro batches on each attention implementation: the route each one takes, the per-segment
sdpa that transformers runs through its AttentionInterface, and the config check.

A packed micro batch (data.PackedCollator) is B rows of examples laid end to end, position ids
restarting at 0 for each example, plus `cu_seq_lens` (int32 segment boundaries over the B rows read
as one flattened row, row padding a segment of its own) and `max_length` (a Python int), both made on
the host. Routes, by `model.config._attn_implementation`:

- varlen: every implementation transformers treats as flash (flash_attention_2/3/4 and flash hub
  kernels), and sdpa, which distlora swaps for VARLEN_SDPA when it loads a model for a packed run.
  The B rows are flattened to one row (labels and example_index with them) and the boundaries travel
  as transformers' flash kwargs `cu_seq_lens_q/k`, `max_length_q/k`: flash calls its varlen kernel
  with them; VARLEN_SDPA runs one causal sdpa per segment, so no [B, 1, L, L] mask is built and no
  work is spent across examples (measured on CPU: benchmarks/packed_attention.py). Not flattening
  is the trap: transformers derives flash boundaries from position ids only for ONE row, and with
  B > 1 rows examples attend to each other.
- dense: eager (transformers builds the block-diagonal [B, 1, L, L] mask from the position ids),
  and flex_attention on CUDA (a BlockMask from the same position ids; its backward does not run on CPU).
- refused at config time (`packing_problem`): flex_attention without a CUDA GPU, and any other
  implementation, whose packed behaviour distlora cannot vouch for.

The names and the check import no torch (the launcher layer calls them); the rest imports it lazily.
"""

from __future__ import annotations

VARLEN_SDPA = "distlora_sdpa_varlen"
SP_ATTN = "distlora_sp_sdpa"  # distlora.sequence_parallel's all-to-all attention


def is_flash(impl: str | None) -> bool:
    """transformers' own rule (utils.generic.is_flash_attention_requested): "flash" in the name."""
    return impl is not None and "flash" in impl


def uses_varlen(impl: str | None) -> bool:
    """Packed batches reach this implementation flattened to one row, with cu_seq_lens / max_length kwargs."""
    return impl == VARLEN_SDPA or is_flash(impl)


def packing_problem(impl: str | None, packing: bool, cuda: bool | None = None) -> str | None:
    """One line naming model.attn_implementation and data.packing when packed batches cannot be made exact
    on `impl`; None when they can. `cuda`: whether this machine has a CUDA GPU (None: not known here)."""
    if not packing or impl in (None, "sdpa", "eager") or (is_flash(impl) and not impl.startswith("paged|")):
        return None
    fix = "set model.attn_implementation to sdpa, eager or flash_attention_2, or data.packing=false"
    if impl == "flex_attention":
        if cuda is False:
            return (f"model.attn_implementation: flex_attention with data.packing runs its backward on CUDA GPUs only "
                    f"and this machine has none; {fix}")
        return None
    return (f"model.attn_implementation: '{impl}' with data.packing: distlora keeps packed examples apart only on "
            f"sdpa, eager, flash-attention and (CUDA) flex_attention; {fix}")


# ---------------------------------------------------------------------------------------------
# torch from here on


def flatten(batch: dict) -> dict:
    """A packed batch's B rows as one row, with the kwargs that give the attention its segments."""
    rows = {k: batch[k].reshape(1, -1) for k in ("input_ids", "labels", "position_ids", "example_index")}
    cu, m = batch["cu_seq_lens"], batch["max_length"]
    return {**batch, **rows, "attn_kwargs": {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}}


def for_model(model_config, batch: dict) -> dict:
    """The batch as this model's attention takes it: packed and varlen -> flattened, else as it is."""
    impl = model_config._attn_implementation
    if impl == SP_ATTN:  # a sequence-parallel shard: the full rows' segments, from the host (data.SequenceShard)
        return {**batch, "attn_kwargs": {"sp_bounds": batch["host"]["sp_bounds"]}}
    if "cu_seq_lens" in batch and uses_varlen(impl):
        flat = flatten(batch)
        if impl == VARLEN_SDPA and "host" in batch:  # the segments as the collator made them, on the host
            flat["attn_kwargs"]["segment_bounds"] = batch["host"]["cu_seq_lens"]
        return flat
    return batch


def use_varlen_sdpa(model) -> None:
    """Swap a loaded model's sdpa for VARLEN_SDPA (packed runs). Models that do not dispatch attention
    through transformers' AttentionInterface keep sdpa: they stay on the dense route, which is exact."""
    register()
    if model.config._attn_implementation == "sdpa" and model._can_set_attn_implementation():
        model.set_attn_implementation(VARLEN_SDPA)


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)


def varlen_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No mask without a padding mask (packed or plain rows: the attention function reads the segments);
    a padded batch gets sdpa's own mask."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


_bounds_of = [None, None]  # (cu_seq_lens tensor, its list): without host bounds, one device read per forward


def _bounds(cu) -> list[int]:
    if _bounds_of[0] is not cu:
        _bounds_of[:] = [cu, cu.tolist()]
    return _bounds_of[1]


def varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, cu_seq_lens_q=None, cu_seq_lens_k=None, sliding_window=None,
                        segment_bounds=None, **kwargs):
    """transformers' attention-function contract (query [B, H, T, D], key/value [B, Hkv, T, D] -> output
    [B, T, H, D], None). With `cu_seq_lens_q` (a flattened packed row): one sdpa per segment. Without
    it: a padding mask goes to transformers' sdpa; no mask (plain or packed rows) takes the segments
    from the position ids, so the result is exact whoever calls."""
    import itertools

    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa

    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"model.attn_implementation: sdpa with data.packing does not support {name} "
                             "(this model uses it); set model.attn_implementation=eager")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    b, _, t, _ = query.shape
    if cu_seq_lens_q is None:
        position_ids = kwargs.get("position_ids")
        if attention_mask is not None or position_ids is None or key.shape[2] != t or t == 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, sliding_window=sliding_window, **kwargs)
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        (cu_seq_lens_q, cu_seq_lens_k), _ = prepare_fa_kwargs_from_position_ids(position_ids.expand(b, -1))
        query, key, value = (x.transpose(0, 1).reshape(1, x.shape[1], b * t, x.shape[3]) for x in (query, key, value))
    elif b != 1 or (cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k, cu_seq_lens_q)):
        raise ValueError("distlora's per-segment sdpa takes one flattened row with equal query and key segments")
    # grouped-query heads: sdpa's own GQA where transformers' sdpa would use it (no mask, head dim <= 256),
    # else key/value repeated to every head. Repeated copies are what backward keeps: measured on CPU,
    # 4 query heads per kv head, they triple the bytes attention saves per layer (6 MiB vs 2 at 512 tokens).
    gqa = sliding_window is None and use_gqa_in_sdpa(None, key, value)
    if not gqa:
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    extra = {"enable_gqa": True} if gqa and key.shape[1] != query.shape[1] else {}
    bounds = segment_bounds or _bounds(cu_seq_lens_q)  # the collator's host list: no device read
    if bounds[-1] != b * t:
        raise ValueError(f"cu_seq_lens cover {bounds[-1]} tokens, the row holds {b * t}")
    # one split per tensor, not a slice per segment: a slice's backward writes its gradient into a zeroed
    # copy of the whole row, so per-segment slices cost segments x row-size fills and adds per layer
    # (measured on CPU, 27 segments a micro batch: 18% of a packed step's op time); split's backward is one cat
    sizes = [e - s for s, e in itertools.pairwise(bounds)]
    out = []
    for n, q, k, v in zip(sizes, query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2)):
        mask = None
        if sliding_window is not None and n > sliding_window:  # transformers' band: q - kv < window
            d = torch.arange(n, device=query.device)
            lag = d[:, None] - d[None, :]
            mask = (lag >= 0) & (lag < sliding_window) if causal else lag.abs() < sliding_window
        out.append(F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal and mask is None, **extra,
        ))
    o = out[0] if len(out) == 1 else torch.cat(out, dim=2)  # [1, H, b * t, D]
    return o.reshape(o.shape[1], b, t, o.shape[3]).permute(1, 2, 0, 3).contiguous(), None
