"""Base model + tokenizer loading, gradient checkpointing, LoRA wrapping, trainable-parameter report."""

from __future__ import annotations

import math
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    src = cfg.tokenizer.name_or_path or cfg.model.name_or_path
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.tokenizer.pad_token is not None:
        tok.pad_token = cfg.tokenizer.pad_token
    elif tok.pad_token is None:
        # pad == eos is safe here: labels come from the data, not from `input_ids != pad`, so each
        # example's EOS keeps its label and the model learns to stop (trl#456).
        tok.pad_token = tok.eos_token
    if cfg.tokenizer.chat_template is not None:
        t = cfg.tokenizer.chat_template
        tok.chat_template = Path(t).read_text() if len(t) < 4096 and Path(t).is_file() else t
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at '{src}' has no EOS token; set tokenizer.pad_token and add an EOS token")
    return tok


def base_dtype(cfg, mixed_precision: str) -> torch.dtype:
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16 if mixed_precision == "fp16" else torch.float32


def init_lora_weights(cfg, weights: bool = True):
    """PEFT's init_lora_weights for lora.init. LoftQ starts from PEFT's default and is fitted after
    wrapping (`fit_loftq`), on the 4-bit base that stays as loaded. `weights=False`: no init at all
    (meta-device models, counted only: an SVD of a meta tensor has no values)."""
    if not weights:
        return False
    return {"default": True, "loftq": True}.get(cfg.lora.init, cfg.lora.init)


def lora_config(cfg, weights: bool = True):
    """The run's PEFT LoraConfig: the one the trainer wraps its model with, and the one the launcher
    and `distlora plan` count parameters with (`weights=False`: the same shapes, no init computed)."""
    from peft import EvaConfig, LoraConfig

    lo = cfg.lora
    # rho 1: every layer keeps rank r (EVA's rank redistribution would change the shapes the plan counted)
    eva = EvaConfig(rho=1.0, tau=lo.eva_tau) if lo.init == "eva" else None
    return LoraConfig(
        init_lora_weights=init_lora_weights(cfg, weights),
        eva_config=eva,
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        use_rslora=lo.use_rslora,
        use_dora=lo.use_dora,
        modules_to_save=lo.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )


def quantization_config(q):
    """bitsandbytes' config for a model.quantization section (QLoRA: training and `distlora merge`)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype], bnb_4bit_quant_storage=DTYPES[q.quant_storage],
    )


def meta_model(model_cfg):
    """The base model (a config.ModelConfig's) built from its config alone on the meta device: no
    weights are read or allocated. Module names and shapes for config checks, plan and launcher."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf, trust_remote_code=model_cfg.trust_remote_code)


def meta_lora_model(cfg, base=None):
    """`base` (default: meta_model of the run's model) wrapped in place by PEFT with the run's
    lora_config: what trains, as PEFT itself makes it."""
    import torch
    from peft import get_peft_model

    # the adapter's own layers on the meta device too: PEFT would make them on the CPU first (a 70B
    # shape: 0.8 GB and 6.8 s of initialisation for a parameter count)
    with torch.device("meta"):
        return get_peft_model(meta_model(cfg.model) if base is None else base, lora_config(cfg, weights=False))


def lora_param_count(cfg, base=None) -> int:
    """Trainable parameters of the run's LoRA model, counted on the meta device (no weights read)."""
    return param_counts(meta_lora_model(cfg, base))["trainable_params"]


def load_model(cfg, mixed_precision: str):
    """Frozen base + LoRA adapters (a PeftModel). Seeds the LoRA init with train.seed."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": base_dtype(cfg, mixed_precision), "trust_remote_code": cfg.model.trust_remote_code}
    q = cfg.model.quantization
    if q is not None:  # QLoRA: validated in config (bitsandbytes present, storage = compute dtype)
        kwargs["dtype"] = DTYPES[q.compute_dtype]
        kwargs["quantization_config"] = quantization_config(q)
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, **kwargs)
    if q is not None:
        keep_4bit_layout(model)
    model.config.use_cache = False  # a KV cache in training breaks packed-sequence masking and wastes memory
    if cfg.data.packing:  # sdpa (chosen or transformers' default) -> one sdpa per packed example
        from distlora.attention import use_varlen_sdpa

        use_varlen_sdpa(model)
    # True only: "auto" is resolved before training (distlora.plan.resolve_for_training); a model loaded
    # outside a run (tests, tools) with "auto" left in it is on CPU, where auto resolves to off
    if cfg.model.gradient_checkpointing is True:
        # non-reentrant: works under DDP with frozen base weights (no "marked ready twice")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(cfg.train.seed)
    if cfg.lora.init_from:
        model = PeftModel.from_pretrained(model, cfg.lora.init_from, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(cfg))
        if cfg.lora.init == "loftq":
            fit_loftq(model, cfg)
        if cfg.lora.moves_base or cfg.lora.init == "loftq":
            same_on_every_rank(model, base=cfg.lora.moves_base)  # LoftQ leaves the base as loaded
    # Adapters train in fp32 even on a bf16/fp16 base: optimizer updates stay exact.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    # adapter_config.json names the base as a hub id as given, or by absolute path: it loads from anywhere
    model.peft_config["default"].base_model_name_or_path = base_reference(cfg.model.name_or_path)
    if cfg.lora.moves_base:
        remember_initial_adapter(model)
    return model


# --------------------------------------------------------------------------------------------- LoRA variants


def fit_loftq(model, cfg) -> None:
    """LoftQ on the 4-bit base as loaded, one round (what PEFT's replace_lora_weights_loftq computes, but on
    the device the base is on: PEFT's moves every weight to CUDA): each adapted layer's scale * B @ A = the
    best rank-r approximation (SVD, sqrt(S) on each side) of W - dequantize(Q), W read from the model's
    safetensors files. The base is not modified: the adapter belongs to the 4-bit base that
    PeftModel.from_pretrained loads. fp32; one layer's W at a time."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    files = sorted(Path(cfg.model.name_or_path).glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            where.update(dict.fromkeys(fh.keys(), f))
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        if key not in where:
            raise ValueError(f"lora.init: loftq found no '{key}' in the safetensors files of {cfg.model.name_or_path}")
        q = module.get_base_layer().weight
        with safe_open(str(where[key]), "pt") as fh:
            w = fh.get_tensor(key).to(torch.float32)
        residual = w - bnb.functional.dequantize_4bit(q.data, q.quant_state).to(torch.float32).cpu()
        u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
        r, scale = module.r["default"], module.scaling["default"]
        root = sv[:r].sqrt()
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        a.data = (root[:, None] * vh[:r]).to(a.device, a.dtype).contiguous()
        b.data = (u[:, :r] * root / scale).to(b.device, b.dtype).contiguous()


def same_on_every_rank(model, base: bool = True) -> None:
    """Rank 0's adapter and adapted base weights on every rank: an init that computes (an SVD, a QR)
    is not promised to give the same bits on every device, and DDP/ZeRO-2 would keep rank 0's while
    FSDP2 keeps each rank's own shard. Once, before the first step: a copy of the adapted layers' weights.
    Under ZeRO-3 the base is partitioned, and PEFT's init already wrote rank 0's result into it
    (GatheredParameters with modifier_rank 0)."""
    import torch.distributed as dist
    from peft.tuners.lora import LoraLayer

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        tensors = [p for d in (module.lora_A, module.lora_B) for p in d.parameters()]
        if base and not hasattr(weight, "ds_id"):  # a ZeRO-3 parameter is an empty partition here
            tensors.append(weight)
        for t in tensors:
            buf = t.data.to(device)
            dist.broadcast(buf, src=0)
            t.data.copy_(buf)


INITIAL = "_distlora_initial_adapter"


def remember_initial_adapter(model) -> None:
    """The adapter at init (PEFT key format, fp32 CPU): what the base was moved by, for `to_plain_lora`.
    Adapter-sized; taken before the backend wraps or shards anything."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    model.__dict__[INITIAL] = {k: v.detach().float().to("cpu", copy=True) for k, v in sd.items() if ".lora_" in k}


def initial_adapter(model) -> dict[str, torch.Tensor]:
    return model.__dict__[INITIAL]


def to_plain_lora(model, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """A trained PiSSA/OLoRA adapter (A, B on the base W - s * B0 @ A0) as a plain LoRA of the unmodified
    base W: W - s B0 A0 + s B A = W + s [B | -B0] [A ; A0], rank 2r at the same scale s. Returns the new
    state dict and the rank factor (2; 1 when the run's init leaves the base alone: `sd` unchanged)."""
    if INITIAL not in model.__dict__:
        return sd, 1
    init = initial_adapter(model)
    out = dict(sd)
    for k, t in sd.items():
        if ".lora_A." in k:
            out[k] = torch.cat([t, init[k].to(t.dtype)], dim=0)
        elif ".lora_B." in k:
            out[k] = torch.cat([t, -init[k].to(t.dtype)], dim=1)
    return out, 2


def from_plain_lora(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained A, B back out of a `to_plain_lora` state dict (its first r rows of A, columns of B),
    for a resume on the moved base; `sd` unchanged when the run's init leaves the base alone."""
    if INITIAL not in model.__dict__:
        return sd
    init = initial_adapter(model)
    out = dict(sd)
    for k, t in sd.items():
        if ".lora_A." in k and t.shape[0] == 2 * init[k].shape[0]:
            out[k] = t[: init[k].shape[0]].contiguous()
        elif ".lora_B." in k and t.shape[1] == 2 * init[k].shape[1]:
            out[k] = t[:, : init[k].shape[1]].contiguous()
    return out


def plain_lora_config(adapter_dir: Path, factor: int) -> None:
    """adapter_config.json of a `to_plain_lora` adapter: rank x factor at the same scale (alpha / r, or
    alpha / sqrt(r) under rsLoRA), and PEFT's plain init, so PeftModel.from_pretrained leaves the base alone."""
    import json

    if factor == 1:
        return
    f = Path(adapter_dir) / "adapter_config.json"
    conf = json.loads(f.read_text())
    alpha_factor = math.sqrt(factor) if conf.get("use_rslora") else factor
    conf["r"] *= factor
    conf["lora_alpha"] *= alpha_factor
    conf["rank_pattern"] = {k: v * factor for k, v in (conf.get("rank_pattern") or {}).items()}
    conf["alpha_pattern"] = {k: v * alpha_factor for k, v in (conf.get("alpha_pattern") or {}).items()}
    conf["init_lora_weights"] = True
    f.write_text(json.dumps(conf, indent=2, sort_keys=True))


def eva_init(model, cfg, loader, acc) -> None:
    """EVA: each adapted layer's A = the top-r right singular vectors of its inputs on the training data
    (the trained tokens of this rank's micro batches, in the order training reads them), gathered over the
    ranks by PEFT, so every rank fits the same SVD as one process reading the same global batches. B stays 0:
    the base and the model's output are unchanged. Runs on the unsharded model, before the backend wraps it."""
    from peft import initialize_lora_eva_weights

    from distlora.data import IGNORE
    from distlora.loss import model_inputs, packed_view

    model.to(acc.device)
    limit = cfg.lora.eva_max_batches

    class OnDevice(dict):
        """A batch already on the device: PEFT's move_inputs_to_device calls `.to` (and would warn about
        every int of the packed segment list it cannot move)."""

        def to(self, _device):
            return self

    class RankBatches:
        """This rank's micro batches in training order, up to `limit`; PEFT iterates it again (cycles)
        until every layer has converged."""

        def __len__(self):  # every rank gets the same number: windows hold whole global batches (data.py)
            return min(limit, len(loader) // acc.num_processes)

        def __iter__(self):
            for i, b in enumerate(loader):
                if i >= limit * acc.num_processes:
                    return
                if i % acc.num_processes != acc.process_index:  # what prepare deals to the other ranks
                    continue
                b = {k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in b.items()}
                view = packed_view(model, b) if "position_ids" in b else b  # layer inputs and labels alike
                yield OnDevice(kwargs=model_inputs(view), labels=view["labels"])

    seen = [0]

    def forward(m, batch):
        seen[0] += 1
        if seen[0] > limit:
            raise RuntimeError(f"lora.init=eva: not converged after lora.eva_max_batches={limit} micro batches per "
                               "process; raise it, or lower lora.eva_tau")
        with torch.no_grad():
            m(**batch["kwargs"], use_cache=False)

    def trained_tokens(batch, _peft_config):  # the SVD sees the tokens the loss trains on
        return (batch["labels"] != IGNORE).nonzero()

    initialize_lora_eva_weights(model, RankBatches(), forward_fn=forward, prepare_model_inputs_fn=trained_tokens,
                                show_progress_bar=False)


def base_reference(name_or_path: str) -> str:
    from pathlib import Path

    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else name_or_path


def keep_4bit_layout(model) -> None:
    """Keep every bitsandbytes 4-bit layer on its training path (QLoRA on CPU).

    bitsandbytes 0.50 repacks a Linear4bit into a CPU inference layout the first time it runs in
    eval mode without grad on an AVX512-BF16 CPU (an eval pass): its scales are rounded to bf16,
    double quantization is undone, and from then on every forward, training too, goes through
    `gemv_4bit`, which has no backward. Measured on the tiny Llama after one eval pass (fp32 and
    bf16): loss off by 7e-4 to 5e-3, LoRA gradients off by up to 113% of their norm (the gradient
    through the frozen base to earlier layers is dropped). With the repack off, loss and every LoRA gradient
    equal a model of plain nn.Linear layers holding the de-quantized weights, bitwise
    (tests/test_qlora.py). On CUDA the flag is never read."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def numel(p) -> int:
    """Values a parameter stands for: a bitsandbytes 4-bit weight packs 2 (uint8 storage) to 8 (fp32)
    of them per stored element, its quant_state keeps the real shape; a ZeRO-3-partitioned parameter
    is empty here, ds_numel is its full size."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return math.prod(qs.shape)
    return getattr(p, "ds_numel", p.numel())


def param_counts(model) -> dict[str, int]:
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def adapter_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
