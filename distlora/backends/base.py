"""The backend interface, implemented for one process (`Single`); the other backends override what
differs. The training loop calls only these methods: it has no backend branch of its own.

One window (optimizer step) as the loop drives it:

    scale = backend.loss_scale(n_target)          # undoes the backend's 1/accum and 1/ranks
    for i, batch in enumerate(window):
        with backend.micro_step(model, last=i == accum - 1):
            backend.backward(nll * scale)
    norm = backend.clip(params, max_grad_norm)    # a device tensor: no host read
    ...                                           # the loop's one host read of the step
    applied = backend.step(float(norm))
    backend.zero_grad()

`step` hides where the update happens (after backward here and under DDP and FSDP2; inside the last
backward under DeepSpeed) and whether it was applied (a non-finite gradient is never applied; an
fp16 scaler skips an overflow and lowers its scale). Nothing here reads a device value on the host:
the loop reads the grad norm once per step together with its own bookkeeping.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from distlora import hooks


class DistributedSetupError(RuntimeError):
    """The processes were launched in a way that would train wrongly; the message says how to fix it."""


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def resolve_mixed_precision(cfg) -> str:
    mp = cfg.train.mixed_precision
    if mp != "auto":
        return mp
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def innermost_optimizer(optimizer):
    """The torch optimizer under accelerate's and ZeRO's wrappers (holds the Adam moments)."""
    o = optimizer
    while hasattr(o, "optimizer"):
        o = o.optimizer
    return o


class Backend:
    """One process, no wrapper: the reference every other backend is compared with."""

    name = "single"

    def __init__(self, cfg):
        self.cfg = cfg
        self.mixed_precision = resolve_mixed_precision(cfg)  # no | bf16 | fp16: the run config's, resolved
        self.acc = None
        self.model = None  # what `prepare` returned: the module the loop calls
        self.optimizer = None

    # ------------------------------------------------------------------ launch-time checks

    @classmethod
    def conflicts(cls, cfg) -> list[str]:
        """Problems of this backend with the launch and the run config, found before anything loads."""
        return []

    # ------------------------------------------------------------------ building

    def accelerator_kwargs(self) -> dict:
        # CPU without DeepSpeed: real gloo DDP, not N unsynchronised copies (cpu-distributed-facts.md)
        return {"cpu": not torch.cuda.is_available()}

    def build_accelerator(self):
        from accelerate import Accelerator, DataLoaderConfiguration
        from accelerate.utils import GradientAccumulationPlugin

        kwargs = self.accelerator_kwargs()
        self._with_timeout(kwargs)
        if self.cfg.log.report_to:
            from accelerate.utils import ProjectConfiguration

            out = self.cfg.train.output_dir
            kwargs["log_with"] = list(self.cfg.log.report_to)
            kwargs["project_config"] = ProjectConfiguration(project_dir=out, logging_dir=os.path.join(out, "tensorboard"))
        self.acc = Accelerator(
            mixed_precision=self.mixed_precision,
            # Windows always hold whole global batches (data.py pads the last one), so the
            # accumulation boundary never follows the end of the dataloader.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=self.cfg.train.gradient_accumulation_steps, sync_with_dataloader=False
            ),
            # No even_batches: it would repeat early examples to fill the last batch.
            dataloader_config=DataLoaderConfiguration(even_batches=False, split_batches=False),
            **kwargs,
        )
        if self.acc.num_processes != env_world_size():
            raise DistributedSetupError(
                f"{env_world_size()} processes were launched but accelerate built a world of {self.acc.num_processes} "
                f"({self.acc.distributed_type}); every process would train alone on the same data. Launch with "
                "`accelerate launch --config_file configs/accelerate/cpu_ddp.yaml` (CPU) or multi_gpu.yaml (GPUs)."
            )
        return self.acc

    def _with_timeout(self, kwargs: dict) -> None:
        """train.collective_timeout_s into the process group's init (accelerate passes it to
        init_process_group, or to deepspeed.init_distributed): a rank waiting on another longer than that
        fails with a timeout error instead of hanging (NCCL's watchdog default is 10 minutes, gloo's 30)."""
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        handlers = kwargs.setdefault("kwargs_handlers", [])
        init = next((h for h in handlers if isinstance(h, InitProcessGroupKwargs)), None)
        if init is None:
            init = InitProcessGroupKwargs()
            handlers.append(init)
        seconds = self.cfg.train.collective_timeout_s
        # accelerate's to_kwargs passes only values that differ from its own defaults (600 s): one equal
        # to it would be dropped and torch's 30-minute default used on gloo and DeepSpeed
        init.timeout = timedelta(seconds=seconds if seconds != 600 else 600.001)

    def prepare(self, model, make_optimizer, train_loader):
        """Wrap the model, build its optimizer (`make_optimizer(model)`) and prepare the loader."""
        self.model, self.optimizer, loader = self.acc.prepare(model, make_optimizer(model), train_loader)
        self.check_wrapped()
        hooks.point("prepared", backend=self)
        return self.model, self.optimizer, loader

    def check_wrapped(self) -> None:
        """Refuse to train when several processes run but gradients would not be synchronised."""
        if self.acc.num_processes > 1:
            raise DistributedSetupError(
                f"world size {self.acc.num_processes} but the model is not wrapped for distributed training "
                f"(distributed type {self.acc.distributed_type}); gradients would not be synchronised"
            )

    def unwrap(self):
        return self.acc.unwrap_model(self.model)

    @property
    def sp_size(self) -> int:
        """Ranks that split each example's tokens (train.sequence_parallel_size; distlora.sequence_parallel)."""
        return self.cfg.train.sequence_parallel_size

    @property
    def dp_size(self) -> int:
        """Ranks that see different data: the processes over the sequence-parallel size."""
        return self.acc.num_processes // self.sp_size

    # ------------------------------------------------------------------ the step

    def loss_scale(self, n_target: torch.Tensor) -> torch.Tensor:
        """Factor for a micro batch's summed NLL so that the step's gradient is exactly
        d(sum of NLL over the window, all ranks)/dθ / n_target: every backend divides the loss by the
        accumulation steps (accelerate's `backward`, or the DeepSpeed engine's) and averages gradients
        over ALL ranks (DDP's all-reduce, ZeRO's and FSDP2's reduce-scatter: none of them knows of
        sequence parallelism, whose ranks hold disjoint tokens of the same examples); undo both.
        `n_target` (the window's target tokens, all ranks) stays on the device: an fp32 0-d tensor,
        the value a Python scalar would have been rounded to in the fp32 multiply."""
        return (self.acc.num_processes * self.acc.gradient_accumulation_steps / n_target.clamp(min=1)).float()

    def micro_step(self, model, last: bool):
        """Context for one micro batch's forward and backward; gradients are synchronised on the last."""
        return self.acc.accumulate(model)  # counts micro steps: syncs on every accumulation_steps-th, the last

    def backward(self, loss) -> None:
        self.acc.backward(loss)

    def clip(self, params, max_norm: float | None) -> torch.Tensor:
        """Clip the window's gradients; returns their norm before clipping as a 0-d device tensor (no
        host read). Taken on reduced gradients, so every rank holds the same value."""
        return self.acc.clip_grad_norm_(params, max_norm or float("inf"))

    def step(self, grad_norm: float) -> bool:
        """Update unless the gradient is non-finite (`grad_norm`, read on the host by the loop, is the
        same on every rank, so every rank decides alike); returns whether the update was applied."""
        if math.isfinite(grad_norm) or self.acc.scaler is not None:
            self.optimizer.step()  # an fp16 grad scaler skips a non-finite step itself, lowering its scale
            return not self.optimizer.step_was_skipped
        return False

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def comm_bytes_per_step(self) -> int | None:
        """Bytes the backend's collectives move per optimizer step (logged as comm_bytes; None: not
        modelled). One process: none."""
        return 0

    # ------------------------------------------------------------------ collectives for the loop's bookkeeping

    def all_sum(self, tensor):
        """Sum over ranks for distlora's own bookkeeping (token counts, metrics): not backend traffic."""
        return self.acc.reduce(tensor, "sum")

    def gather_objects(self, obj) -> list:
        """One picklable object per rank, in rank order, on every rank."""
        if self.acc.num_processes == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def ranks_not_sharing(self, directory) -> list[int]:
        """Ranks that do not see `directory` as rank 0 does (multi-node needs one shared filesystem for
        checkpoints): rank 0 writes a fresh token there, every rank reads it back."""
        import uuid
        from pathlib import Path

        if self.acc.num_processes == 1:
            return []
        probe = Path(directory) / ".shared-dir-probe"
        token = self.gather_objects(uuid.uuid4().hex if self.acc.is_main_process else None)[0]
        if self.acc.is_main_process:
            probe.write_text(token)
        self.barrier()
        try:
            seen = probe.read_text() == token
        except OSError:
            seen = False
        blind = [r for r, ok in enumerate(self.gather_objects(seen)) if not ok]
        self.barrier()
        if self.acc.is_main_process:
            probe.unlink(missing_ok=True)
        return blind

    # ------------------------------------------------------------------ adapter and optimizer state

    def _gathered(self, params, modifier_rank=None):
        """Full-shape parameters inside the block (ZeRO-3 gathers them; nothing to do elsewhere)."""
        return contextlib.nullcontext()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Full-shape fp32 adapter tensors (PEFT key format), on CPU, on every rank. A collective under
        sharded backends (every rank calls): only the adapter is gathered, never the base."""
        from peft import get_peft_model_state_dict

        m = self.unwrap()
        params = [p for p in m.parameters() if p.requires_grad]
        with self._gathered(params):
            sd = get_peft_model_state_dict(m)
            sd = {k: self._full(v.detach()).to("cpu", copy=True).contiguous() for k, v in sd.items()}
        return hooks.transform("adapter_state_dict", sd, backend=self)

    @staticmethod
    def _full(t: torch.Tensor) -> torch.Tensor:
        return t

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        m = self.unwrap()
        params = [p for p in m.parameters() if p.requires_grad]
        with self._gathered(params, modifier_rank=0):
            result = set_peft_model_state_dict(m, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint adapter has keys the model lacks: {unexpected[:5]}")

    def save_optimizer_state(self, ckpt_tmp) -> None:
        """Write the optimizer state into the (not yet published) checkpoint directory; every rank
        calls. Replicated state: rank 0 writes optimizer.pt."""
        from pathlib import Path

        if self.acc.is_main_process:
            torch.save(self.optimizer.state_dict(), Path(ckpt_tmp) / "optimizer.pt")

    def load_optimizer_state(self, ckpt) -> None:
        """Restore what `save_optimizer_state` wrote; every rank calls (after the adapter is loaded)."""
        from pathlib import Path

        f = Path(ckpt) / "optimizer.pt"
        if not f.is_file():
            raise DistributedSetupError(f"{ckpt} holds no optimizer.pt; it was written by another backend")
        self.optimizer.load_state_dict(torch.load(f, weights_only=True))

    # ------------------------------------------------------------------ generation

    def generating(self):
        """Around `generate` on `unwrap()` (every rank calls): yields whether the ranks must step together
        until all are done (synced_gpus: a base that is gathered layer by layer in collectives, where a
        rank that stopped early would leave the others waiting). Nothing is sharded here: False."""
        return contextlib.nullcontext(False)

    # ------------------------------------------------------------------ memory

    def release_gathered(self) -> None:
        """Return every sharded parameter to its partition after a forward-only pass (eval)."""

    def gathered_base_bytes(self) -> int:
        """Bytes of a sharded frozen base that are not in their partitioned state right now (0 unsharded)."""
        return 0

    def _local_numel(self, p) -> int:
        return p.numel()

    def _is_shard(self, p) -> bool:
        """Whether `p` is a shard object that never holds the full tensor here (FSDP2's DTensor)."""
        return False

    def _master_weights(self, inner, module_params: set) -> list:
        return [p for g in inner.param_groups for p in g["params"] if id(p) not in module_params]

    def model_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for model state, measured from the live objects:
        frozen_local / trainable_local: parameter storage on this rank (a shard under ZeRO-3/FSDP2);
        frozen_total / trainable_total: the full parameters; frozen_materialized: full-shape frozen
        tensors present right now (0 under ZeRO-3 when every base weight is back in its partition);
        master_weights: fp32 copies the optimizer updates when they are not the module's parameters;
        optimizer_state: Adam moments (and step counters) on this rank."""
        out = dict.fromkeys(
            ("frozen_local", "frozen_total", "frozen_materialized", "trainable_local", "trainable_total",
             "master_weights", "optimizer_state"), 0)
        module_params = set()
        for p in self.unwrap().parameters():
            module_params.add(id(p))
            es = p.element_size()
            kind = "trainable" if p.requires_grad else "frozen"
            out[f"{kind}_local"] += self._local_numel(p) * es
            out[f"{kind}_total"] += getattr(p, "ds_numel", p.numel()) * es
            if not p.requires_grad and not self._is_shard(p):
                out["frozen_materialized"] += p.data.numel() * es
        inner = innermost_optimizer(self.optimizer)
        out["master_weights"] = sum(t.numel() * t.element_size() for t in self._master_weights(inner, module_params))
        for st in inner.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    v = v.to_local() if hasattr(v, "to_local") else v
                    out["optimizer_state"] += v.numel() * v.element_size()
        return out
