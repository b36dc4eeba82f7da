"""The one module that knows how the job is distributed (single process, DDP; DeepSpeed and FSDP
build on it). The training loop only calls what is defined here.

Measured traps this module closes (shared/reference/cpu-distributed-facts.md):
- on a CPU-only machine `accelerate launch --multi_gpu -n 2` starts 2 processes that each see
  world size 1 and train unsynchronised unless the Accelerator is built with cpu=True;
- the launcher's own mixed precision / accumulation settings would silently override the run
  config, which is the only owner of them here.
"""

from __future__ import annotations

import os
import torch


class DistributedSetupError(RuntimeError):
    """The processes were launched in a way that would train wrongly; the message says how to fix it."""


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


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
    return problems


def build_accelerator(cfg):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import GradientAccumulationPlugin

    kwargs = {}
    if cfg.log.report_to:
        from accelerate.utils import ProjectConfiguration

        kwargs["log_with"] = list(cfg.log.report_to)
        out = cfg.train.output_dir
        kwargs["project_config"] = ProjectConfiguration(project_dir=out, logging_dir=os.path.join(out, "tensorboard"))
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),  # CPU: real gloo DDP, not N unsynchronised copies
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
    return acc


def data_parallel_size(acc) -> int:
    """Ranks that see different data (no tensor/context parallelism here)."""
    return acc.num_processes


def check_wrapped(acc, model) -> None:
    """Refuse to train when several processes run but gradients would not be synchronised."""
    from accelerate.utils import DistributedType

    if acc.num_processes == 1:
        return
    if acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise DistributedSetupError(
            f"world size {acc.num_processes} but the model is not wrapped for distributed training "
            f"(distributed type {acc.distributed_type}); gradients would not be synchronised"
        )


def unwrap(acc, model):
    return acc.unwrap_model(model)


def adapter_state_dict(acc, model) -> dict[str, torch.Tensor]:
    """Full-shape adapter tensors (PEFT key format), on CPU, on every rank."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unwrap(acc, model))
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def load_adapter_state(acc, model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unwrap(acc, model), state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"checkpoint adapter has keys the model lacks: {unexpected[:5]}")


def optimizer_state(acc, optimizer) -> dict:
    return optimizer.state_dict()


def load_optimizer_state(acc, optimizer, state: dict) -> None:
    optimizer.load_state_dict(state)


def barrier(acc) -> None:
    acc.wait_for_everyone()



class GradCommCounter:
    """Counts the gradient bytes DDP all-reduces (a comm hook around the default all-reduce)."""

    def __init__(self, acc, model):
        self.bytes = 0
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def hook(state, bucket):
                self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
                return default_hooks.allreduce_hook(state, bucket)

            model.register_comm_hook(None, hook)

    def take(self) -> int:
        n, self.bytes = self.bytes, 0
        return n
