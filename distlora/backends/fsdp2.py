"""FSDP2: torch's `fully_shard` per decoder layer and at the root, on CPU (gloo) and GPUs alike.

accelerate cannot drive FSDP on CPU (it sets FSDP only for the GPU family of distributed types, its
plugin raises without a device, and under MULTI_CPU `prepare(model)` wraps in DDP), so this class
shards the model itself over a plain multi-process accelerate launch (`train.backend: fsdp2`) and
passes only the optimizer and the data loader to `prepare`: CI runs the code GPUs run.

- Every parameter becomes a DTensor shard (dim 0 over the ranks): each rank holds ~1/N of the base.
  The optimizer is built after sharding, over the shards (a list of the original parameters would
  keep the unsharded tensors alive).
- Mixed precision as under DDP: parameters keep their dtypes (bf16 base, fp32 adapter), compute runs
  under accelerate's autocast, and gradients are reduce-scattered in fp32
  (MixedPrecisionPolicy(reduce_dtype=float32); accelerate's own FSDP2 default reduces in bf16).
- Accumulation: gradient sync (the reduce-scatter) only on the window's last micro step
  (`set_requires_gradient_sync`); the reduce-scatter averages over ranks like DDP: same loss scale.
- Clipping on the DTensor gradients (the norm is a collective); the adapter is gathered with
  `full_tensor` for saving and written back into the shards with torch's full-state-dict loader; the
  optimizer state is saved in full (FQN keys, adapter-sized), so it reshards to another world size.
"""

from __future__ import annotations

import contextlib

import torch

from distlora.backends.base import Backend, DistributedSetupError, resolve_mixed_precision

OPTIMIZER_FILE = "optimizer-full.pt"


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class FSDP2(Backend):
    name = "fsdp2"
    reduce_dtype = torch.float32  # the gradient reduce-scatter's dtype, as DDP's all-reduce of fp32 gradients

    @classmethod
    def conflicts(cls, cfg) -> list[str]:
        problems = []
        if cfg.model.quantization is not None:
            problems.append("model.quantization: 4-bit base weights are not floating point and FSDP2 cannot shard "
                            "them; use train.backend=zero3 (quant_storage = compute dtype) or ddp for QLoRA")
        if resolve_mixed_precision(cfg) == "fp16":
            problems.append("train.mixed_precision: fp16 needs a gradient scaler that FSDP2 here does not run; "
                            "use bf16 (or no)")
        return problems

    def build_accelerator(self):
        acc = super().build_accelerator()
        import torch.distributed as tdist

        if not tdist.is_initialized():  # one process: fully_shard still needs a (world of 1) group
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)
        return acc

    def prepare(self, model, make_optimizer, train_loader):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        import torch.distributed as tdist

        model.to(self.acc.device)
        mesh = init_device_mesh(self.acc.device.type, (tdist.get_world_size(),))
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=self.reduce_dtype)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layer_types = set(getattr(base, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in layer_types]
        if not layers:
            raise DistributedSetupError(
                f"train.backend: fsdp2 shards per decoder layer, but {type(base).__name__} names none "
                "(_no_split_modules); use train.backend=ddp or zero3")
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        forward = model.forward

        def autocast_forward(*args, **kwargs):  # what accelerate's prepare(model) would add
            with self.acc.autocast():
                return forward(*args, **kwargs)

        model.forward = autocast_forward
        self.model = model
        optimizer = make_optimizer(model)  # over the shards
        self.optimizer, loader = self.acc.prepare(optimizer, train_loader)
        self.check_wrapped()
        from distlora import hooks

        hooks.point("prepared", backend=self)
        return self.model, self.optimizer, loader

    def check_wrapped(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.model, FSDPModule):
            raise DistributedSetupError("train.backend fsdp2 but the model is not sharded by fully_shard")

    def unwrap(self):
        return self.model

    @contextlib.contextmanager
    def generating(self):
        """transformers sees our fully_shard model only as a plain module (its own FSDP check reads an
        attribute its loader sets), and PEFT's generate calls the base model's forward, not the root's: the
        root's parameters (embeddings, final norm, head; sharded again by each backward) are gathered here
        for the whole generation, the layers gather in their own forwards, and every rank steps until all
        are done."""
        root = self.model
        # before any forward of the root (a generation first thing in a run), a layer's forward would take
        # itself for the root, and FSDP would refuse the root's own initialisation later
        root._get_fsdp_state()._lazy_init()
        root.unshard()
        try:
            yield self.acc.num_processes > 1
        finally:
            root.reshard()

    def micro_step(self, model, last: bool):
        model.set_requires_gradient_sync(last)  # reduce-scatter only at the window's end
        return self.acc.accumulate(model)

    def clip(self, params, max_norm):
        """The norm exactly as DDP computes it (torch's clip_grad_norm_ over full gradients): each
        adapter gradient is gathered (adapter-sized: one all-gather of A bytes), so the clipped update
        is bitwise DDP's; the shards are then scaled in place by the same coefficient."""
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm([g.full_tensor() if _is_dtensor(g) else g for g in grads], 2.0)
        coef = torch.clamp((max_norm or float("inf")) / (total + 1e-6), max=1.0)
        for g in grads:
            (g._local_tensor if _is_dtensor(g) else g).mul_(coef)
        return total

    def comm_bytes_per_step(self) -> int:
        """Per micro step, every unit's parameters are all-gathered for the forward and, except the
        root's (kept unsharded between forward and backward), again for the backward; on the
        window's last micro step the adapter's fp32 gradients are reduce-scattered. Each collective
        counted by its full (padded) size; then the gradients are gathered once for the norm (`clip`)."""
        from torch.distributed.fsdp import FSDPModule

        n = self.acc.num_processes
        root, gather = 0, 0
        for m in self.model.modules():
            if not isinstance(m, FSDPModule):
                continue
            group = m._get_fsdp_state()._fsdp_param_group
            if group is None:
                continue
            size = sum(self._padded(p.sharded_param, n) * p.sharded_param.element_size() for p in group.fsdp_params)
            if m is self.model:
                root += size
            else:
                gather += size
        grads = sum(self._padded(p, n) * 4 for p in self.model.parameters() if p.requires_grad)
        accum = self.acc.gradient_accumulation_steps
        norm = sum(p.numel() * 4 for p in self.model.parameters() if p.requires_grad)  # clip: full gradients
        return accum * (root + 2 * gather) + grads + norm

    @staticmethod
    def _padded(p, n: int) -> int:
        """Elements of `p` as FSDP2 stores it: dim 0 padded to a multiple of the ranks."""
        rows = p.shape[0] if p.dim() else 1
        return -(-rows // n) * n * (p.numel() // max(rows, 1))

    # ------------------------------------------------------------------ adapter and optimizer state

    @staticmethod
    def _full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if _is_dtensor(t) else t

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        m = self.model
        name = m.active_adapter
        full = {n: state[n.replace(f".{name}.", ".")] for n, p in m.named_parameters() if p.requires_grad}
        set_model_state_dict(m, full, options=StateDictOptions(full_state_dict=True, strict=False))

    def save_optimizer_state(self, ckpt_tmp) -> None:
        from pathlib import Path

        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(self.model, self.optimizer.optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.acc.is_main_process:
            torch.save(sd, Path(ckpt_tmp) / OPTIMIZER_FILE)

    def load_optimizer_state(self, ckpt) -> None:
        from pathlib import Path

        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        f = Path(ckpt) / OPTIMIZER_FILE
        if not f.is_file():
            raise DistributedSetupError(f"{ckpt} holds no {OPTIMIZER_FILE}; it was written by another backend")
        sd = torch.load(f, weights_only=False)
        set_optimizer_state_dict(self.model, self.optimizer.optimizer, sd,
                                 options=StateDictOptions(full_state_dict=True))

    # ------------------------------------------------------------------ memory

    def release_gathered(self) -> None:
        """The root unit stays unsharded after a forward (its backward would need it at once); after
        a forward-only pass (eval) put it back in its shards."""
        self.model.reshard()

    def _local_numel(self, p) -> int:
        return p.to_local().numel() if _is_dtensor(p) else p.numel()

    def _is_shard(self, p) -> bool:
        return _is_dtensor(p)

