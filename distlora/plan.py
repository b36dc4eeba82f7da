"""`distlora plan`: per-GPU memory estimate for a run config, from the model config alone.

The model is built on the meta device (no weights are read or allocated) to count the frozen base
tensors and the LoRA-adapted linear layers; everything else is arithmetic on the run config.
DeepSpeed's own estimator assumes every weight is trainable (18 bytes/param), which is far off for
LoRA, so it is not used.

Model state per rank, by backend (T = trainable adapter elements, N = GPUs, adapters in fp32,
c = compute bytes, B = DeepSpeed's reduce bucket: reduce_bucket_size "auto", which accelerate sets
to hidden^2 elements, allocated whole whatever the adapter's size):
  ddp    frozen base whole; adapter 4T; grads 4T (gradient_as_bucket_view: the gradients are views
         of the all-reduce buckets, not a second copy); Adam moments 8T
  zero2  frozen base whole; adapter cT (the engine casts the module); fp32 master 4T/N; grads
         c(B + T/N) while the backward epilogue reduces the last bucket into this rank's partition,
         plus another cT/N with accumulation (the window's partition so far and the micro step's);
         at least the fp32 copy (4T/N) the update steps with; moments 8T/N
  zero3  frozen base 1/N (every tensor partitioned, ceil); adapter cT/N; fp32 master 4T/N; grads
         c(B + T/N) (bucket and partition buffer, both allocated once) + the fp32 copy (4T/N) the
         update steps with; moments 8T/N
  fsdp2  frozen base 1/N; adapter 4T/N (fp32 sharded params, no separate master); grads 4T/N;
         moments 8T/N
The gradient rows are each backend's peak within a step: what the GradientBytes test hook (tests/hooks)
measures at the start of every micro step, around ZeRO's backward epilogue and before the optimizer
update. tests/test_backends.py checks parameters, master weights, gradients and optimizer state
against the bytes measured per rank for DDP, ZeRO-2 and ZeRO-3 on 2 processes (fp32 there: the
bf16 dtypes above are read from deepspeed 0.19.8's runtime/zero/stage_1_and_2.py and stage3.py),
and the activation count against torch.autograd.graph.saved_tensors_hooks on CPU.

Activations (decoder layers of the Llama family: RMSNorm, rotary attention, gated MLP), per layer
per token, in the compute dtype: layer input and RMSNorm output (x2 norms), q after RoPE, k and v
(repeated to all heads for GQA), attention output (also o_proj's input: one tensor, measured), gate,
SiLU(gate), up and their product (4 x intermediate), and each adapted layer's LoRA-A output (r).
Per layer and row, quadratic in the row length L: sdpa keeps the additive [L, L] mask it makes of
the boolean one transformers passes (padded batches; packed rows' block-diagonal mask), eager keeps
the attention probabilities per head (the fp32 softmax output, plus its cast under 16-bit compute),
flash/flex attention neither. Under a token budget (train.micro_batch_tokens) a micro batch is one
packed row of the budget's length, so this term grows with the square of the budget.
With gradient checkpointing only each layer's input is kept, plus one layer's activations while
it is recomputed in backward. Logits: the [micro, seq, vocab] output plus the fp32 log-softmax
the loss keeps (and an fp32 copy when the compute dtype is 16-bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from distlora.config import LAUNCH_BACKENDS as BACKENDS

MIB = 2**20


@dataclass
class ModelShape:
    frozen_numels: list[int]  # every frozen base tensor's element count
    quantizable: list[bool]  # per frozen tensor: a linear weight bitsandbytes would store in 4 bits
    trainable: int  # adapter elements (LoRA A/B, DoRA magnitudes, modules_to_save copies)
    adapted_layers: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    head_dim: int
    vocab: int
    lora_r: int


@dataclass
class Plan:
    backend: str
    gpus: int
    micro_batch_size: int
    seq_len: int
    param_bytes: int  # the frozen base's dtype
    compute_bytes: int
    rows: dict[str, int] = field(default_factory=dict)  # name -> bytes per GPU
    notes: list[str] = field(default_factory=list)

    @property
    def model_state(self) -> int:
        return sum(self.rows[k] for k in ("frozen_base", "adapter_params", "master_weights", "gradients", "optimizer_state"))

    def total(self, gradient_checkpointing: bool) -> int:
        rows = self.rows
        act = rows["activations_checkpointed"] + rows["checkpoint_recompute"] if gradient_checkpointing else rows["activations"]
        return self.model_state + act + self.rows["logits"]

    def render(self, gradient_checkpointing: bool) -> str:
        lines = [
            f"distlora plan: {self.backend} on {self.gpus} GPU(s), micro batch {self.micro_batch_size} x seq "
            f"{self.seq_len}; base {self.param_bytes * 8}-bit, compute {self.compute_bytes * 8}-bit",
            f"{'per GPU':36s}{'MiB':>12s}{'bytes':>18s}",
        ]
        for k, v in self.rows.items():
            lines.append(f"  {k:34s}{v / MIB:12,.1f}{v:18,d}")
        for gc in (False, True):
            mark = "  <- this run" if gc == gradient_checkpointing else ""
            t = self.total(gc)
            lines.append(f"  {'total, gradient checkpointing ' + ('on' if gc else 'off'):34s}{t / MIB:12,.1f}{t:18,d}{mark}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def model_shape(cfg) -> ModelShape:
    """Counts from the model config on the meta device: no weights are read. What trains is counted
    by PEFT itself, wrapping the model with the run's LoRA config (model.lora_config)."""
    import torch
    from peft.tuners.lora import LoraLayer

    from distlora.model import meta_lora_model, meta_model, param_counts

    m = meta_model(cfg.model)
    conf = m.config
    out_emb = m.get_output_embeddings()
    named = list(m.named_parameters())  # the frozen base, before PEFT adds adapters and trainable copies
    linear_weights = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not out_emb}
    peft_model = meta_lora_model(cfg, base=m)
    trainable = param_counts(peft_model)["trainable_params"]
    adapted = sum(1 for mod in peft_model.modules() if isinstance(mod, LoraLayer))
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    heads = text.num_attention_heads
    return ModelShape(
        frozen_numels=[p.numel() for _, p in named],
        quantizable=[n in linear_weights for n, _ in named],
        trainable=trainable,
        adapted_layers=adapted,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        layers=text.num_hidden_layers,
        heads=heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        lora_r=cfg.lora.r,
    )


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def estimate(cfg, gpus: int, backend: str, shape: ModelShape | None = None, gpu_bf16: bool = True) -> Plan:
    """Bytes per GPU. Precision "auto" resolves as on a bf16-capable GPU unless gpu_bf16=False."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
    if gpus < 1:
        raise ValueError("gpus must be at least 1")
    s = shape or model_shape(cfg)
    t = cfg.train
    mp = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if gpu_bf16 else "no")
    compute = {"bf16": 2, "fp16": 2, "no": 4}[mp]
    pbytes = _dtype_bytes(cfg.model.dtype) if cfg.model.dtype != "auto" else compute
    n = gpus
    sharded = backend in ("zero3", "fsdp2")
    T = s.trainable

    q = cfg.model.quantization
    if q is not None:  # QLoRA: 4-bit linear weights + fp32 absmax per 64 (or 8-bit absmax + fp32 per 256 blocks)
        pbytes = _dtype_bytes(q.compute_dtype)
        per_q = (4 + (8 / 64 + 32 / (64 * 256) if q.double_quant else 32 / 64)) / 8
    frozen = 0.0
    for k, is_linear in zip(s.frozen_numels, s.quantizable):
        per = per_q if q is not None and is_linear else pbytes
        frozen += (math.ceil(k / n) if sharded else k) * per
    frozen = int(frozen)
    bucket = s.hidden * s.hidden  # DeepSpeed's reduce_bucket_size "auto" (elements), allocated whole
    part = math.ceil(T / n)  # this rank's partition of the adapter
    if backend == "ddp":
        adapter, master, grads, opt = 4 * T, 0, 4 * T, 8 * T
    elif backend == "zero2":
        partitions = 2 if t.gradient_accumulation_steps > 1 else 1  # the window's so far + the micro step's
        grads = max(compute * (bucket + partitions * part), 4 * part)
        adapter, master, opt = compute * T, 4 * part, 8 * part
    elif backend == "zero3":
        adapter, master, grads, opt = compute * part, 4 * part, compute * (bucket + part) + 4 * part, 8 * part
    else:  # fsdp2
        adapter, master, grads, opt = 4 * part, 0, 4 * part, 8 * part

    budget = t.micro_batch_tokens if cfg.data.packing else None
    b, L = (1, budget) if budget else (t.micro_batch_size, cfg.data.max_seq_len)  # a budget: one packed row
    tok = b * L
    h, i, a, d = s.hidden, s.intermediate, s.heads, s.head_dim
    r_per_layer = s.lora_r * s.adapted_layers / max(s.layers, 1)
    norm_bytes = 4 if compute < 4 else 0  # RMSNorm keeps an fp32 copy of its input under 16-bit compute
    attn = cfg.model.attn_implementation or "sdpa"  # transformers' choice for Llama-family models when unset
    eager = attn == "eager"
    if "flash" in attn or "flex" in attn:
        square = 0  # varlen / block-sparse kernels: no [L, L] tensor is kept
    elif eager:
        square = a * (4 + (compute if compute < 4 else 0))  # probabilities per head: fp32 softmax (+ its cast)
    else:
        square = compute  # sdpa: the additive mask, one per layer
    per_layer = tok * (
        compute * (4 * h + 4 * a * d + 4 * i + r_per_layer)  # see the module doc
        + norm_bytes * 2 * h
        + 2 * 4  # two RMSNorm rsqrt values per token (fp32)
    ) + (0 if eager else b * a * L * 4) + b * L * L * square  # log-sum-exp per head and token; the [L, L] term
    rest = tok * (compute * h + norm_bytes * h + 4) + tok * 8  # final norm (input, rsqrt), token ids
    rope = tok * d * 2 * compute  # cos/sin tables, kept by every layer's RoPE (not outside checkpointed layers)
    per_layer, rest = int(per_layer), int(rest)
    activations = s.layers * per_layer + rest + rope
    checkpointed = s.layers * tok * h * compute + rest  # each layer's input only
    logits = tok * s.vocab * (compute + 4 + (4 if compute < 4 else 0))

    plan = Plan(backend, n, b, L, pbytes, compute)
    if q is not None:
        plan.notes.append(f"QLoRA: linear weights in 4-bit {q.type} ({per_q * 8:.3f} bits/param with scales); "
                          f"embeddings, norms and the output layer in {q.compute_dtype}")
    plan.rows = {
        "frozen_base": frozen,
        "adapter_params": adapter,
        "master_weights": master,
        "gradients": grads,
        "optimizer_state": opt,
        "activations": activations,
        "activations_checkpointed": checkpointed,
        "checkpoint_recompute": per_layer,  # one layer's activations, live while it is recomputed in backward
        "logits": logits,
    }
    plan.notes.append(
        f"{T:,} trainable adapter parameters in {s.adapted_layers} layers; frozen base "
        f"{sum(s.frozen_numels):,} parameters"
    )
    if backend in ("zero2", "zero3"):
        plan.notes.append(f"ZeRO keeps fp32 master copies of the adapter partition; gradients include one reduce "
                          f"bucket of {bucket:,} elements (reduce_bucket_size \"auto\" = hidden^2; a number in the "
                          "DeepSpeed JSON changes it)")
    if budget:
        plan.notes.append(f"token budget: each micro batch is one packed row of up to {budget} tokens "
                          "(train.micro_batch_tokens), the shape used above")
    if square:
        per = s.layers * b * L * L * square
        plan.notes.append(f"attention ({attn}) keeps an [L, L] tensor per layer and row: {per / MIB:,.1f} MiB of the "
                          "activations at this length; flash_attention_2 keeps none")
    plan.notes.append("framework overhead (CUDA context, allocator fragmentation, NCCL buffers) is not included")
    return plan


def main(args) -> int:
    from distlora import config as config_mod

    try:
        cfg = config_mod.load(args.config, args.overrides)
    except config_mod.ConfigError as err:
        import sys

        print(err.render(), file=sys.stderr)
        return 2
    backends = [args.backend] if args.backend else list(BACKENDS)
    plans = [estimate(cfg, args.gpus, b) for b in backends]
    if args.json:
        import json

        print(json.dumps([{"backend": p.backend, "gpus": p.gpus, **p.rows, "model_state": p.model_state,
                           "total": p.total(cfg.model.gradient_checkpointing)} for p in plans], indent=1))
    else:
        print("\n\n".join(p.render(cfg.model.gradient_checkpointing) for p in plans))
    return 0
