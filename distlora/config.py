"""The run config: typed sections, each default set once, with a one-line doc per field.

`load(path, overrides)` reads a YAML file that holds only overrides of these defaults, applies
`dotted.key=value` overrides on top, and validates everything. Every problem is collected and
raised as one `ConfigError` that names each field and says how to fix it. Nothing here imports
torch at module level or touches a process group: this runs before either. `check_device` adds the
checks that only hold on the machine that trains (a CUDA GPU for `train.loss_impl: liger`): the
trainer asks for them; launchers and `distlora plan` may run elsewhere (a login node).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(Exception):
    """All problems found in a run config; `problems` is a list of 'field: message' lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        head = f"distlora: the run config has {len(self.problems)} problem(s):"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


# The one list of backends (launch, plan, cli and the trainer): what a run's gradients and base are
# sharded by. "auto" in the run config means: what the accelerate config says (DeepSpeed JSON stage,
# else DDP over several processes, else a single process).
BACKENDS = ("single", "ddp", "zero2", "zero3", "fsdp2")
Backend = Literal["single", "ddp", "zero2", "zero3", "fsdp2"]
# What `distlora launch`, `distlora slurm` and `distlora plan --backend` offer: one process is a
# shape (--nodes 1 --gpus-per-node 1), not a choice.
LAUNCH_BACKENDS = tuple(b for b in BACKENDS if b != "single")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantizationConfig(_Section):
    """QLoRA: the frozen base in 4 bits through bitsandbytes (`pip install 'distlora[qlora]'`; CUDA GPUs or CPU)."""

    bits: Literal[4] = Field(4, description="Bits per frozen base weight; 4 = QLoRA (8-bit is not supported).")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 is the QLoRA paper's NormalFloat.")
    double_quant: bool = Field(True, description="Also quantize the per-block scales (~0.4 bit/param saved).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are de-quantized to for each matmul."
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Storage dtype of the packed weights; equal to compute_dtype so ZeRO-3/FSDP can shard them."
    )


class ModelConfig(_Section):
    name_or_path: str = Field(..., description="Local directory or hub id of the base causal LM.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the frozen base is loaded in; auto = bf16 under bf16 training, else fp32."
    )
    attn_implementation: Optional[str] = Field(
        None, description="eager | sdpa | flash_attention_2 ...; None lets transformers choose (packing: distlora/attention.py)."
    )
    gradient_checkpointing: Union[bool, Literal["auto"]] = Field(
        "auto", description="Recompute activations in backward (non-reentrant); auto = on when a GPU run's plan does not fit without it (distlora plan), off on CPU."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint's repository.")
    quantization: Optional[QuantizationConfig] = Field(
        None, description="QLoRA 4-bit base: {bits: 4, type: nf4, double_quant, compute_dtype, quant_storage}; None = none."
    )


class TokenizerConfig(_Section):
    name_or_path: Optional[str] = Field(None, description="Tokenizer location; None = the model's.")
    pad_token: Optional[str] = Field(None, description="Pad token to set; None keeps the tokenizer's, else EOS.")
    chat_template: Optional[str] = Field(
        None, description="Jinja chat template (or a path to one) for base models without a template."
    )
    add_special_tokens: bool = Field(True, description="Add the tokenizer's BOS (if any) before each prompt.")


# lora.init values; "pissa_niter_N" (fast randomized SVD, N iterations) is also accepted
LORA_INITS = ("default", "gaussian", "pissa", "olora", "eva", "loftq")


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="'all-linear' or names of the linear modules to adapt (e.g. [q_proj, v_proj])."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: Optional[list[str]] = Field(None, description="Extra modules trained in full and saved.")
    init_from: Optional[str] = Field(None, description="Adapter directory to start from instead of a fresh init.")
    init: str = Field(
        "default", description="LoRA init (PEFT init_lora_weights): default | gaussian | pissa | pissa_niter_N | olora | "
        "eva | loftq; pissa/olora move part of the base into the adapter (saved converted to plain LoRA on the original base)."
    )
    plus_lr_ratio: Optional[float] = Field(
        None, gt=0, description="LoRA+: lr of the B matrices = this x train.lr (the paper suggests 16); None = off."
    )
    eva_tau: float = Field(
        0.99, gt=0, le=1, description="EVA: a layer's components have converged at this cosine similarity between batches."
    )
    eva_max_batches: int = Field(
        200, gt=0, description="EVA: micro batches per process the data-driven init may read before it gives up."
    )

    @property
    def moves_base(self) -> bool:
        """PiSSA and OLoRA rewrite the base (W -> W - scale * B0 @ A0); their adapters are saved converted
        to a plain LoRA of the unmodified base (distlora.model.to_plain_lora)."""
        return self.init.startswith("pissa") or self.init == "olora"

    @field_validator("init")
    @classmethod
    def _known_init(cls, v):
        if v not in LORA_INITS and not re.fullmatch(r"pissa_niter_[1-9][0-9]*", v):
            raise ValueError(f"must be one of {', '.join(LORA_INITS)} or pissa_niter_N (N >= 1 subspace iterations)")
        return v

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


Format = Literal["auto", "completion", "alpaca", "chat", "text"]


class DataSource(_Section):
    path: str = Field(..., description="File, glob, or hub dataset id.")
    format: Optional[Format] = Field(None, description="Format of this source; None = data.format.")
    prompt_field: Optional[str] = Field(None, description="Prompt field for 'completion'; None = data.prompt_field.")
    completion_field: Optional[str] = Field(None, description="Completion field; None = data.completion_field.")
    split: str = Field("train", description="Split to read from a hub dataset.")
    truncation_side: Literal["right", "left"] | None = Field(
        None, description="Which end of a too-long example this source cuts; None = data.truncation_side."
    )
    weight: float = Field(1.0, gt=0, description="Mixing weight: examples are sampled in proportion (1 = use as is).")


class DataConfig(_Section):
    train: Union[str, list[DataSource]] = Field(..., description="Training data: a path/glob/hub id or a list of sources.")
    eval: Union[str, float, None] = Field(
        None, description="Eval data: a path, or a fraction (0 < f < 1) of train held out; None = no eval."
    )
    format: Format = Field("auto", description="completion | alpaca | chat | text; auto detects from the fields.")
    prompt_field: str = Field("prompt", description="Field holding the prompt in 'completion' data.")
    completion_field: str = Field("completion", description="Field holding the completion in 'completion' data.")
    max_seq_len: int = Field(2048, gt=1, description="Longest example in tokens.")
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with longer examples: truncate (see truncation_side) or drop; counted in the log."
    )
    truncation_side: Literal["right", "left"] = Field(
        "right", description="right cuts the end; left keeps the end (BOS kept; chat drops whole early turns first)."
    )
    train_on_prompt: bool = Field(False, description="Also train on prompt tokens (default: completion only).")
    packing: bool = Field(
        False, description="Pack examples into rows of <= max_seq_len tokens (or train.micro_batch_tokens), attention kept per example; micro_batch_size counts rows."
    )
    shuffle: bool = Field(True, description="Shuffle examples each epoch (order depends on seed and global batch only).")
    cache: bool = Field(
        True, description="The main process tokenizes (in parallel) into the memory-mapped token-store cache that every process maps; false: each process tokenizes into memory (a matching cache is still read)."
    )
    cache_dir: Optional[str] = Field(None, description="Tokenized-data cache directory; None = output_dir/data_cache.")
    group_by_length: bool = Field(
        False, description="Unpacked: batch examples of similar length together (less padding); still exactly once per epoch."
    )

    @field_validator("eval")
    @classmethod
    def _eval_fraction(cls, v):
        if isinstance(v, float) and not (0.0 < v < 1.0):
            raise ValueError("a fraction must lie strictly between 0 and 1; or give a path, or null")
        return v


class TrainConfig(_Section):
    output_dir: str = Field(..., description="Where adapter/, checkpoints/, metrics.jsonl and config.yaml go.")
    micro_batch_size: int = Field(4, gt=0, description="Examples per forward pass per process (packed rows under data.packing).")
    micro_batch_tokens: int | None = Field(
        None, gt=1, description="Packing token budget: each micro batch is one row of up to this many tokens (micro_batch_size 1); None = off."
    )
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro batches per optimizer step per process.")
    global_batch_size: Optional[int] = Field(
        None, gt=0, description="Examples (packed rows) per optimizer step over all ranks; set, it derives gradient_accumulation_steps from the processes, so fewer nodes keep the global batch."
    )
    sequence_parallel_size: int = Field(
        1, gt=0, description="Ranks that split each example's tokens (Ulysses all-to-all attention, sdpa); data-parallel ranks = processes / this."
    )
    epochs: float = Field(1, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to run; None = derived from epochs.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (not applied to biases/norms).")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: Optional[float] = Field(
        None, ge=0, lt=1, description="Warmup as a fraction of total steps (default 0.03 if warmup_steps is unset)."
    )
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warmup in optimizer steps (exclusive with warmup_ratio).")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the global grad norm to this; None = no clipping.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision; auto = bf16 on GPUs that support it, else no."
    )
    backend: Literal["auto", "single", "ddp", "zero2", "zero3", "fsdp2"] = Field(
        "auto", description="auto = what the accelerate config launches (DeepSpeed stage, DDP, one process); "
        "fsdp2 = our fully_shard per decoder layer over a plain multi-process accelerate config (CPU and GPU)."
    )
    seed: int = Field(42, description="Seeds LoRA init, data order and dropout.")
    nonfinite: Literal["skip", "abort"] = Field(
        "skip", description="Non-finite loss (a NaN gradient every rank receives through the reduction) or gradient: skip the step "
        "(counted; the lr schedule still advances; an fp16 loss scale is lowered) or abort the run."
    )
    nonfinite_max_in_a_row: int = Field(3, gt=0, description="Abort after this many skipped steps in a row.")
    collective_timeout_s: int = Field(
        1800, gt=0, description="Seconds a rank waits in any collective (gloo, NCCL, DeepSpeed) before the job ends with a named error; covers rank 0's tokenizing, eval and saving."
    )
    loss_chunk_size: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = Field(
        "auto", description="Compute lm_head + cross-entropy this many target tokens at a time (less logits memory); 0 = all at once; auto = 1024 on GPUs (0 with liger), 0 on CPU."
    )
    device_memory_gib: Optional[float] = Field(
        None, gt=0, description="One GPU's memory in GiB for the auto settings and the fit check; None = what the GPU reports (nvidia-smi, torch)."
    )
    loss_impl: Literal["torch", "liger"] = Field(
        "torch", description="torch (plain or chunked, see loss_chunk_size); liger = liger-kernel's fused lm_head + CE (CUDA, distlora[liger])."
    )
    log_every: int = Field(
        10, gt=0, description="Write a metrics row and progress line every N optimizer steps (and at the last step and a stop); a row costs a few ms."
    )
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps; 0 = only at the end.")
    eval_at_start: bool = Field(False, description="Also evaluate before the first step (a baseline).")
    peak_tflops: Optional[float] = Field(None, gt=0, description="Device peak TFLOP/s for MFU; None = known GPU table.")
    eval_micro_batch_size: Optional[int] = Field(None, gt=0, description="Eval batch per process; None = micro_batch_size.")
    save_every: int = Field(500, ge=0, description="Write a checkpoint every N steps; 0 = none (final adapter only).")
    keep_last: Optional[int] = Field(3, gt=0, description="Checkpoints kept; None = all.")
    resume: str = Field("auto", description="auto = newest checkpoint in output_dir if any; never; or a checkpoint path.")
    resume_weights_only: bool = Field(
        False, description="Take only the checkpoint's adapter (fresh optimizer, step 0): after changing batch or model."
    )

    @property
    def effective_warmup_ratio(self) -> float:
        return 0.03 if self.warmup_ratio is None and self.warmup_steps is None else (self.warmup_ratio or 0.0)


class EvalConfig(_Section):
    """Generation at each eval (greedy, with the model as it trains): samples to read and task metrics."""

    samples: Union[Annotated[int, Field(ge=0)], str] = Field(
        0, description="Completions written to output_dir/samples.jsonl and the trackers at each eval: the first K eval examples, or a prompts .jsonl in the training data's format; 0 = none."
    )
    max_new_tokens: int = Field(64, gt=0, description="Longest completion generated (greedy; also stops at EOS).")
    exact_match: bool = Field(
        False, description="Generate for every eval example and log task_exact_match: the fraction whose answer equals the reference's."
    )
    answer_pattern: Optional[str] = Field(
        None, description="Regex taking the answer from completion and reference (last match; group 1 if any), e.g. '####\\s*(-?[\\d,.]+)' for GSM8K; None = the whole text, stripped."
    )
    metric_fn: Optional[str] = Field(
        None, description="'module:function' scoring each eval example, fn(prompt, completion, reference) -> float; its mean is logged as task_<function>."
    )


class LogConfig(_Section):
    report_to: list[Literal["wandb", "tensorboard"]] = Field(default_factory=list, description="Trackers besides metrics.jsonl.")
    project: str = Field("distlora", description="Tracker project name.")
    run_name: Optional[str] = Field(None, description="Tracker run name; None = the output_dir's name.")
    tags: list[str] = Field(default_factory=list, description="wandb run tags.")


class RunConfig(_Section):
    model: ModelConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Hash of everything that shapes the training trajectory (not logging or cadence)."""
        d = self.to_dict()
        for k in ("output_dir", "log_every", "eval_every", "save_every", "keep_last", "resume", "eval_at_start",
                  "peak_tflops", "resume_weights_only", "device_memory_gib"):
            d["train"].pop(k, None)
        d.pop("log", None)
        d.pop("eval", None)  # generation reads the model; it never changes it
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = {
    "model": ModelConfig,
    "tokenizer": TokenizerConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "log": LogConfig,
}


# ---------------------------------------------------------------------------------------------
# Loading


def _set_dotted(d: dict, dotted: str, value: Any, problems: list[str]) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            problems.append(f"{dotted}: cannot set a key inside '{k}', which is not a section")
            return
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str], problems: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            problems.append(f"override '{item}': write it as dotted.key=value, e.g. train.lr=1e-4")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def _field_path(loc: tuple) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        elif p in ("str", "float", "list[DataSource]", "literal['all-linear']", "list[str]", "int", "none", "bool",
                   "literal['auto']", "constrained-int"):
            continue  # union branch names pydantic adds
        else:
            parts.append(str(p))
    return ".".join(parts)


def _valid_keys(loc: tuple) -> list[str]:
    model: Any = RunConfig
    for p in loc[:-1]:
        if isinstance(p, int):
            continue
        field = getattr(model, "model_fields", {}).get(p)
        if field is None:
            if p == "list[DataSource]":
                model = DataSource
            continue
        ann = field.annotation
        model = SECTIONS.get(p, ann)
        if p == "train" and model is not TrainConfig:
            model = DataSource
    return list(getattr(model, "model_fields", {}).keys())


def _format_errors(err: ValidationError) -> list[str]:
    problems: dict[str, str] = {}
    union_noise: dict[str, list[str]] = {}
    for e in err.errors():
        loc = e["loc"]
        path = _field_path(loc)
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems[path] = f"{path}: unknown key; {hint}valid keys here: {', '.join(valid)}"
        elif e["type"] == "missing":
            problems[path] = f"{path}: required, but not set"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            union_noise.setdefault(path, []).append(f"{msg}{shown}")
    for path, msgs in union_noise.items():
        if path in problems:
            continue
        problems[path] = f"{path}: " + "; or ".join(dict.fromkeys(msgs))
    return list(problems.values())


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"--config: no such file '{path}'"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"--config: '{path}' is not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--config: '{path}' must hold a mapping of sections (model, data, train, ...)"])
    return data


def load(path: str | os.PathLike | None, overrides: list[str] | None = None, check_model: bool = True,
         check_device: bool = False) -> RunConfig:
    """Read, override, validate. Raises ConfigError listing every problem found."""
    problems: list[str] = []
    raw = read_yaml(path) if path is not None else {}
    for key, value in parse_overrides(overrides or [], problems):
        _set_dotted(raw, key, value, problems)
    return validate(raw, problems, check_model=check_model, check_device=check_device)


def validate(raw: dict, problems: list[str] | None = None, check_model: bool = True,
             check_device: bool = False) -> RunConfig:
    problems = list(problems or [])
    cfg = None
    bad_fields: dict[str, set] = {}
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems += _format_errors(err)
        for e in err.errors():
            if len(e["loc"]) >= 2:
                bad_fields.setdefault(e["loc"][0], set()).add(e["loc"][1])
    # Cross-field and world checks (files, the model's modules) run on every section that parses
    # once its bad fields are left out, so a typo in one place does not hide a problem elsewhere.
    sections = {}
    for name, cls in SECTIONS.items():
        if cfg is not None:
            sections[name] = getattr(cfg, name)
        elif isinstance(raw.get(name), dict):
            clean = {k: v for k, v in raw[name].items() if k not in bad_fields.get(name, ())}
            try:
                sections[name] = cls.model_validate(clean)
            except ValidationError:
                pass
    problems += _check_world(sections, check_model=check_model, check_device=check_device)
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return cfg


def _check_world(s: dict, check_model: bool, check_device: bool = False) -> list[str]:
    from distlora import data as data_mod  # light: no torch

    problems: list[str] = []
    train = s.get("train")
    if train is not None and train.warmup_ratio is not None and train.warmup_steps is not None:
        problems.append("train.warmup_steps: set warmup_ratio or warmup_steps, not both (remove one of them)")
    if train is not None and train.resume_weights_only and train.resume in ("auto", "never"):
        problems.append("train.resume_weights_only: needs train.resume set to the checkpoint directory to start from "
                        "(with auto, every relaunch would start over from the newest checkpoint)")
    if train is not None and train.resume not in ("auto", "never") and not Path(train.resume).is_dir():
        problems.append(f"train.resume: '{train.resume}' is not a directory; use auto, never, or a checkpoint path")
    data = s.get("data")
    if data is not None:
        problems += data_mod.check_sources(data)
        if data.packing and data.group_by_length:
            problems.append("data.group_by_length: packing already removes padding; set data.packing or data.group_by_length, not both")
    if train is not None and train.micro_batch_tokens is not None:
        problems += _check_token_budget(train, data)
    if train is not None and train.global_batch_size is not None:
        # the processes are known only at launch; a micro batch that does not divide it never fits
        problems += [p for p in [accumulation_problem(train, None)] if p]
    if s.get("eval") is not None:
        problems += _check_eval(s["eval"], data)
    tok = s.get("tokenizer")
    if tok is not None and tok.name_or_path and _looks_local(tok.name_or_path) and not Path(tok.name_or_path).exists():
        problems.append(f"tokenizer.name_or_path: '{tok.name_or_path}' does not exist")
    lora = s.get("lora")
    if lora is not None and lora.init_from and not (Path(lora.init_from) / "adapter_config.json").is_file():
        problems.append(f"lora.init_from: '{lora.init_from}' holds no adapter_config.json; point it at an adapter directory")
    model = s.get("model")
    if lora is not None:
        problems += _check_lora_init(lora, model)
    if model is not None and model.quantization is not None:
        problems += _check_quantization(model, train)
    if model is not None and data is not None:
        problems += _check_packed_attention(model, data, check_device)
    if model is not None and train is not None and train.sequence_parallel_size > 1:
        from distlora.sequence_parallel import attention_problem  # light: no torch at import

        problems += [p for p in [attention_problem(train.sequence_parallel_size, model.attn_implementation)] if p]
    liger = train is not None and train.loss_impl == "liger"
    if liger:
        problems += _check_liger(train, check_device)
    if model is not None:
        if _looks_local(model.name_or_path) and not Path(model.name_or_path).exists():
            problems.append(f"model.name_or_path: '{model.name_or_path}' does not exist")
        elif check_model and lora is not None:
            problems += _check_target_modules(model, lora, liger)
    return problems


def data_parallel(train: TrainConfig, processes: int) -> int:
    """Ranks that see different examples: the processes over train.sequence_parallel_size."""
    return max(processes // train.sequence_parallel_size, 1)


def accumulation(train: TrainConfig, processes: int) -> int:
    """Micro batches per optimizer step per rank on `processes` processes: train.global_batch_size /
    (micro_batch_size x data-parallel ranks) when it is set, else train.gradient_accumulation_steps. The
    one formula of the launcher's preflight, `distlora plan` and the trainer (accumulation_problem first)."""
    if train.global_batch_size is None:
        return train.gradient_accumulation_steps
    return train.global_batch_size // (train.micro_batch_size * data_parallel(train, processes))


def accumulation_problem(train: TrainConfig, processes: int | None) -> str | None:
    """Why train.global_batch_size cannot be kept on `processes` processes (None: it can). `processes`
    None (the config alone, before a launch): only what no number of processes can fix."""
    g = train.global_batch_size
    if g is None:
        return None
    dp = data_parallel(train, processes or 1)
    unit = train.micro_batch_size * dp
    if g % unit == 0:
        if processes is None:
            return None
        if "gradient_accumulation_steps" in train.model_fields_set and train.gradient_accumulation_steps != g // unit:
            return (f"train.gradient_accumulation_steps: {train.gradient_accumulation_steps}, but train.global_batch_size "
                    f"{g} on {dp} data-parallel process(es) x micro {train.micro_batch_size} derives {g // unit}; "
                    "remove train.gradient_accumulation_steps (it follows from the global batch)")
        return None
    below, above = g // unit * unit, (g // unit + 1) * unit
    near = f"{below} or {above}" if below else f"{above}"
    per = f"micro_batch_size {train.micro_batch_size} x {dp} data-parallel processes = {unit}" if processes else \
        f"train.micro_batch_size {unit}"
    return (f"train.global_batch_size: {g} is not a multiple of {per}; set it to {near} "
            "(or change train.micro_batch_size or the number of processes)")


def resolve_accumulation(cfg: RunConfig, processes: int) -> None:
    """Fill train.gradient_accumulation_steps in place from train.global_batch_size for `processes`
    (launcher, plan, trainer: before anything reads it). ConfigError (exit 2) when it does not divide."""
    err = accumulation_problem(cfg.train, processes)
    if err:
        raise ConfigError([err])
    given = "gradient_accumulation_steps" in cfg.train.model_fields_set
    cfg.train.gradient_accumulation_steps = accumulation(cfg.train, processes)
    if not given:  # derived, not the user's: a later check on another number of processes derives it again
        cfg.train.model_fields_set.discard("gradient_accumulation_steps")


def _check_eval(ev: EvalConfig, data: DataConfig | None) -> list[str]:
    """eval.*: the prompts file, the regex and the user function, found before any worker starts (the
    function's module is located and its source read, not imported: it may import torch)."""
    import importlib.util
    import re

    problems = []
    if isinstance(ev.samples, str) and (Path(ev.samples).suffix != ".jsonl" or not Path(ev.samples).is_file()):
        problems.append(f"eval.samples: '{ev.samples}' is not a .jsonl file; give a prompts .jsonl (rows in the "
                        "training data's format) or the number of eval examples to sample")
    scored = ev.exact_match or ev.metric_fn is not None
    from_eval_set = scored or (isinstance(ev.samples, int) and ev.samples > 0)
    if data is not None and from_eval_set:
        if data.eval is None:
            problems.append("eval: samples from the eval set and task metrics need eval data; set data.eval (or give "
                            "eval.samples a prompts file and turn the metrics off)")
        elif data.train_on_prompt:
            problems.append("data.train_on_prompt: eval prompts end where the first trained token starts, so the "
                            "eval samples and metrics need train_on_prompt false (or give eval.samples a prompts file)")
        elif data.format == "text":
            problems.append("data.format: text data has no prompt to continue; eval samples and metrics need "
                            "completion, alpaca or chat data")
    if ev.answer_pattern is not None:
        try:
            re.compile(ev.answer_pattern)
        except re.error as exc:
            problems.append(f"eval.answer_pattern: not a valid regular expression ({exc})")
    if ev.metric_fn is not None:
        problems += _check_function(ev.metric_fn, "eval.metric_fn", importlib.util)
    return problems


def _check_function(spec: str, field: str, util) -> list[str]:
    """'module:function' names a module on the path whose source defines or imports `function`."""
    import ast

    mod, _, fn = spec.partition(":")
    if not mod or not fn.isidentifier():
        return [f"{field}: '{spec}' is not 'module:function' (e.g. mypkg.scores:gsm8k)"]
    import sys

    # the workers run as `python -m distlora.train`, which puts the working directory on the path; a
    # console script (distlora launch) does not, so it is searched here too
    cwd_added = os.getcwd() not in sys.path and "" not in sys.path
    if cwd_added:
        sys.path.append(os.getcwd())
    try:
        found = util.find_spec(mod)
    except (ImportError, ValueError):
        found = None
    finally:
        if cwd_added:
            sys.path.remove(os.getcwd())
    if found is None:
        return [f"{field}: no module '{mod}' on the Python path; install it or add its directory to PYTHONPATH"]
    try:
        tree = ast.parse(Path(found.origin).read_text())
    except (OSError, TypeError, SyntaxError, ValueError):
        return []  # compiled or unreadable source: checked when imported
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    if fn not in names:
        return [f"{field}: module '{mod}' ({found.origin}) defines no '{fn}'"]
    return []


def _check_lora_init(lora: LoraConfig, model: ModelConfig | None) -> list[str]:
    """lora.init against the rest of the config: what PEFT's init and distlora's save conversion can do."""
    init, q = lora.init, model.quantization if model is not None else None
    problems = []
    if lora.init_from and init != "default":
        problems.append(f"lora.init: {init} draws a fresh adapter but lora.init_from loads one; remove one of them")
    if lora.moves_base and q is not None:
        problems.append(f"lora.init: {init} rewrites the base weights, which a 4-bit base cannot hold exactly; use "
                        "lora.init=loftq for a quantized base, or remove model.quantization")
    if lora.moves_base and lora.use_dora:
        problems.append(f"lora.init: {init} with lora.use_dora: the saved adapter cannot be converted to the unmodified "
                        "base (DoRA's magnitude is of the modified one); set lora.use_dora=false or lora.init=default")
    if init == "loftq":
        if q is None:
            problems.append("lora.init: loftq fits the adapter to a 4-bit base's quantization error and needs "
                            "model.quantization (bits: 4); set it, or use another lora.init")
        if model is not None and not (Path(model.name_or_path).is_dir() and any(Path(model.name_or_path).glob("*.safetensors"))):
            problems.append(f"lora.init: loftq reads the unquantized weights from the model's safetensors files; "
                            f"model.name_or_path '{model.name_or_path}' must be a local directory holding them")
    for name, owner in (("eva_tau", "eva"), ("eva_max_batches", "eva")):
        # a value other than the default (a saved config.yaml lists every field, defaults included)
        if getattr(lora, name) != type(lora).model_fields[name].default and init != owner:
            problems.append(f"lora.{name}: set, but lora.init is {init}; it applies to lora.init={owner} only: remove it")
    return problems


def lora_init_backend_problems(lora: LoraConfig, backend: str) -> list[str]:
    """lora.init against the backend (one of BACKENDS): the inits that need the whole base on every rank
    before the backend wraps the model. ZeRO-3 builds the base already partitioned: EVA's forward passes
    and LoftQ's read of the 4-bit weights have nothing to run on. PiSSA/OLoRA run there (PEFT gathers
    each weight for its SVD/QR)."""
    if backend == "zero3" and lora.init in ("eva", "loftq"):
        return [f"lora.init: {lora.init} needs the whole base on every rank before training, which ZeRO-3 "
                "partitions as it loads; use train.backend zero2, ddp or fsdp2 (not with a 4-bit base), or another lora.init"]
    return []


def _check_liger(train: TrainConfig, check_device: bool) -> list[str]:
    """train.loss_impl=liger: liger-kernel (and the triton it runs on) installed; with `check_device`,
    a CUDA GPU on this machine (its kernels are triton GPU kernels)."""
    import importlib.util

    problems = []
    if train.loss_chunk_size not in (0, "auto"):
        problems.append("train.loss_chunk_size: liger chooses its own chunks; set train.loss_chunk_size=0 "
                        "with train.loss_impl=liger (or train.loss_impl=torch to keep the chunk size)")
    missing = [m for m in ("liger_kernel", "triton") if importlib.util.find_spec(m) is None]
    if missing:
        problems.append(f"train.loss_impl: liger needs {' and '.join(missing)}, not installed here; "
                        "`pip install 'distlora[liger]'` (CUDA GPUs), or set train.loss_impl=torch")
    if check_device:
        import torch

        if not torch.cuda.is_available():
            problems.append("train.loss_impl: liger runs on CUDA GPUs only and this machine has none; set "
                            "train.loss_impl=torch (train.loss_chunk_size bounds the logits memory on any device)")
    return problems


def _check_packed_attention(model: ModelConfig, data: DataConfig, check_device: bool) -> list[str]:
    """data.packing on model.attn_implementation: exact routes only (distlora.attention); with `check_device`,
    whether this machine has the CUDA GPU that flex_attention's backward needs."""
    from distlora.attention import packing_problem  # light: torch only inside its kernels

    cuda = None
    if check_device and data.packing and model.attn_implementation == "flex_attention":
        import torch

        cuda = torch.cuda.is_available()
    problem = packing_problem(model.attn_implementation, data.packing, cuda)
    return [problem] if problem else []


def _check_token_budget(train: TrainConfig, data: DataConfig | None) -> list[str]:
    """train.micro_batch_tokens: each micro batch is one packed row of up to that many tokens."""
    budget = train.micro_batch_tokens
    problems = []
    if data is not None and not data.packing:
        problems.append(f"train.micro_batch_tokens: a token budget ({budget}) packs examples into one row per micro batch "
                        "and needs data.packing: true; set data.packing=true, or remove train.micro_batch_tokens")
    if data is not None and budget < data.max_seq_len:
        problems.append(f"train.micro_batch_tokens: {budget} is less than data.max_seq_len {data.max_seq_len}, so an "
                        f"example of max_seq_len tokens would not fit a micro batch; raise train.micro_batch_tokens to at "
                        f"least {data.max_seq_len}, or lower data.max_seq_len")
    if train.micro_batch_size != 1:
        problems.append(f"train.micro_batch_size: {train.micro_batch_size} with train.micro_batch_tokens; under a token "
                        "budget a micro batch is one packed row, so set train.micro_batch_size=1 (accumulation and "
                        "processes make the global batch)")
    return problems


def _check_quantization(model: ModelConfig, train) -> list[str]:
    import importlib.util

    q = model.quantization
    problems = []
    if q.quant_storage not in ("uint8", q.compute_dtype):
        problems.append(
            f"model.quantization.quant_storage: '{q.quant_storage}' differs from compute_dtype '{q.compute_dtype}'; "
            f"set it to {q.compute_dtype} (lets ZeRO-3/FSDP shard the 4-bit base) or uint8 (single GPU / DDP)"
        )
    if model.dtype not in ("auto", q.compute_dtype):
        problems.append(
            f"model.dtype: '{model.dtype}' with a 4-bit base; the non-quantized layers follow "
            f"model.quantization.compute_dtype: set model.dtype to auto or {q.compute_dtype}"
        )
    if train is not None and q.compute_dtype != "float32":
        want = {"bfloat16": "bf16", "float16": "fp16"}[q.compute_dtype]
        if train.mixed_precision not in ("auto", want):
            problems.append(
                f"train.mixed_precision: '{train.mixed_precision}' with compute_dtype {q.compute_dtype}; use {want} or auto"
            )
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("model.quantization: bitsandbytes is not installed; `pip install 'distlora[qlora]'`")
    return problems


def _looks_local(p: str) -> bool:
    """A path, not a hub id ('org/name'): exists, starts like a path, or has more than one '/'."""
    return Path(p).exists() or p.startswith((".", "/", "~")) or p.count("/") > 1


def _linear_names(m) -> list[str]:
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)})


def linear_module_names(model_cfg: ModelConfig) -> list[str]:
    """Leaf names of the model's nn.Linear modules, from its config alone (meta device, no weights)."""
    from distlora.model import meta_model

    return _linear_names(meta_model(model_cfg))


def _check_target_modules(model: ModelConfig, lora: LoraConfig, liger: bool = False) -> list[str]:
    if lora.target_modules == "all-linear":
        return []  # PEFT's all-linear leaves the output layer out
    try:
        from distlora.model import meta_model  # torch and transformers: only here, where the model is checked

        m = meta_model(model)
    except Exception as exc:  # noqa: BLE001 - reported as a config problem, with the cause
        return [f"model.name_or_path: cannot read the model config at '{model.name_or_path}': {exc}"]
    names = _linear_names(m)
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        return [
            f"lora.target_modules: {missing} not found in the model; its linear modules are: {', '.join(names)} "
            "(or use 'all-linear')"
        ]
    head = m.get_output_embeddings()
    head_name = next((n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if mod is head), None)
    if liger and head_name in lora.target_modules:
        return [(
            f"lora.target_modules: LoRA on the output layer '{head_name}' with train.loss_impl=liger, whose fused kernel "
            f"uses the layer's weight alone (not its adapter); drop '{head_name}' (lora.modules_to_save trains it in "
            "full, which liger supports), or set train.loss_impl=torch"
        )]
    return []


def dump(cfg: RunConfig, path: str | os.PathLike) -> None:
    """The resolved config as YAML; under train.global_batch_size without the accumulation it derived for
    this launch, so the file runs again on any number of processes."""
    d = cfg.to_dict()
    if d["train"].get("global_batch_size") is not None and "gradient_accumulation_steps" not in cfg.train.model_fields_set:
        d["train"].pop("gradient_accumulation_steps")
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))
