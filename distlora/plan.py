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
the boolean one transformers passes (padded batches; packed rows run one sdpa per example without a
mask: distlora.attention), eager keeps
the attention probabilities per head (the fp32 softmax output, plus its cast under 16-bit compute),
flash/flex attention neither. Under a token budget (train.micro_batch_tokens) a micro batch is one
packed row of the budget's length, so this term grows with the square of the budget.
With gradient checkpointing only each layer's input is kept, plus one layer's activations while
it is recomputed in backward. Logits: three fp32 [tokens, vocab] tensors live together at the
loss: the model's output (fp32 under 16-bit compute too: accelerate's convert_outputs_to_fp32), the
flattened copy of its shifted view that cross-entropy reads (logits[:, :-1] is not contiguous), and
the log-softmax (kept for backward, whose gradients again hold about three). Measured on CPU (fp32,
271M parameters, one packed row of 512 tokens, vocab 32,000): peak RSS of the step 2,045 MiB over the
post-import baseline; with two fp32 tensors here the plan said 1,826 (-10.7%), with three 1,889
(-7.6%, the rest is the allocator's retained memory from loading). With train.loss_chunk_size > 0
the same per token, for one chunk of target tokens at a time (the model itself returns logits for
one position: logits_to_keep=1).

"auto" memory settings (`resolve_memory`, the one rule the launcher, `distlora plan` and the trainer
apply): on CUDA GPUs the chunked loss is on (AUTO_CHUNK tokens; 0 under loss_impl liger, which
chunks itself) and gradient checkpointing is on when the plan without it exceeds USABLE_FRACTION of
the device's memory; without a GPU (CPU runs) both stay off. A run whose resolved plan still exceeds
USABLE_FRACTION of the device is refused before any worker starts, naming the fixes that fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from distlora.config import LAUNCH_BACKENDS as BACKENDS

MIB = 2**20
GIB = 2**30
# Of the device's memory, what the plan may fill: the plan leaves out the CUDA context (~0.5 GiB),
# allocator fragmentation and NCCL buffers, a few GiB together on an 80 GB card.
USABLE_FRACTION = 0.9
# Target tokens per lm_head + cross-entropy chunk when train.loss_chunk_size is auto on a GPU: the
# fp32 logits of a chunk are AUTO_CHUNK x vocab x 4 bytes (0.5 GiB at a 128k vocab), and the chunk's
# lm_head recompute in backward costs one extra lm_head forward per target token (2 x hidden x vocab:
# 1.05 GFLOP at Llama-3-8B's shape, ~3% of LoRA's ~4N = 32 GFLOP per token).
AUTO_CHUNK = 1024


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
    loss_chunk: int = 0  # target tokens per lm_head + cross-entropy chunk; 0 = all at once
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


def estimate(cfg, gpus: int, backend: str, shape: ModelShape | None = None, gpu_bf16: bool = True,
             loss_chunk: int | None = None) -> Plan:
    """Bytes per GPU. Precision "auto" resolves as on a bf16-capable GPU unless gpu_bf16=False.
    `loss_chunk`: the chunk the loss runs with (default: train.loss_chunk_size, auto as on a GPU)."""
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
    sp = t.sequence_parallel_size
    # Sequence parallelism: each GPU holds L/sp tokens of every row (rounded up: the collator pads to a
    # multiple), and attention, after its all-to-all, the whole row for heads/sp heads: every per-token
    # term below, the log-sum-exp included, is this GPU's share, and no [L, L] tensor is made (causal
    # sdpa per segment, no mask: distlora.sequence_parallel)
    Lr = -(-L // sp)
    tok = b * Lr
    h, i, a, d = s.hidden, s.intermediate, s.heads, s.head_dim
    r_per_layer = s.lora_r * s.adapted_layers / max(s.layers, 1)
    norm_bytes = 4 if compute < 4 else 0  # RMSNorm keeps an fp32 copy of its input under 16-bit compute
    attn = cfg.model.attn_implementation or "sdpa"  # transformers' choice for Llama-family models when unset
    eager = attn == "eager"
    if "flash" in attn or "flex" in attn or (cfg.data.packing and attn == "sdpa") or sp > 1:
        square = 0  # varlen / block-sparse kernels, packed sdpa per segment (distlora.attention): no [L, L] tensor
    elif eager:
        square = a * (4 + (compute if compute < 4 else 0))  # probabilities per head: fp32 softmax (+ its cast)
    else:
        square = compute  # sdpa: the additive mask, one per layer
    per_layer = tok * (
        compute * (4 * h + 4 * a * d + 4 * i + r_per_layer)  # see the module doc
        + norm_bytes * 2 * h
        + 2 * 4  # two RMSNorm rsqrt values per token (fp32)
    ) + (0 if eager else b * a * Lr * 4) + b * L * L * square  # log-sum-exp per head and token; the [L, L] term
    rest = tok * (compute * h + norm_bytes * h + 4) + tok * 8  # final norm (input, rsqrt), token ids
    rope = tok * d * 2 * compute  # cos/sin tables, kept by every layer's RoPE (not outside checkpointed layers)
    per_layer, rest = int(per_layer), int(rest)
    activations = s.layers * per_layer + rest + rope
    checkpointed = s.layers * tok * h * compute + rest  # each layer's input only
    chunk = auto_loss_chunk(cfg, on_gpu=True) if loss_chunk is None else loss_chunk
    per_logit = 3 * 4  # fp32 output, its flattened shifted copy, log-softmax (see the module doc)
    logits = (min(chunk, tok) if chunk else tok) * s.vocab * per_logit

    plan = Plan(backend, n, b, L, pbytes, compute, loss_chunk=chunk)
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
    if sp > 1:
        plan.notes.append(f"sequence parallel: each GPU holds {Lr:,} of each row's {L:,} tokens "
                          f"(train.sequence_parallel_size {sp}; {n // sp if n % sp == 0 else n / sp} data-parallel "
                          "rank(s)); activations and logits above are this GPU's share")
    if budget:
        plan.notes.append(f"token budget: each micro batch is one packed row of up to {budget} tokens "
                          "(train.micro_batch_tokens), the shape used above")
    if square:
        per = s.layers * b * L * L * square
        plan.notes.append(f"attention ({attn}) keeps an [L, L] tensor per layer and row: {per / MIB:,.1f} MiB of the "
                          "activations at this length; flash_attention_2 keeps none")
    if chunk:
        plan.notes.append(f"chunked loss: logits for {min(chunk, tok):,} target tokens at a time "
                          f"(train.loss_chunk_size {chunk}); the model's own output keeps one position")
    else:
        plan.notes.append(f"train.loss_chunk_size 0: full-sequence logits [{tok:,} tokens, {s.vocab:,}] are kept, "
                          f"{tok * s.vocab * 4 / MIB:,.1f} MiB of them fp32 per copy; a chunk of {AUTO_CHUNK} keeps "
                          f"{min(AUTO_CHUNK, tok) * s.vocab * per_logit / MIB:,.1f} MiB instead of {logits / MIB:,.1f}")
    plan.notes.append("framework overhead (CUDA context, allocator fragmentation, NCCL buffers) is not included: "
                      f"a run fits when the total is at most {USABLE_FRACTION:.0%} of the device's memory")
    return plan


# ---------------------------------------------------------------------------------------------
# "auto" memory settings and the fit check: one rule for the launcher, `distlora plan` and the trainer


def auto_loss_chunk(cfg, on_gpu: bool) -> int:
    """train.loss_chunk_size as the run uses it: a number as given; auto = AUTO_CHUNK on a GPU (0 under
    loss_impl liger, which chunks inside its kernel), 0 elsewhere (CPU: today's plain loss)."""
    c = cfg.train.loss_chunk_size
    if c != "auto":
        return c
    return AUTO_CHUNK if on_gpu and cfg.train.loss_impl == "torch" else 0


@dataclass
class Memory:
    """The resolved memory settings of one run on one kind of device, and whether its plan fits."""

    gradient_checkpointing: bool
    loss_chunk_size: int
    device_bytes: int | None  # one device's memory; None = unknown (no GPU, or not told)
    plan: Plan | None  # None on CPU: nothing to decide or check
    why: list[str] = field(default_factory=list)  # how each auto field was resolved
    fixes: list[str] = field(default_factory=list)  # when it does not fit: what would, each alone

    @property
    def usable(self) -> int | None:
        return None if self.device_bytes is None else int(USABLE_FRACTION * self.device_bytes)

    @property
    def need(self) -> int | None:
        return None if self.plan is None else self.plan.total(self.gradient_checkpointing)

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None or self.need is None else self.need <= self.usable

    def problem(self) -> str | None:
        """One line naming the fixes, or None when it fits (or cannot be checked)."""
        if self.fits is not False:
            return None
        p = self.plan
        head = (f"the plan needs {_size(self.need)} per GPU ({p.backend} on {p.gpus}, micro batch "
                f"{p.micro_batch_size} x seq {p.seq_len}, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}, loss chunk {self.loss_chunk_size or 'off'}), "
                f"over {USABLE_FRACTION:.0%} of the device's {_size(self.device_bytes)}")
        fit = [f"{c} ({_size(n)})" for c, n in self.fixes if n <= self.usable]
        lower = [f"{c} ({_size(n)})" for c, n in self.fixes if n > self.usable]
        first = next((c for c, n in self.fixes if n <= self.usable), self.fixes[0][0] if self.fixes else "")
        field_name = first.split("=")[0].split(" ")[0].lstrip("-") or "train.micro_batch_size"
        if fit:
            return f"{field_name}: {head}; fix, each fits alone: " + "; or ".join(fit)
        return (f"{field_name}: {head}; no single change fits, combine: " + ", ".join(lower) if lower else
                f"{field_name}: {head}; nothing here lowers it: more GPUs, or a GPU with more memory")

    def record(self) -> dict:
        """What run_info and the launcher's log keep."""
        return {"gradient_checkpointing": self.gradient_checkpointing, "loss_chunk_size": self.loss_chunk_size,
                "device_memory_bytes": self.device_bytes, "plan_bytes": self.need,
                "usable_fraction": USABLE_FRACTION, "why": self.why}

    def line(self) -> str:
        need = "" if self.need is None else f"; plan {_size(self.need)} per GPU"
        dev = "" if self.device_bytes is None else f" of {_size(self.device_bytes)}"
        return (f"distlora: memory: gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, loss "
                f"chunk {self.loss_chunk_size or 'off'}{need}{dev}" + (f" ({'; '.join(self.why)})" if self.why else ""))


def resolve_memory(cfg, *, on_gpu: bool, gpus: int = 1, backend: str = "ddp", device_bytes: int | None = None,
                   shape: ModelShape | None = None, gpu_bf16: bool = True) -> Memory:
    """model.gradient_checkpointing and train.loss_chunk_size as this run uses them ("auto" resolved by
    the rule in the module doc), the plan they give and the fixes when it does not fit. Without a GPU
    nothing is planned (auto = off, as CPU runs always were). `device_bytes`: one device's memory
    (train.device_memory_gib wins over it). Torch-free when `shape` is given."""
    t = cfg.train
    if t.device_memory_gib is not None:
        device_bytes = int(t.device_memory_gib * GIB)
    chunk = auto_loss_chunk(cfg, on_gpu)
    gc = cfg.model.gradient_checkpointing
    why = []
    if t.loss_chunk_size == "auto":
        why.append(f"train.loss_chunk_size auto -> {chunk}" + (" (CUDA)" if on_gpu else " (no GPU)"))
    if not on_gpu:
        if gc == "auto":
            why.append("model.gradient_checkpointing auto -> off (no GPU)")
        return Memory(gc is True, chunk, None, None, why)
    shape = shape or model_shape(cfg)
    plan = estimate(cfg, gpus, "ddp" if backend == "single" else backend, shape, gpu_bf16, chunk)
    usable = None if device_bytes is None else int(USABLE_FRACTION * device_bytes)
    if gc == "auto":
        gc = usable is not None and plan.total(False) > usable
        why.append(f"model.gradient_checkpointing auto -> {'on' if gc else 'off'}" + (
            " (device memory unknown: off)" if usable is None else
            f" (without it the plan is {_size(plan.total(False))}, {'over' if gc else 'within'} "
            f"{USABLE_FRACTION:.0%} of {_size(device_bytes)})"))
    mem = Memory(gc, chunk, device_bytes, plan, why)
    if mem.fits is False:
        mem.fixes = _fixes(cfg, mem, shape, gpu_bf16)
    return mem


def _fixes(cfg, mem: Memory, shape: ModelShape, gpu_bf16: bool) -> list[tuple[str, int]]:
    """(change, plan total after it) for each single change that lowers the plan, each re-planned with
    `estimate`, in the order to try them: those that leave the results alone (checkpointing, the chunked
    loss), then the batch shape, the backend, and the 4-bit base, which changes the numerics. A smaller micro batch (or token budget, or max_seq_len
    at micro batch 1) is the largest that fits, else the smallest there is."""
    p, usable, t = mem.plan, mem.usable, cfg.train
    gc, chunk = mem.gradient_checkpointing, mem.loss_chunk_size

    def total(c=cfg, backend=p.backend, g=gc, ch=chunk):
        return estimate(c, p.gpus, backend, shape, gpu_bf16, ch).total(g)

    def smaller(section, name, values):
        last = None
        for v in values:
            sec = getattr(cfg, section)
            last = (f"{section}.{name}={v}", total(c=cfg.model_copy(update={section: sec.model_copy(update={name: v})})))
            if last[1] <= usable:
                break
        return [last] if last else []

    out = []
    if not gc:
        out.append(("model.gradient_checkpointing=true", total(g=True)))
    if not chunk and t.loss_impl == "torch":
        out.append((f"train.loss_chunk_size={AUTO_CHUNK}", total(ch=AUTO_CHUNK)))
    # more sequence-parallel ranks (exact too, but fewer data-parallel ranks: a smaller global batch unless
    # accumulation grows): the smallest that fits of those dividing the GPUs and the heads
    sps = [n for n in range(t.sequence_parallel_size + 1, p.gpus + 1) if p.gpus % n == 0 and shape.heads % n == 0]
    out += smaller("train", "sequence_parallel_size", sps)
    if t.micro_batch_tokens:
        out += smaller("train", "micro_batch_tokens",
                       sorted({max(cfg.data.max_seq_len, t.micro_batch_tokens >> k) for k in range(1, 16)}, reverse=True))
    elif t.micro_batch_size > 1:
        out += smaller("train", "micro_batch_size", range(t.micro_batch_size - 1, 0, -1))
    elif cfg.data.max_seq_len > 256:  # micro batch 1: shorter examples; below 256 tokens few examples survive
        out += smaller("data", "max_seq_len", [cfg.data.max_seq_len >> k for k in range(1, 16) if cfg.data.max_seq_len >> k >= 256])
    if p.gpus > 1 and p.backend in ("ddp", "zero2"):
        out.append(("--backend zero3", total(backend="zero3")))
    if cfg.model.quantization is None:
        from distlora.config import QuantizationConfig

        q = cfg.model.model_copy(update={"quantization": QuantizationConfig()})
        out.append(("model.quantization={bits: 4}", total(c=cfg.model_copy(update={"model": q}))))
    return [x for x in out if x[1] < mem.need]


def _size(n: int) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB else f"{n / MIB:,.1f} MiB"


def nvidia_smi_memory() -> int | None:
    """The smallest GPU's memory on this machine in bytes, from `nvidia-smi --query-gpu=memory.total`
    (MiB; no torch); None without nvidia-smi or GPUs."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
        mib = [int(x.strip()) for x in res.stdout.split() if x.strip().isdigit()]
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return min(mib) * MIB if res.returncode == 0 and mib else None


def resolve_for_training(cfg, backend_name: str, world: int, say=print) -> Memory:
    """In the trainer, before the model loads: fill the "auto" fields of `cfg` in place with what
    `resolve_memory` gives on this process's device (torch.cuda's total_memory, or train.device_memory_gib)
    and say it; a ConfigError (exit 2) when the plan does not fit."""
    import torch

    from distlora.config import ConfigError

    on_gpu = torch.cuda.is_available()
    # this rank's own GPU (the accelerator has not picked it yet), by index: no context on GPU 0 for every rank
    local = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1) if on_gpu else 0
    dev = torch.cuda.get_device_properties(local).total_memory if on_gpu else None
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    mem = resolve_memory(cfg, on_gpu=on_gpu, gpus=world, backend=backend_name, device_bytes=dev, gpu_bf16=bf16)
    err = mem.problem()
    if err:
        raise ConfigError([err])
    cfg.model.gradient_checkpointing = mem.gradient_checkpointing
    cfg.train.loss_chunk_size = mem.loss_chunk_size
    if mem.why or mem.plan is not None:
        say(mem.line())
    return mem


def main(args) -> int:
    """Exit 0, or 2 for a config problem or when no planned backend fits the device's memory
    (--device-memory-gib / train.device_memory_gib; without it the fit is not checked)."""
    import sys

    from distlora import config as config_mod

    overrides = list(args.overrides)
    if getattr(args, "device_memory_gib", None) is not None:
        overrides.append(f"train.device_memory_gib={args.device_memory_gib}")
    try:
        cfg = config_mod.load(args.config, overrides)
        config_mod.resolve_accumulation(cfg, args.gpus)  # train.global_batch_size on --gpus
    except config_mod.ConfigError as err:
        print(err.render(), file=sys.stderr)
        return 2
    backends = [args.backend] if args.backend else list(BACKENDS)
    shape = model_shape(cfg)
    mems = [resolve_memory(cfg, on_gpu=True, gpus=args.gpus, backend=b, shape=shape) for b in backends]
    if args.json:
        import json

        print(json.dumps([{"backend": m.plan.backend, "gpus": m.plan.gpus, **m.plan.rows,
                           "model_state": m.plan.model_state, "total": m.need, "fits": m.fits,
                           "memory": m.record()} for m in mems], indent=1))
    else:
        print("\n\n".join(m.plan.render(m.gradient_checkpointing) + "\n" + m.line() for m in mems))
    problems = [m.problem() for m in mems]
    for prob in filter(None, problems):
        print(f"distlora plan: {prob}", file=sys.stderr)
    return 2 if all(problems) else 0
