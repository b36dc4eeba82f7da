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


def lora_config(cfg):
    """The run's PEFT LoraConfig: the one the trainer wraps its model with, and the one the launcher
    and `distlora plan` count parameters with."""
    from peft import LoraConfig

    lo = cfg.lora
    return LoraConfig(
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
    from peft import get_peft_model

    return get_peft_model(meta_model(cfg.model) if base is None else base, lora_config(cfg))


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
    # Adapters train in fp32 even on a bf16/fp16 base: optimizer updates stay exact.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    # adapter_config.json names the base as a hub id as given, or by absolute path: it loads from anywhere
    model.peft_config["default"].base_model_name_or_path = base_reference(cfg.model.name_or_path)
    return model


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
