"""Sequence parallelism (train.sequence_parallel_size = N), Ulysses-style, on every backend.

Layout: the world's ranks form groups of N consecutive ranks (rank r is sequence-parallel rank r % N of
data-parallel rank r // N); the N ranks of a group get the same micro batches (data.py deals each micro
batch to all of them) and the collator gives each one 1/N of every row's tokens (data.shard_for_sp).
Consecutive ranks keep a group on one node when N divides the GPUs per node: the all-to-all then stays
on NVLink.

Attention (SP_ATTN, registered through transformers' AttentionInterface, so DDP, ZeRO-2/3 and FSDP2
run it alike): query/key/value arrive as [B, heads, L/N, d] on each rank of the group; one all-to-all
each turns them into [B, heads/N, L, d] (the whole row, a slice of the heads), distlora's per-segment
sdpa (distlora.attention) runs causal attention on each segment of the FULL row (each packed example,
or each padded row), whose bounds the collator made on the host before sharding, and an all-to-all
turns the output back into [B, L/N, heads, d]. torch.distributed.nn.functional.all_to_all_single carries the
gradient back through the same exchange, so a rank's gradient includes what other ranks' tokens send
through its projections; the backend's world-wide gradient average, undone by the loop's loss scale
(backends/base.py loss_scale), then sums every rank's disjoint tokens once.

Key/value heads: split like the query heads when N divides their count; otherwise (GQA with fewer kv
heads than N, or a count N does not divide) repeated to the query heads first, which costs the
repeated copies' memory and traffic. Query heads that N does not divide are refused.

The names and checks at the top import no torch (the launcher layer calls them).
"""

from __future__ import annotations

from distlora.attention import SP_ATTN, VARLEN_SDPA  # light: no torch at import
FIELD = "train.sequence_parallel_size"


def world_problem(n: int, world: int) -> str | None:
    """One line naming the field when N sequence-parallel ranks cannot be formed from `world` processes."""
    if n <= 1 or world % n == 0:
        return None
    return (f"{FIELD}: {n} does not divide the {world} processes launched; launch a multiple of {n} processes "
            f"or set {FIELD} to a divisor of {world}")


def heads_problem(n: int, heads: int | None) -> str | None:
    """One line naming the field when the model's query heads cannot be split over N ranks."""
    if n <= 1 or heads is None or heads % n == 0:
        return None
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    return (f"{FIELD}: {n} does not divide the model's {heads} attention heads (each rank attends with a whole "
            f"number of heads); use one of {divisors}")


def attention_problem(n: int, impl: str | None) -> str | None:
    """The attention implementations sequence parallelism runs on: sdpa (the default), swapped for SP_ATTN."""
    if n <= 1 or impl in (None, "sdpa"):
        return None
    return (f"model.attn_implementation: '{impl}' with {FIELD}={n}: distlora's sequence-parallel attention "
            "runs sdpa per segment after its all-to-all; set model.attn_implementation=sdpa (or leave it unset)")


def model_heads(name_or_path: str) -> int | None:
    """The query-head count in a local model directory's config.json (None: not local, or not stated)."""
    import json
    from pathlib import Path

    f = Path(name_or_path).expanduser() / "config.json"
    try:
        conf = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    conf = conf.get("text_config", conf) if "num_attention_heads" not in conf else conf
    return conf.get("num_attention_heads")


def launch_problems(cfg, world: int) -> list[str]:
    """Before any model loads (the launcher, and each worker before its accelerator): N divides the
    world and the model's heads."""
    n = cfg.train.sequence_parallel_size
    found = [world_problem(n, world), heads_problem(n, model_heads(cfg.model.name_or_path) if n > 1 else None)]
    return [p for p in found if p]


# ---------------------------------------------------------------------------------------------
# torch from here on

_STATE = {"group": None, "size": 1, "rank": 0}


def init(process_index: int, world: int, n: int) -> None:
    """Make the world's groups of N consecutive ranks (every rank creates every group, as torch
    requires) and keep this rank's group for the attention."""
    if n <= 1:
        _STATE.update(group=None, size=1, rank=0)
        return
    import torch.distributed as dist

    problem = world_problem(n, world)
    if problem:
        raise ValueError(problem)
    mine = None
    for g in range(world // n):
        group = dist.new_group(list(range(g * n, (g + 1) * n)))
        if g == process_index // n:
            mine = group
    _STATE.update(group=mine, size=n, rank=process_index % n)


def size() -> int:
    return _STATE["size"]


def rank() -> int:
    return _STATE["rank"]


def use(model) -> None:
    """Swap the loaded model's sdpa for SP_ATTN; refuse a model whose heads N does not divide or whose
    attention does not go through transformers' AttentionInterface (it would attend to its shard alone)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from distlora.attention import varlen_sdpa_mask

    n = size()
    problem = heads_problem(n, getattr(model.config, "num_attention_heads", None))
    impl = model.config._attn_implementation
    problem = problem or attention_problem(n, None if impl == VARLEN_SDPA else impl)  # packed runs load it on sdpa
    if problem:
        raise ValueError(problem)
    AttentionInterface.register(SP_ATTN, sp_attention_forward)
    AttentionMaskInterface.register(SP_ATTN, varlen_sdpa_mask)
    if not model._can_set_attn_implementation():
        raise ValueError(f"{FIELD}: {type(model).__name__} does not dispatch attention through transformers' "
                         f"AttentionInterface, so its attention would see one shard only; set {FIELD}=1")
    model.set_attn_implementation(SP_ATTN)


def _exchange(x, scatter: int, gather: int):
    """All-to-all in the group: `x` cut into N pieces along dim `scatter`, piece i sent to rank i, the
    pieces received concatenated along dim `gather` in rank order (with a backward: the reverse exchange)."""
    import torch
    import torch.distributed.nn.functional as dist_fn

    n = _STATE["size"]
    # one all_to_all_single over the pieces stacked on a new leading dim; its list form runs on gloo as
    # scatters that name the group rank as a global one (torch 2.13), wrong for any group but the first
    sent = torch.stack(x.chunk(n, dim=scatter))
    received = dist_fn.all_to_all_single(torch.empty_like(sent), sent, group=_STATE["group"])
    return torch.cat(received.unbind(0), dim=gather)


def sp_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, sliding_window=None, sp_bounds=None, **kwargs):
    """transformers' attention-function contract on one shard (query [B, H, L/N, D], key/value
    [B, Hkv, L/N, D] -> [B, L/N, H, D], None). `sp_bounds`: segment bounds over the B full rows read as
    one flattened row (a host list from the collator: no device read)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from distlora import hooks
    from distlora.attention import varlen_sdpa_forward

    n = _STATE["size"]
    if attention_mask is not None:
        raise ValueError(f"{FIELD}: sequence-parallel batches carry no attention mask (right padding, segments "
                         "from the collator); this batch has one")
    if sp_bounds is None:
        raise ValueError(f"{FIELD}: this forward has no segment bounds (sp_bounds): run it on a batch from "
                         "distlora's sequence-parallel collator")
    if key.shape[1] % n:
        key, value = (repeat_kv(x, query.shape[1] // key.shape[1]) for x in (key, value))
    q, k, v = (_exchange(x, 1, 2) for x in (query, key, value))  # [B, heads/N, L, D]
    b, h, t, d = q.shape
    if sp_bounds[-1] != b * t:
        raise ValueError(f"sequence-parallel segments cover {sp_bounds[-1]} tokens, the gathered rows hold {b * t}")
    q, k, v = (x.transpose(0, 1).reshape(1, x.shape[1], b * t, d) for x in (q, k, v))  # rows -> one row
    bounds = hooks.transform("sp_bounds", sp_bounds)  # a test swaps in stock Ulysses' one causal row here
    out, _ = varlen_sdpa_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=is_causal,
                                 cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, sliding_window=sliding_window,
                                 segment_bounds=bounds, **kwargs)
    # [1, b*t, h, D] -> [b, h, t, D] -> exchange back to [b, H, t/N, D] -> [b, t/N, H, D]
    out = out.reshape(b, t, h, d).transpose(1, 2)
    return _exchange(out, 2, 1).transpose(1, 2).contiguous(), None
