"""The one module that knows how the job is distributed (single process, DDP, DeepSpeed ZeRO-2/3,
FSDP2 on GPUs). The training loop only calls what is defined here.

The backend is chosen by the accelerate config file alone (`accelerate launch` exports it as
ACCELERATE_* environment variables); the run config stays the one owner of batch size,
accumulation, clipping and precision, and a launcher or DeepSpeed JSON value that contradicts it
is refused before anything heavy runs.

DeepSpeed differences handled here (the loop is the same for every backend):
- the engine steps inside `accelerator.backward` at the accumulation boundary (optimizer.step and
  zero_grad are no-ops there) and clips with the JSON's `gradient_clipping`, which is filled from
  train.max_grad_norm;
- loss scaling: like accelerate's non-DeepSpeed path, the engine divides the loss by its
  gradient_accumulation_steps, and ZeRO averages gradients over the data-parallel ranks, like DDP:
  `loss_scale()` undoes both (tests/test_backends.py proves it against DDP);
- ZeRO-3 partitions every parameter: adapter tensors are gathered for saving, written back gathered
  for loading, and the optimizer state is a per-rank partition saved through the engine;
- on CPU the process group must be gloo, and `cpu=True` must not be passed (it silently turns a
  DeepSpeed launch into plain DDP).

DDP: gradients are views of the reducer's all-reduce buckets (gradient_as_bucket_view, zeroed in
place between steps, created before the reducer so that even the first window accumulates there):
a step holds the adapter's gradients once, not twice.

FSDP2 (GPU only; not exercised on CPU): parameters are DTensor shards, so the adapter is gathered
with `full_tensor`, loaded with torch.distributed.checkpoint's full-state-dict loader, and each rank
saves its own optimizer shard. Its reduce-scatter averages over ranks like DDP: same loss scale.

Measured traps this module closes (shared/reference/cpu-distributed-facts.md):
- on a CPU-only machine `accelerate launch --multi_gpu -n 2` starts 2 processes that each see
  world size 1 and train unsynchronised unless the Accelerator is built with cpu=True;
- the launcher's own mixed precision / accumulation settings would silently override the run
  config, which is the only owner of them here.
"""

from __future__ import annotations

import os
import weakref

import torch


class DistributedSetupError(RuntimeError):
    """The processes were launched in a way that would train wrongly; the message says how to fix it."""


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def deepspeed_launch() -> bool:
    """`accelerate launch` with a DeepSpeed config (distributed_type: DEEPSPEED)."""
    return _env_true("ACCELERATE_USE_DEEPSPEED")


def backend_name(acc) -> str:
    """ddp | zero2 | zero3 | fsdp | single: what this run really is after `prepare`."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{acc.state.deepspeed_plugin.zero_stage}"
    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if acc.num_processes > 1 else "single"


def resolve_mixed_precision(cfg) -> str:
    mp = cfg.train.mixed_precision
    if mp != "auto":
        return mp
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def launcher_conflicts(cfg) -> list[str]:
    """Settings in the accelerate launch config that contradict the run config (which owns them)."""
    problems = []
    mp = resolve_mixed_precision(cfg)
    env_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if env_mp not in ("no", mp):
        problems.append(
            f"train.mixed_precision: the run config resolves to '{mp}' but the accelerate config sets "
            f"mixed_precision: {env_mp}; the run config owns precision: set mixed_precision: 'no' in the "
            f"accelerate config (or train.mixed_precision={env_mp})"
        )
    env_ga = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if env_ga not in (None, "1", str(cfg.train.gradient_accumulation_steps)):
        problems.append(
            f"train.gradient_accumulation_steps: the accelerate config sets gradient_accumulation_steps: {env_ga} "
            f"but the run config says {cfg.train.gradient_accumulation_steps}; remove it from the accelerate config"
        )
    if deepspeed_launch():
        problems += deepspeed_conflicts(cfg, mp)
    if _env_true("ACCELERATE_USE_FSDP") and not torch.cuda.is_available():
        problems.append(
            "launcher: the accelerate config asks for FSDP, which accelerate runs on GPUs only; on CPU shard the base "
            "with configs/accelerate/cpu_deepspeed_zero3.yaml"
        )
    q = cfg.model.quantization
    if q is not None and q.quant_storage == "uint8" and (_env_true("ACCELERATE_USE_FSDP") or _zero_stage_from_env() == 3):
        problems.append(
            f"model.quantization.quant_storage: uint8 cannot be sharded by ZeRO-3/FSDP; set it to {q.compute_dtype}"
        )
    return problems


def _zero_stage_from_env() -> int | None:
    import json

    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if deepspeed_launch() and path:
        try:
            with open(path) as fh:
                return int(_ds_get(json.load(fh), "zero_optimization.stage") or 0)
        except (OSError, ValueError, TypeError):
            return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if deepspeed_launch() and stage else None


def _ds_values(cfg, mp: str) -> dict:
    """The DeepSpeed JSON values the run config owns, as DeepSpeed spells them."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * env_world_size(),
        "gradient_clipping": float(t.max_grad_norm or 0.0),  # 0 = no clipping in DeepSpeed
        "fp16.enabled": mp == "fp16",
        "bf16.enabled": mp == "bf16",
    }


def _ds_get(conf: dict, dotted: str):
    cur = conf
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def deepspeed_conflicts(cfg, mp: str) -> list[str]:
    """DeepSpeed launch problems: the cpu flag, and JSON values (other than "auto") that contradict
    the run config or take over what it owns (optimizer, scheduler)."""
    import json

    problems = []
    if _env_true("ACCELERATE_USE_CPU"):
        problems.append(
            "launcher: the accelerate config sets use_cpu (or --cpu) together with DeepSpeed; accelerate then "
            "silently trains plain DDP without ZeRO. Remove use_cpu: DeepSpeed finds the CPU by itself"
        )
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    owned = _ds_values(cfg, mp)
    if not path:  # inline deepspeed_config in the accelerate YAML: only clipping reaches us through env
        clip = os.environ.get("ACCELERATE_GRADIENT_CLIPPING")
        if clip not in (None, "", "none") and float(clip) != owned["gradient_clipping"]:
            problems.append(
                f"train.max_grad_norm: the accelerate config sets gradient_clipping: {clip} but the run config says "
                f"{cfg.train.max_grad_norm}; remove it from the accelerate config"
            )
        return problems
    try:
        with open(path) as fh:
            conf = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        return problems + [f"launcher: cannot read the DeepSpeed config '{path}': {exc}"]
    where = {
        "train_micro_batch_size_per_gpu": "train.micro_batch_size",
        "gradient_accumulation_steps": "train.gradient_accumulation_steps",
        "train_batch_size": "train.micro_batch_size x train.gradient_accumulation_steps x processes",
        "gradient_clipping": "train.max_grad_norm",
        "fp16.enabled": "train.mixed_precision",
        "bf16.enabled": "train.mixed_precision",
    }
    for key, want in owned.items():
        got = _ds_get(conf, key)
        if got is None or got == "auto":
            continue
        same = (str(got).lower() == str(want).lower()) if isinstance(want, bool) else _num_eq(got, want)
        if not same:
            problems.append(
                f"{where[key]}: the DeepSpeed config {path} sets {key}: {json.dumps(got)} but the run config gives "
                f"{json.dumps(want)}; the run config owns it: set \"{key}\": \"auto\" in the JSON"
            )
    if cfg.train.nonfinite == "skip":
        # a skipped window is handed to the engine with a non-finite gradient, which ZeRO discards only
        # when it checks (see step_applied)
        for key, fix in (("bf16.check_grad_overflow", "true"), ("zero_optimization.compute_grad_norm", "true")):
            if _ds_get(conf, key) is False:
                problems.append(
                    f"train.nonfinite: skip needs DeepSpeed to check gradients for inf/NaN, but {path} sets {key}: "
                    f"false (a non-finite window would then be applied); set it to {fix} or use train.nonfinite: abort"
                )
    for key in ("optimizer", "scheduler"):
        if key in conf:
            problems.append(
                f"launcher: the DeepSpeed config {path} has an \"{key}\" section; distlora builds AdamW and its "
                f"schedule from the run config (train.lr, train.lr_scheduler, ...): remove \"{key}\" from the JSON"
            )
    return problems


def _num_eq(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _fill_deepspeed_config(acc, cfg) -> None:
    """Write the run config's values over the JSON's "auto"s before `prepare` (accelerate would fill
    gradient_clipping "auto" with 1.0 whatever train.max_grad_norm says)."""
    conf = acc.state.deepspeed_plugin.deepspeed_config
    for key, value in _ds_values(cfg, acc.mixed_precision).items():
        node, *rest = key.split(".")
        if rest:
            conf.setdefault(node, {})[rest[0]] = value
        else:
            conf[key] = value


def build_accelerator(cfg):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, InitProcessGroupKwargs

    kwargs = {}
    if cfg.log.report_to:
        from accelerate.utils import ProjectConfiguration

        kwargs["log_with"] = list(cfg.log.report_to)
        out = cfg.train.output_dir
        kwargs["project_config"] = ProjectConfiguration(project_dir=out, logging_dir=os.path.join(out, "tensorboard"))
    ds = deepspeed_launch()
    if ds:
        CommCounter.install()  # before the engine's comm layer takes references to the collectives
    if ds and not torch.cuda.is_available():
        # DeepSpeed on CPU: gloo, or its batch-size check sees a world of 1 and fails
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif not ds:
        # DDP: gradients are views into the reducer's all-reduce buckets, so a step holds the adapter's
        # gradients once, not twice (p.grad + bucket); with grads_set_to_none() False the views persist
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(gradient_as_bucket_view=True)]
    acc = Accelerator(
        # CPU without DeepSpeed: real gloo DDP, not N unsynchronised copies. Never under DeepSpeed:
        # cpu=True there silently replaces ZeRO by plain DDP.
        cpu=not torch.cuda.is_available() and not ds,
        mixed_precision=resolve_mixed_precision(cfg),
        # Windows always hold whole global batches (data.py pads the last one), so the
        # accumulation boundary never follows the end of the dataloader.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # No even_batches: it would repeat early examples to fill the last batch.
        dataloader_config=DataLoaderConfiguration(even_batches=False, split_batches=False),
        **kwargs,
    )
    if acc.num_processes != env_world_size():
        raise DistributedSetupError(
            f"{env_world_size()} processes were launched but accelerate built a world of {acc.num_processes} "
            f"({acc.distributed_type}); every process would train alone on the same data. Launch with "
            "`accelerate launch --config_file configs/accelerate/cpu_ddp.yaml` (CPU) or multi_gpu.yaml (GPUs)."
        )
    if ds:
        from accelerate.utils import DistributedType

        if acc.distributed_type != DistributedType.DEEPSPEED:
            raise DistributedSetupError(
                f"the accelerate config asks for DeepSpeed but accelerate built {acc.distributed_type}; refusing to "
                "train without ZeRO"
            )
        _fill_deepspeed_config(acc, cfg)
    return acc


def prepare(acc, model, optimizer, train_loader):
    """accelerate's `prepare`. Under DDP every trainable parameter first gets a zero gradient: the
    reducer, built with gradient_as_bucket_view, turns each existing gradient into a view of its
    bucket, so the very first window already accumulates in the buckets (without it, the first
    window's no_sync micro steps allocate gradients next to the buckets)."""
    if backend_name(acc) == "ddp":
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    return acc.prepare(model, optimizer, train_loader)


def loss_scale(acc, n_target: float) -> float:
    """Factor for a micro batch's summed NLL so that the step's gradient is exactly
    d(sum of NLL over the window, all ranks)/dθ / n_target.

    Every backend here divides the loss by the accumulation steps (accelerate's `backward` outside
    DeepSpeed; the DeepSpeed engine's `backward` with its gradient_accumulation_steps, which
    `_fill_deepspeed_config` set to the run config's) and averages gradients over the data-parallel
    ranks (DDP's all-reduce; ZeRO's reduce-scatter/all-reduce with predivide); undo both."""
    dp = data_parallel_size(acc)
    accum = acc.gradient_accumulation_steps
    if deepspeed_launch():
        engine_accum = acc.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"]
        if engine_accum != accum:
            raise DistributedSetupError(f"DeepSpeed accumulates {engine_accum} micro steps, the loop {accum}")
    return dp * accum / max(n_target, 1)


def optimizer_reshardable(acc) -> bool:
    """Whether a checkpoint's optimizer state loads on another number of ranks (not ZeRO partitions)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def steps_in_backward(acc) -> bool:
    """Whether the optimizer update happens inside `accelerator.backward` of the window's last micro
    batch (DeepSpeed: the engine steps there), so a window must be judged before that backward."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def step_applied(acc) -> bool:
    """Under DeepSpeed, whether the engine's last boundary step changed the parameters. ZeRO checks the
    gradient for inf/NaN at the step (every dtype on stage 3; stages 1/2 unless bf16.check_grad_overflow
    or zero_optimization.compute_grad_norm is off, which `deepspeed_conflicts` refuses under
    train.nonfinite=skip) and then discards the window's gradients instead of updating."""
    return bool(acc.deepspeed_engine_wrapped.engine.was_step_applied())


def any_rank(acc, flag: torch.Tensor) -> bool:
    """True on every rank if `flag` (a bool scalar) is true on any rank: one small all-reduce."""
    return bool(all_sum(acc, flag.to(torch.float64).reshape(1)).item() > 0)


def grads_set_to_none(acc) -> bool:
    """How the loop clears gradients after a step. DDP: zero them in place, keeping them views into
    the reducer's buckets (gradient_as_bucket_view); set to None, the next window's first backward
    would allocate fresh gradients next to the buckets and the bucket view would be lost until the
    window's all-reduce. Elsewhere: free them between steps."""
    return backend_name(acc) != "ddp"


def data_parallel_size(acc) -> int:
    """Ranks that see different data (no tensor/context parallelism here)."""
    return acc.num_processes


def check_wrapped(acc, model) -> None:
    """Refuse to train when several processes run but gradients would not be synchronised."""
    from accelerate.utils import DistributedType

    if acc.num_processes == 1:
        return
    if acc.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed import DeepSpeedEngine

        if not isinstance(model, DeepSpeedEngine):
            raise DistributedSetupError("DeepSpeed launch but the model is not a DeepSpeed engine after prepare")
        return
    if acc.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FSDPModule

        if not any(isinstance(mod, FSDPModule) for mod in model.modules()):
            raise DistributedSetupError("FSDP launch but no module is sharded by fully_shard after prepare")
        return
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise DistributedSetupError(
            f"world size {acc.num_processes} but the model is not wrapped for distributed training "
            f"(distributed type {acc.distributed_type}); gradients would not be synchronised"
        )


def unwrap(acc, model):
    return acc.unwrap_model(model)


def is_zero3(acc) -> bool:
    return backend_name(acc) == "zero3"


def _gathered(acc, params, modifier_rank=None):
    """Full-shape view of ZeRO-3-partitioned `params` inside the block (a collective: every rank
    enters); with modifier_rank, that rank's in-place changes are re-partitioned on exit."""
    import contextlib

    if not is_zero3(acc):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full tensor from an FSDP2 DTensor shard (a collective), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _is_dtensor(p) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _local_numel(p: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
        return p.ds_tensor.numel()
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def adapter_state_dict(acc, model) -> dict[str, torch.Tensor]:
    """Full-shape adapter tensors (PEFT key format), on CPU, on every rank. A collective under
    ZeRO-3 (every rank calls): only the adapter is gathered, never the base."""
    from peft import get_peft_model_state_dict

    m = unwrap(acc, model)
    params = [p for p in m.parameters() if p.requires_grad]
    if os.environ.get("DISTLORA_TEST_SKIP_GATHER"):  # test hook: save what this rank holds, ungathered
        params = []
    with _gathered(acc, params):
        sd = get_peft_model_state_dict(m)
        return {k: _full(v.detach()).to("cpu", copy=True).contiguous() for k, v in sd.items()}


def load_adapter_state(acc, model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    m = unwrap(acc, model)
    params = [p for p in m.parameters() if p.requires_grad]
    if backend_name(acc) == "fsdp":  # FSDP2: write full tensors into the DTensor shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        name = m.active_adapter
        full = {n: state[n.replace(f".{name}.", ".")] for n, p in m.named_parameters() if p.requires_grad}
        set_model_state_dict(m, full, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with _gathered(acc, params, modifier_rank=0):
        result = set_peft_model_state_dict(m, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"checkpoint adapter has keys the model lacks: {unexpected[:5]}")


DS_DIR = "deepspeed"  # inside a checkpoint: the engine's per-rank optimizer partitions and its `latest`
DS_TAG = "state"


def save_optimizer_state(acc, model, optimizer, ckpt_tmp) -> list[str]:
    """Write the optimizer state into the (not yet published) checkpoint directory; every rank calls.
    DDP/single: rank 0 writes optimizer.pt (the state is replicated). DeepSpeed: every rank writes its
    ZeRO partition through the engine, frozen base excluded. Returns the names written at top level."""
    from pathlib import Path

    ckpt_tmp = Path(ckpt_tmp)
    if deepspeed_launch():
        model.save_checkpoint(str(ckpt_tmp / DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
        return [DS_DIR]
    if backend_name(acc) == "fsdp":  # FSDP2: Adam moments are per-rank DTensor shards
        torch.save(optimizer.state_dict(), ckpt_tmp / f"optimizer-rank{acc.process_index}.pt")
        return [f"optimizer-rank{acc.process_index}.pt"]
    if acc.is_main_process:
        torch.save(optimizer.state_dict(), ckpt_tmp / "optimizer.pt")
    return ["optimizer.pt"]


def load_optimizer_state(acc, model, optimizer, ckpt) -> None:
    """Restore what `save_optimizer_state` wrote; every rank calls (after the adapter is loaded)."""
    from pathlib import Path

    ckpt = Path(ckpt)
    if deepspeed_launch():
        if not (ckpt / DS_DIR).is_dir():
            raise DistributedSetupError(f"{ckpt} holds no DeepSpeed optimizer state; it was written by another backend")
        if acc.num_processes != _ds_world(ckpt / DS_DIR):
            raise DistributedSetupError(
                f"{ckpt} holds ZeRO partitions for {_ds_world(ckpt / DS_DIR)} ranks; this run has {acc.num_processes}"
            )
        # Module weights come from the adapter file (already loaded); the engine restores its fp32
        # master partitions and Adam moments, and re-derives the module's adapter from them.
        model.load_checkpoint(str(ckpt / DS_DIR), tag=DS_TAG, load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
        return
    if backend_name(acc) == "fsdp":
        f = ckpt / f"optimizer-rank{acc.process_index}.pt"
        if not f.is_file() or (ckpt / f"optimizer-rank{acc.num_processes}.pt").is_file():
            raise DistributedSetupError(f"{ckpt} holds no FSDP optimizer shards for {acc.num_processes} ranks")
        optimizer.load_state_dict(torch.load(f, weights_only=False))
        return
    if not (ckpt / "optimizer.pt").is_file():
        raise DistributedSetupError(f"{ckpt} holds no optimizer.pt; it was written under DeepSpeed")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))


def _ds_world(ds_dir) -> int:
    return len(list((ds_dir / DS_TAG).glob("*optim_states.pt")))


def release_gathered(acc, model) -> None:
    """Return every ZeRO-3 parameter to its partition. A training step does it in backward; a
    forward-only pass (eval) leaves parameters that DeepSpeed expects to reuse soon gathered."""
    if is_zero3(acc):
        model.empty_partition_cache()


def gathered_base_bytes(acc, model) -> int:
    """Under ZeRO-3, bytes of frozen base parameters NOT in their partitioned state right now: DeepSpeed's
    `ds_status` is AVAILABLE or INFLIGHT (deepspeed/runtime/zero/partition_parameters.py, ZeroParamStatus),
    or full-shape data is still attached. Parameters DeepSpeed keeps whole by design (`ds_persist`: below
    stage3_param_persistence_threshold) are not counted. 0 on every other backend. One pass over the
    frozen parameters (listed once per model: walking a PEFT model's module tree costs ~0.5 ms), no
    collective, no allocation: cheap enough to run after every step."""
    if not is_zero3(acc):
        return 0
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    frozen = _FROZEN_SHARDED.get(model)
    if frozen is None:
        frozen = _FROZEN_SHARDED[model] = [p for p in model.parameters() if not p.requires_grad and not p.ds_persist]
    n = 0
    for p in frozen:
        if p.ds_status is not ZeroParamStatus.NOT_AVAILABLE or p.data.numel():
            n += p.ds_numel * p.element_size()
    return n


_FROZEN_SHARDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its partitioned frozen params


def note_gathered_base(acc, model, memory: dict, where: str) -> None:
    """Check `gathered_base_bytes` at `where` ("step N", "eval N", "save N", ...) and keep, per rank, in
    memory["gathered_base"]: the most bytes seen and where first, how many checks of each kind ran, and
    the seconds they took (the overhead)."""
    import time

    t0 = time.perf_counter()
    n = gathered_base_bytes(acc, model)
    rec = memory.setdefault("gathered_base", {"max_bytes": 0, "at": None, "checks": {}, "seconds": 0.0})
    kind = where.split()[0]
    rec["checks"][kind] = rec["checks"].get(kind, 0) + 1
    if n > rec["max_bytes"]:
        rec["max_bytes"], rec["at"] = n, where
    rec["seconds"] += time.perf_counter() - t0


def barrier(acc) -> None:
    acc.wait_for_everyone()



class CommCounter:
    """Bytes the backend moves between ranks, counted at the collectives themselves.

    DDP: a comm hook around the default all-reduce sees every gradient bucket. DeepSpeed: its comm
    layer calls torch.distributed's collectives, which `install()` wraps before the engine starts
    (it keeps references to all_gather_into_tensor / reduce_scatter_tensor). Per call the payload is
    counted once: all-reduce and broadcast the tensor, reduce-scatter its full input, all-gather
    its full output. distlora's own small reductions (`all_sum`) are not counted."""

    bytes = 0
    paused = False
    _installed = False
    _ARG = {  # collective -> (positional index, keyword) of the tensor whose size is the payload
        "all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "reduce": (0, "tensor"),
        "reduce_scatter_tensor": (1, "input"), "_reduce_scatter_base": (1, "input"),
        "all_gather_into_tensor": (0, "output_tensor"), "_all_gather_base": (0, "output_tensor"),
    }

    @classmethod
    def install(cls) -> None:
        import functools

        import torch.distributed as tdist

        if cls._installed:
            return
        cls._installed = True
        for name, (pos, kw) in cls._ARG.items():
            fn = getattr(tdist, name, None)
            if fn is None:
                continue

            @functools.wraps(fn)
            def counted(*args, _fn=fn, _pos=pos, _kw=kw, **kwargs):
                t = kwargs.get(_kw, args[_pos] if len(args) > _pos else None)
                if t is not None and not CommCounter.paused:
                    CommCounter.bytes += t.numel() * t.element_size()
                return _fn(*args, **kwargs)

            setattr(tdist, name, counted)

    @classmethod
    def watch_ddp(cls, model) -> None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def hook(state, bucket):
                cls.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
                return default_hooks.allreduce_hook(state, bucket)

            model.register_comm_hook(None, hook)

    @classmethod
    def take(cls) -> int:
        n, cls.bytes = cls.bytes, 0
        return n


def all_sum(acc, tensor):
    """Sum over ranks for distlora's own bookkeeping (token counts, metrics): not backend traffic."""
    CommCounter.paused = True
    try:
        return acc.reduce(tensor, "sum")
    finally:
        CommCounter.paused = False


def gather_objects(acc, obj) -> list:
    """One picklable object per rank, in rank order, on every rank."""
    if acc.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _innermost_optimizer(optimizer):
    """The torch optimizer under accelerate's and ZeRO's wrappers (holds the Adam moments)."""
    o = optimizer
    while hasattr(o, "optimizer"):
        o = o.optimizer
    return o


def model_state_bytes(acc, model, optimizer) -> dict[str, int]:
    """Bytes this rank holds for model state, measured from the live objects:
    frozen_local / trainable_local: parameter storage on this rank (a ZeRO-3 rank's partition);
    frozen_total / trainable_total: the full parameters; frozen_materialized: full-shape frozen
    tensors present right now (0 under ZeRO-3 when every base weight is back in its partition);
    master_weights: fp32 copies the optimizer updates when they are not the module's parameters
    (ZeRO's partitions); optimizer_state: Adam moments (and step counters) on this rank."""
    m = unwrap(acc, model)
    out = dict.fromkeys(
        ("frozen_local", "frozen_total", "frozen_materialized", "trainable_local", "trainable_total",
         "master_weights", "optimizer_state"), 0)
    module_params = set()
    for p in m.parameters():
        module_params.add(id(p))
        es = p.element_size()
        kind = "trainable" if p.requires_grad else "frozen"
        local = _local_numel(p)
        out[f"{kind}_local"] += local * es
        out[f"{kind}_total"] += getattr(p, "ds_numel", p.numel()) * es
        if not p.requires_grad and not _is_dtensor(p):  # a DTensor is FSDP2's shard, never full here
            out["frozen_materialized"] += p.data.numel() * es
    inner = _innermost_optimizer(optimizer)
    zero = getattr(optimizer, "optimizer", None)  # ZeRO's optimizer under accelerate's wrapper
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: a master copy unless it aliases the partition
        live = {t.data_ptr() for t in getattr(zero, "fp16_partitioned_groups_flat", [])}
        masters = [t for t in zero.fp32_partitioned_groups_flat if t.data_ptr() not in live]
    elif hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        masters = list(zero.single_partition_of_fp32_groups)
    else:
        masters = [p for g in inner.param_groups for p in g["params"] if id(p) not in module_params]
    out["master_weights"] = sum(t.numel() * t.element_size() for t in masters)
    for st in inner.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                out["optimizer_state"] += v.numel() * v.element_size()
    return out


GRAD_BYTES_ENV = "DISTLORA_TEST_GRAD_BYTES"


def watch_gradient_bytes(acc, model, optimizer, memory: dict) -> None:
    """Test hook: with DISTLORA_TEST_GRAD_BYTES=1, measure the gradient memory of every step into
    memory["gradients"] (see GradientBytes). Off otherwise: it wraps library internals."""
    if os.environ.get(GRAD_BYTES_ENV):
        GradientBytes(acc, model, optimizer, memory)


def _zero_grad_buffers(zero):
    """(kind, tensor) for every gradient buffer a ZeRO optimizer holds (read from deepspeed 0.19.8,
    runtime/zero/stage_1_and_2.py and stage3.py). ZeRO-1/2: the reduce bucket(s) `ipg_buckets` (allocated
    at the first gradient hook of every backward, released by its epilogue), `grads_in_partition` (this
    rank's reduced partition of the micro step), `all_grad_tensors` / `averaged_gradients` (views of the
    partition accumulated over the window), the fp32 partition's .grad (its copy inside `step`). ZeRO-3:
    the reduce bucket (allocated once), `grad_partitions_flat_buffer` (the accumulated partition, allocated
    once), `averaged_gradients` (views of it), the fp32 partition's .grad (its copy inside `step`)."""
    for bucket in zero.ipg_buckets.values():
        buf = bucket.buffer
        for t in buf if isinstance(buf, list) else [buf]:
            yield "reduce_bucket", t
    yield "grad_partition", getattr(zero, "grads_in_partition", None)
    yield "grad_partition", getattr(zero, "grad_partitions_flat_buffer", None)
    for name in ("all_grad_tensors", "averaged_gradients"):
        for group in (getattr(zero, name, None) or {}).values():
            yield "grad_partition", getattr(group, "flat_partition", None)
            for t in group or []:
                yield "grad_partition", t
    stage12 = hasattr(zero, "single_partition_of_fp32_groups")
    for m in zero.single_partition_of_fp32_groups if stage12 else zero.fp32_partitioned_groups_flat:
        yield "fp32_grad", m.grad


class GradientBytes:
    """The most gradient memory this rank holds during a step: bytes of the distinct storages that hold
    gradients, taken where a step holds most and kept in memory["gradients"] (peak_bytes, where, bytes
    per kind at the peak, number of probes). Probes, all in training:
    - before each micro step's forward: what the window has accumulated so far (DDP between no_sync
      micro steps: p.grad next to the reducer's buckets);
    - under ZeRO, entering the engine's end-of-backward epilogue (ZeRO-3's peak in backward) and, for
      ZeRO-1/2, as the epilogue releases the reduce bucket: the bucket, the partition just reduced and
      the one accumulated over the window are all alive there;
    - before the torch optimizer's update: DDP's p.grad and buckets; ZeRO's fp32 gradient copy.
    Counted: the buffers of `_zero_grad_buffers`; DDP's bucket buffers (their sizes from the reducer;
    they live as long as it does); every trainable parameter's .grad (and ZeRO's .grad_accum) that is
    not inside one of those (under DDP a gradient that is a view is a view of its bucket). Not probed:
    DeepSpeed's transient flat copy inside ZeRO-1/2's `step` (this rank's partition, freed before the
    update; below the epilogue's peak whenever the reduce bucket is at least a partition)."""

    def __init__(self, acc, model, optimizer, memory: dict):
        module = unwrap(acc, model)  # its training flag: DeepSpeed's engine keeps its own at True in eval
        self.params = [p for p in module.parameters() if p.requires_grad]
        zero = getattr(optimizer, "optimizer", None)
        self.zero = zero if hasattr(zero, "ipg_buckets") else None
        self.accum = acc.gradient_accumulation_steps
        reducer = getattr(model, "reducer", None)  # DDP: its buckets live as long as the model
        self.ddp_bucket_bytes = sum(b.buffer().numel() * b.buffer().element_size()
                                    for b in reducer._get_zeros_like_grad_buckets()) if reducer else 0
        self.forwards = 0
        self.rec = memory.setdefault("gradients", {"peak_bytes": 0, "at": None, "by_kind": {}, "probes": 0})

        def before_forward(*_):
            if module.training:
                self.forwards += 1
                self.probe("before forward")

        model.register_forward_pre_hook(before_forward)
        _innermost_optimizer(optimizer).register_step_pre_hook(lambda *_: self.probe("before optimizer update"))
        if self.zero is not None:  # ZeRO-3's epilogue holds its peak on entry, ZeRO-1/2's as it releases the bucket
            for name, where in (("independent_gradient_partition_epilogue", "backward epilogue"),
                                ("_release_ipg_buffers", "reduce bucket release")):
                if hasattr(self.zero, name):
                    setattr(self.zero, name, self._probed(getattr(self.zero, name), f"before {where}"))

    def _probed(self, fn, where: str):
        def probed(*args, **kwargs):
            self.probe(where)
            return fn(*args, **kwargs)

        return probed

    def probe(self, where: str) -> None:
        seen: dict[int, tuple[str, int]] = {}  # storage data_ptr -> (kind, nbytes); the first kind claims it

        def add(kind, t):
            if torch.is_tensor(t) and t.numel():
                st = (t.to_local() if _is_dtensor(t) else t).untyped_storage()
                seen.setdefault(st.data_ptr(), (kind, st.nbytes()))

        if self.zero is not None:
            for kind, t in _zero_grad_buffers(self.zero):
                add(kind, t)
        for p in self.params:
            if not (self.ddp_bucket_bytes and p.grad is not None and p.grad._is_view()):  # a view: in a bucket
                add("param_grads", p.grad)
            add("param_grads", getattr(p, "grad_accum", None))
        if self.ddp_bucket_bytes:
            seen[-1] = ("ddp_buckets", self.ddp_bucket_bytes)
        total = sum(n for _, n in seen.values())
        self.rec["probes"] += 1
        if total >= self.rec["peak_bytes"]:  # the latest probe at the peak: the steady state
            by_kind: dict[str, int] = {}
            for kind, n in seen.values():
                by_kind[kind] = by_kind.get(kind, 0) + n
            step, micro = divmod(self.forwards - 1, self.accum)  # the micro step in progress
            self.rec.update(peak_bytes=total, by_kind=by_kind, at=f"step {step + 1} micro {micro + 1} {where}")


def ranks_not_sharing(acc, directory) -> list[int]:
    """Ranks that do not see `directory` as rank 0 does (multi-node needs one shared filesystem for
    checkpoints): rank 0 writes a fresh token there, every rank reads it back."""
    import uuid
    from pathlib import Path

    if acc.num_processes == 1:
        return []
    probe = Path(directory) / ".shared-dir-probe"
    token = gather_objects(acc, uuid.uuid4().hex if acc.is_main_process else None)[0]
    if acc.is_main_process:
        probe.write_text(token)
    barrier(acc)
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    blind = [r for r, ok in enumerate(gather_objects(acc, seen)) if not ok]
    barrier(acc)
    if acc.is_main_process:
        probe.unlink(missing_ok=True)
    return blind
