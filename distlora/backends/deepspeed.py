"""DeepSpeed ZeRO-2 / ZeRO-3, picked by the accelerate config (distributed_type: DEEPSPEED and its JSON).

- The engine steps inside `accelerator.backward` at the accumulation boundary (optimizer.step and
  zero_grad are no-ops there) and clips with the JSON's `gradient_clipping`, filled from
  train.max_grad_norm, so a window's non-finite loss must already be a non-finite gradient by
  then (the loop makes it one), and `clip`/`step` only read what the engine did.
- Loss scaling: the engine divides the loss by its gradient_accumulation_steps (set to the run
  config's) and ZeRO averages gradients over the ranks, like DDP: the base class's loss_scale
  undoes both (tests/test_backends.py proves it against DDP).
- ZeRO-3 partitions every parameter: adapter tensors are gathered for saving, written back gathered
  for loading.
- The optimizer state (adapter-sized) is saved in full, keyed by parameter name: each adapter
  parameter's fp32 master weight and Adam moments gathered from the ZeRO partitions (DeepSpeed's
  safe_get_full_* helpers), the step count, the param groups' hyperparameters, the engine's step
  counters and the loss scaler's state; loading sets them back into whatever partitions this run
  has (safe_set_full_*), so a checkpoint resumes on any number of ranks.
- On CPU the process group must be gloo, and `cpu=True` must not be passed (it silently turns a
  DeepSpeed launch into plain DDP).
"""

from __future__ import annotations

import json
import os

import torch

from distlora.backends.base import Backend, DistributedSetupError, env_true, env_world_size, resolve_mixed_precision

OPTIMIZER_FILE = "optimizer-zero.pt"  # inside a checkpoint: the full optimizer state (rank 0 writes it)
# The engine counters and the (fp16) loss scaler's evolving state, restored with the optimizer.
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
SCALER_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def launched() -> bool:
    """`accelerate launch` with a DeepSpeed config (distributed_type: DEEPSPEED)."""
    return env_true("ACCELERATE_USE_DEEPSPEED")


def zero_stage_from_env() -> int | None:
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if launched() and path:
        try:
            with open(path) as fh:
                return int(_get(json.load(fh), "zero_optimization.stage") or 0)
        except (OSError, ValueError, TypeError):
            return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if launched() and stage else None


def _get(conf: dict, dotted: str):
    cur = conf
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _num_eq(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def owned_values(cfg, mp: str) -> dict:
    """The DeepSpeed JSON values the run config owns, as DeepSpeed spells them.

    bf16 runs as on every other backend: the frozen base in bf16, compute under autocast, and the
    adapter, its gradient reduction, master weights and optimizer state in fp32. DeepSpeed's own bf16
    mode would cast the adapter to bf16 and reduce its gradients in bf16, so it stays off and the
    engine's `torch_autocast` runs the forward in bf16 instead; its lower_precision_safe_modules
    (default: nn.Linear, which LoRA's A and B are) would reduce those modules' gradients in bf16, so
    the list is empty (deepspeed 0.19.8 runtime/torch_autocast.py: the list only sets each
    parameter's communication dtype; compute is one autocast around the whole forward)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * env_world_size(),
        "gradient_clipping": float(t.max_grad_norm or 0.0),  # 0 = no clipping in DeepSpeed
        "fp16.enabled": mp == "fp16",
        "bf16.enabled": False,
        "torch_autocast.enabled": mp == "bf16",
        "torch_autocast.dtype": "bfloat16",
        "torch_autocast.lower_precision_safe_modules": [],
    }


_WHERE = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_batch_size": "train.micro_batch_size x train.gradient_accumulation_steps x processes",
    "gradient_clipping": "train.max_grad_norm",
    "fp16.enabled": "train.mixed_precision",
    "bf16.enabled": "train.mixed_precision (bf16 runs through torch_autocast with an fp32 adapter)",
    "torch_autocast.enabled": "train.mixed_precision",
    "torch_autocast.dtype": "train.mixed_precision",
    "torch_autocast.lower_precision_safe_modules": "train.mixed_precision (adapter gradients reduced in fp32)",
}


class DeepSpeed(Backend):
    def __init__(self, cfg, stage: int):
        super().__init__(cfg)
        self.stage = stage
        self.name = f"zero{stage}"
        self._frozen_sharded = None  # ZeRO-3: the partitioned frozen parameters, listed once

    @classmethod
    def conflicts(cls, cfg) -> list[str]:
        """The cpu flag, and JSON values (other than "auto") that contradict the run config or take
        over what it owns (optimizer, scheduler)."""
        mp = resolve_mixed_precision(cfg)
        problems = []
        if env_true("ACCELERATE_USE_CPU"):
            problems.append(
                "launcher: the accelerate config sets use_cpu (or --cpu) together with DeepSpeed; accelerate then "
                "silently trains plain DDP without ZeRO. Remove use_cpu: DeepSpeed finds the CPU by itself"
            )
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        owned = owned_values(cfg, mp)
        if not path:  # inline deepspeed_config in the accelerate YAML: only clipping reaches us through env
            clip = os.environ.get("ACCELERATE_GRADIENT_CLIPPING")
            if clip not in (None, "", "none") and float(clip) != owned["gradient_clipping"]:
                problems.append(
                    f"train.max_grad_norm: the accelerate config sets gradient_clipping: {clip} but the run config "
                    f"says {cfg.train.max_grad_norm}; remove it from the accelerate config"
                )
            return problems
        try:
            with open(path) as fh:
                conf = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            return problems + [f"launcher: cannot read the DeepSpeed config '{path}': {exc}"]
        for key, want in owned.items():
            got = _get(conf, key)
            if got is None or got == "auto":
                continue
            if isinstance(want, bool):
                same = str(got).lower() == str(want).lower()
            elif isinstance(want, (int, float)):
                same = _num_eq(got, want)
            else:
                same = got == want
            if not same:
                problems.append(
                    f"{_WHERE[key]}: the DeepSpeed config {path} sets {key}: {json.dumps(got)} but the run config gives "
                    f"{json.dumps(want)}; the run config owns it: set \"{key}\": \"auto\" in the JSON"
                )
        if cfg.train.nonfinite == "skip":
            # a skipped window is handed to the engine with a non-finite gradient, which ZeRO discards
            # only when it checks (see step)
            for key, fix in (("bf16.check_grad_overflow", "true"), ("zero_optimization.compute_grad_norm", "true")):
                if _get(conf, key) is False:
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
        q = cfg.model.quantization
        want = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}[mp]
        if zero_stage_from_env() == 3 and q is None and cfg.model.dtype not in ("auto", want):
            # accelerate registers transformers' DeepSpeed hook whatever zero3_init_flag says, so the base
            # is built inside zero.Init, in the precision of the engine config, whatever dtype is asked
            problems.append(f"model.dtype: ZeRO-3 builds the base in the training precision ({want} under "
                            f"train.mixed_precision {mp}), not {cfg.model.dtype}; set model.dtype: auto")
        if q is not None and q.quant_storage == "uint8" and zero_stage_from_env() == 3:
            problems.append(
                f"model.quantization.quant_storage: uint8 cannot be sharded by ZeRO-3; set it to {q.compute_dtype}"
            )
        return problems

    # ------------------------------------------------------------------ building

    def accelerator_kwargs(self) -> dict:
        from accelerate.utils import InitProcessGroupKwargs

        # Never cpu=True here: it silently replaces ZeRO by plain DDP. On CPU the group must be gloo, or
        # DeepSpeed's batch-size check sees a world of 1 and fails.
        return {} if torch.cuda.is_available() else {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}

    def build_accelerator(self):
        from accelerate.utils import DistributedType

        acc = super().build_accelerator()
        if acc.distributed_type != DistributedType.DEEPSPEED:
            raise DistributedSetupError(
                f"the accelerate config asks for DeepSpeed but accelerate built {acc.distributed_type}; refusing to "
                "train without ZeRO"
            )
        # The run config's values over the JSON's "auto"s before `prepare` (accelerate would fill
        # gradient_clipping "auto" with 1.0 whatever train.max_grad_norm says).
        conf = acc.state.deepspeed_plugin.deepspeed_config
        for key, value in owned_values(self.cfg, self.mixed_precision).items():
            node, *rest = key.split(".")
            if rest:
                conf.setdefault(node, {})[rest[0]] = value
            else:
                conf[key] = value
        return acc

    def check_wrapped(self) -> None:
        from deepspeed import DeepSpeedEngine

        if not isinstance(self.model, DeepSpeedEngine):
            raise DistributedSetupError("DeepSpeed launch but the model is not a DeepSpeed engine after prepare")
        engine_accum = self.acc.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"]
        if engine_accum != self.acc.gradient_accumulation_steps:
            raise DistributedSetupError(
                f"DeepSpeed accumulates {engine_accum} micro steps, the loop {self.acc.gradient_accumulation_steps}")

    # ------------------------------------------------------------------ the step

    def clip(self, params, max_norm):
        """The engine already clipped (and stepped) inside the last backward: its global norm before
        clipping, as a tensor (NaN when the engine computed none)."""
        norm = self.acc.clip_grad_norm_(params, max_norm)
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float64)

    def step(self, grad_norm: float) -> bool:
        """Whether the engine's step inside the last backward changed the parameters: ZeRO checks the
        gradient for inf/NaN at the step (every dtype on stage 3; stages 1/2 unless
        bf16.check_grad_overflow or zero_optimization.compute_grad_norm is off, which `conflicts` refuses
        under train.nonfinite=skip) and then discards the window's gradients instead."""
        return bool(self.acc.deepspeed_engine_wrapped.engine.was_step_applied())

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # a no-op: the engine zeroes its own buffers

    def comm_bytes_per_step(self) -> int | None:
        """ZeRO-2 reduces the adapter's gradients on every micro step (DeepSpeed has no no_sync),
        all-gathers the updated adapter partitions after the step and all-reduces one fp32 grad norm.
        ZeRO-3 also gathers the base in every forward and backward: not modelled (None)."""
        if self.stage != 2:
            return None
        a = sum(p.numel() * 4 for p in self.unwrap().parameters() if p.requires_grad)  # fp32 gradients
        return self.acc.gradient_accumulation_steps * a + a + 4

    # ------------------------------------------------------------------ adapter and optimizer state

    def _gathered(self, params, modifier_rank=None):
        import contextlib

        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def generating(self):
        import contextlib

        # ZeRO-3 gathers each module's parameters in its forward: a collective in every generated token
        return contextlib.nullcontext(self.stage == 3 and self.acc.num_processes > 1)

    def _zero(self):
        """ZeRO's optimizer under accelerate's wrapper: owns the flat fp32 partitions."""
        return self.optimizer.optimizer

    def _flat_partitions(self) -> list:
        """This rank's flat fp32 master partitions, one per ZeRO group: the keys of the torch optimizer's state."""
        zero = self._zero()
        if self.stage == 3:
            return list(zero.fp32_partitioned_groups_flat)
        return list(zero.single_partition_of_fp32_groups)

    def _link_optimizer_state(self) -> None:
        """ZeRO-2: point each parameter's fragment at the flat optimizer state it lives in (views, no
        copy), which safe_get/set_full_optimizer_state read. DeepSpeed 0.19.8 links once, right after
        the first group's first step (stage_1_and_2.py _optimizer_step), so with several param groups
        (LoRA+, biases) the later groups' fragments would point at an empty state."""
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        zero = self._zero()
        if self.stage != 3:
            for lp_params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
                lazy_init_hp_params_optimizer_state(lp_params, flat, zero.optimizer.state)

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.unwrap().named_parameters() if p.requires_grad]

    def save_optimizer_state(self, ckpt_tmp) -> None:
        """The optimizer state in full, keyed by parameter name (a collective per tensor: every rank
        calls; rank 0 writes). Adapter-sized: 3 fp32 copies of the adapter."""
        from pathlib import Path

        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        inner = self._zero().optimizer
        states = [inner.state[f] for f in self._flat_partitions() if f in inner.state]
        # Moment names: the state's flat-partition-shaped tensors; none before the first applied step
        keys = sorted(k for k, v in states[0].items() if torch.is_tensor(v) and v.dim() == 1) if states else []
        steps = {float(st["step"]) for st in states}
        if len(steps) > 1:
            raise RuntimeError(f"ZeRO partitions hold different optimizer step counts {sorted(steps)}")
        if keys:
            self._link_optimizer_state()
        params = {}
        for name, p in self._trainable():
            entry = {"master": safe_get_full_fp32_param(p).detach().to("cpu", copy=True)}
            for k in keys:
                entry[k] = safe_get_full_optimizer_state(p, k).detach().to("cpu", copy=True)
            params[name] = entry
        engine = self.model
        sd = {
            "params": params,
            "step": states[0]["step"].detach().to("cpu", copy=True) if states else None,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups],
            "engine": {k: getattr(engine, k) for k in ENGINE_COUNTERS},
            "loss_scaler": {k: getattr(self._zero().loss_scaler, k) for k in SCALER_STATE
                            if hasattr(self._zero().loss_scaler, k)},
        }
        if self.acc.is_main_process:
            torch.save(sd, Path(ckpt_tmp) / OPTIMIZER_FILE)

    def load_optimizer_state(self, ckpt) -> None:
        """Set the full state back into this run's partitions, whatever number of ranks wrote it (every
        rank calls, after the adapter is loaded into the module)."""
        from pathlib import Path

        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        f = Path(ckpt) / OPTIMIZER_FILE
        if not f.is_file():
            raise DistributedSetupError(f"{ckpt} holds no {OPTIMIZER_FILE}; it was written by another backend")
        sd = torch.load(f, weights_only=True, map_location="cpu")
        zero, inner = self._zero(), self._zero().optimizer
        trainable = self._trainable()
        if set(sd["params"]) != {n for n, _ in trainable} or len(sd["param_groups"]) != len(inner.param_groups):
            raise DistributedSetupError(f"{ckpt}: its optimizer state holds other parameters or groups than this model")
        if sd["step"] is not None:
            keys = [k for k in next(iter(sd["params"].values())) if k != "master"]
            for flat in self._flat_partitions():
                # A fresh engine has no state before its first step: made here as torch's AdamW makes
                # it (zeros, then overwritten below); an existing one is overwritten in place, which
                # keeps ZeRO-2's fragment views of it valid.
                st = inner.state[flat]
                for k in keys:
                    if k not in st:
                        st[k] = torch.zeros_like(flat)
                if "step" in st:
                    st["step"].copy_(sd["step"])
                else:
                    st["step"] = sd["step"].clone()
            self._link_optimizer_state()
            for name, p in trainable:
                for k in keys:
                    safe_set_full_optimizer_state(p, sd["params"][name][k].to(p.device), k)
        for name, p in trainable:
            safe_set_full_fp32_param(p, sd["params"][name]["master"].to(p.device))
        for group, saved in zip(inner.param_groups, sd["param_groups"]):
            group.update(saved)
        for k, v in sd["engine"].items():
            setattr(self.model, k, v)
        for k, v in sd["loss_scaler"].items():
            setattr(zero.loss_scaler, k, v)

    # ------------------------------------------------------------------ memory

    def release_gathered(self) -> None:
        """A training step returns ZeRO-3 parameters to their partitions in backward; a forward-only
        pass (eval) leaves those DeepSpeed expects to reuse soon gathered."""
        if self.stage == 3:
            self.model.empty_partition_cache()

    def gathered_base_bytes(self) -> int:
        """Under ZeRO-3, bytes of frozen base parameters NOT in their partitioned state right now:
        DeepSpeed's `ds_status` is AVAILABLE or INFLIGHT (deepspeed/runtime/zero/partition_parameters.py,
        ZeroParamStatus), or full-shape data is still attached. Parameters DeepSpeed keeps whole by
        design (`ds_persist`: below stage3_param_persistence_threshold) are not counted. One pass over
        the frozen parameters (listed once), no collective, no allocation: cheap after every step."""
        if self.stage != 3:
            return 0
        if self._frozen_sharded is None:
            self._frozen_sharded = [p for p in self.unwrap().parameters() if not p.requires_grad and not p.ds_persist]
        return partition_leaks(self._frozen_sharded)

    def _local_numel(self, p) -> int:
        return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()

    def _master_weights(self, inner, module_params: set) -> list:
        zero = getattr(self.optimizer, "optimizer", None)  # ZeRO's optimizer under accelerate's wrapper
        if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: a master copy unless it aliases the partition
            live = {t.data_ptr() for t in getattr(zero, "fp16_partitioned_groups_flat", [])}
            return [t for t in zero.fp32_partitioned_groups_flat if t.data_ptr() not in live]
        return list(zero.single_partition_of_fp32_groups)  # ZeRO-1/2


def partition_leaks(frozen) -> int:
    """Bytes of ZeRO-3 parameters in `frozen` that are not in their partitioned state."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    n = 0
    for p in frozen:
        if p.ds_status is not ZeroParamStatus.NOT_AVAILABLE or p.data.numel():
            n += p.ds_numel * p.element_size()
    return n


