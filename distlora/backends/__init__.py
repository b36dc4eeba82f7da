"""The backends: one class each (single process, DDP, DeepSpeed ZeRO-2/3, FSDP2), chosen once from the
run config and the launch before the accelerator is built. Everything that differs between them lives
in its class; the training loop (distlora/loop.py) calls only the interface of `base.Backend`.

| backend | chosen by | what is sharded |
| single  | one process | nothing |
| ddp     | several processes, plain accelerate config (cpu_ddp.yaml, multi_gpu.yaml) | nothing (adapter grads all-reduced) |
| zero2   | accelerate config with a DeepSpeed JSON of stage 2 | adapter optimizer state and gradients |
| zero3   | the same with stage 3 | also the frozen base |
| fsdp2   | `train.backend: fsdp2` over a plain accelerate config | base and adapter, per decoder layer |

The run config's `train.backend` may also name zero2/zero3/ddp: then the launch must agree.
"""

from __future__ import annotations

import os

from distlora.backends.base import (
    Backend,
    DistributedSetupError,
    env_rank,
    env_true,
    env_world_size,
    resolve_mixed_precision,
)

__all__ = ["Backend", "DistributedSetupError", "env_rank", "env_world_size", "launched_backend", "select",
           "launcher_conflicts", "resolve_mixed_precision"]


def launched_backend() -> str:
    """What the accelerate launch asks for, read from the ACCELERATE_* variables it exports."""
    from distlora.backends import deepspeed

    if deepspeed.launched():
        return f"zero{deepspeed.zero_stage_from_env() or 2}"
    if env_true("ACCELERATE_USE_FSDP"):
        return "fsdp2"
    return "ddp" if env_world_size() > 1 else "single"


def _name(cfg) -> tuple[str, list[str]]:
    """The backend this run uses, and the problems of choosing it."""
    launched, want = launched_backend(), cfg.train.backend
    if want == "auto":
        return launched, []
    if want == "fsdp2" and launched in ("ddp", "single", "fsdp2"):
        return "fsdp2", []
    if want == "ddp" and launched == "single":
        return "single", []  # one process: nothing to synchronise
    if want == launched:
        return want, []
    how = {"zero2": "an accelerate config with a DeepSpeed stage-2 JSON (configs/accelerate/cpu_deepspeed_zero2.yaml)",
           "zero3": "an accelerate config with a DeepSpeed stage-3 JSON (configs/accelerate/cpu_deepspeed_zero3.yaml)",
           "fsdp2": "a plain multi-process accelerate config (configs/accelerate/cpu_ddp.yaml or multi_gpu.yaml)",
           "ddp": "a plain multi-process accelerate config", "single": "one process"}[want]
    return launched, [f"train.backend: the run config asks for {want} but the accelerate launch is {launched}; "
                      f"launch {want} with {how}, or set train.backend=auto"]


def _class(name: str):
    if name in ("zero2", "zero3"):
        from distlora.backends.deepspeed import DeepSpeed

        return DeepSpeed
    if name == "fsdp2":
        from distlora.backends.fsdp2 import FSDP2

        return FSDP2
    if name == "ddp":
        from distlora.backends.ddp import DDP

        return DDP
    return Backend


def launcher_conflicts(cfg) -> list[str]:
    """Settings of the launch that contradict the run config (which owns precision, batch and
    accumulation), and what the chosen backend cannot do with this run config."""
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
    from distlora.sequence_parallel import launch_problems

    name, choice_problems = _name(cfg)
    from distlora.config import lora_init_backend_problems

    return (problems + launch_problems(cfg, env_world_size()) + choice_problems + _class(name).conflicts(cfg)
            + lora_init_backend_problems(cfg.lora, name))


def select(cfg) -> Backend:
    """The backend object for this run (call after `launcher_conflicts` found nothing)."""
    name, problems = _name(cfg)
    if problems:
        raise DistributedSetupError(problems[0])
    if name == "fsdp2":
        # our own fully_shard over a plain launch: accelerate must not build its FSDP plugin
        for key in [k for k in os.environ if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"]:
            del os.environ[key]
    cls = _class(name)
    if name in ("zero2", "zero3"):
        return cls(cfg, int(name[-1]))
    return cls(cfg)
