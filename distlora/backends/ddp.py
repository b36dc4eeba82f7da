"""DDP over several processes (gloo on CPU, NCCL on GPUs): every rank holds the whole base; only the
adapter's gradients are all-reduced, once per optimizer step (no sync on accumulation micro steps).

Gradients are views of the reducer's all-reduce buckets (gradient_as_bucket_view, zeroed in place
between steps, created before the reducer so that even the first window accumulates there): a step
holds the adapter's gradients once, not twice."""

from __future__ import annotations

import torch

from distlora.backends.base import Backend, DistributedSetupError


class DDP(Backend):
    name = "ddp"

    def accelerator_kwargs(self) -> dict:
        from accelerate.utils import DistributedDataParallelKwargs

        return {**super().accelerator_kwargs(),
                "kwargs_handlers": [DistributedDataParallelKwargs(gradient_as_bucket_view=True)]}

    def prepare(self, model, make_optimizer, train_loader):
        # an existing gradient becomes a view of its bucket when the reducer is built
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        return super().prepare(model, make_optimizer, train_loader)

    def check_wrapped(self) -> None:
        if not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            raise DistributedSetupError(
                f"world size {self.acc.num_processes} but the model is not wrapped for distributed training "
                f"(distributed type {self.acc.distributed_type}); gradients would not be synchronised"
            )

    def zero_grad(self) -> None:
        # in place: set to None, the next window's first backward would allocate fresh gradients next
        # to the buckets and the bucket views would be lost until the window's all-reduce
        self.optimizer.zero_grad(set_to_none=False)

    def comm_bytes_per_step(self) -> int:
        """One all-reduce of the adapter's gradients per optimizer step."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
