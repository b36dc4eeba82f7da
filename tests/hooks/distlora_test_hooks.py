"""Test instrumentation, installed as distlora.hooks (never read by distlora itself).

In launched workers `sitecustomize` (this folder on PYTHONPATH) calls `install_from_env()`; in-process
tests call the install functions directly. Variables:

- DISTLORA_FAULT="rank1:step5:raise[,rank0:save.before_marker@1:kill]": each rule is
  `rank<R|*>:<point>[@<skip>]:<action>`. `point` is a glob over the hook points: `step<N>` (before the
  forward of the step after N finished steps) and the checkpoint writer's (`save.*`,
  `rotate.before_delete`). `@<skip>` lets the first <skip> hits pass. Actions: raise, kill (SIGKILL),
  exit (os._exit(1)), usr1 (this process sends itself SIGUSR1: a stop request on one rank only),
  slow (sleep 0.5 s), sleep<S> (sleep S seconds: a rank stuck in its own work), nan (this rank's loss and gradients become NaN for that
  step), inf (this rank's loss becomes +inf while its gradient stays finite).
- DISTLORA_TRACE_IDS=1: per rank, the example ids of every step, in output_dir/trace-ids-rank<R>.jsonl.
- DISTLORA_TEST_GRAD_BYTES=1: the gradient memory each step holds (GradientBytes), in summary.json's
  memory_per_rank[r]["gradients"].
- DISTLORA_TEST_SKIP_GATHER=1: the adapter is saved as a rank holds it without gathering (ZeRO-3's
  empty partitions): the save's guard must refuse it.
- DISTLORA_TEST_COMM=1: bytes the backend's collectives move, counted at torch.distributed's
  collectives and DDP's comm hook; per optimizer step in output_dir/comm-rank<R>.jsonl; the dtypes
  of the collectives, adapter, base, master weights and optimizer state in summary.json's
  memory_per_rank[r]["dtypes"].
- DISTLORA_TEST_NO_WRAP=1: accelerate's prepare_model returns the model unwrapped (a launch whose
  gradients would not be synchronised): the trainer must refuse it.
- DISTLORA_TEST_BF16_REDUCE=1: FSDP2 reduces gradients in bf16 (a variant the precision tests catch).
- DISTLORA_TEST_BASE_CHECKSUM=1: per rank, a float64 checksum of the frozen base after prepare and at the
  run's end, in output_dir/base-checksum-rank<R>.json (an O(model) pass no production launch pays for).
- DISTLORA_TEST_HOST_READS=1: per rank, the host reads of device values of each optimizer step and where
  they come from (HostReads), in output_dir/host-reads-rank<R>.json.
- DISTLORA_TEST_FIRST_GRADS=1: the first optimizer step's reduced adapter gradients (before clipping), by
  parameter name, in output_dir/first-grads-rank<R>.pt (full tensors: FSDP2's shards gathered; DDP, FSDP2).
- DISTLORA_TEST_SP_VARIANT=per_rank_norm | stock_ulysses: sequence-parallel variants the exactness tests
  must catch. per_rank_norm: each rank's micro batch loss divided by its own target tokens (the gradient
  averaged over ranks) instead of the window's target tokens over all ranks; stock_ulysses: attention after
  the all-to-all causal over the whole flattened row, packed examples not kept apart.
- DISTLORA_TEST_SKEW_INIT=1: PEFT's PiSSA init on rank R > 0 comes out shifted by R x 1e-2 (adapter and
  moved base alike: what a device whose SVD gives other bits would do): every rank must train rank 0's.
- DISTLORA_TEST_LIVE_MEMORY=1: at each "memory" point, the bytes of the unique storages of every live
  torch tensor in the process and the growth of RssAnon since "before_model", in summary.json's
  memory_per_rank[r]["live_<where>"] (LiveMemory).
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import time
from pathlib import Path

from distlora import hooks


class InjectedFault(RuntimeError):
    pass


def _rank() -> str:
    return f"rank{os.environ.get('RANK', '0')}"


# ------------------------------------------------------------------------------ faults


class Faults:
    def __init__(self, spec: str):
        self.rules = []
        for item in filter(None, spec.split(",")):
            rank, point, action = item.strip().split(":")
            point, _, skip = point.partition("@")
            self.rules.append({"rank": rank, "point": point, "skip": int(skip or 0), "action": action})
        self.installed = []

    def _matching(self, point: str, action: str | None = None):
        for rule in self.rules:
            if rule["rank"] in ("rank*", _rank()) and fnmatch.fnmatchcase(point, rule["point"]):
                if action is None or rule["action"] == action:
                    yield rule

    def hit(self, point: str) -> None:
        for rule in self._matching(point):
            if rule["action"] in ("nan", "inf"):
                continue
            if rule["skip"] > 0:
                rule["skip"] -= 1
                continue
            if rule["action"] == "slow":
                time.sleep(0.5)
            elif rule["action"].startswith("sleep"):
                time.sleep(float(rule["action"][5:]))
            elif rule["action"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif rule["action"] == "exit":
                os._exit(1)
            elif rule["action"] == "usr1":
                os.kill(os.getpid(), signal.SIGUSR1)
            elif rule["action"] == "raise":
                raise InjectedFault(f"injected fault at {point} on rank {os.environ.get('RANK', '0')}")

    def corrupt(self, loss, step: int):
        point = f"step{step}"
        if any(True for _ in self._matching(point, "nan")):
            loss = loss * float("nan")
        if any(True for _ in self._matching(point, "inf")):
            loss = loss + float("inf")
        return loss

    def install(self) -> "Faults":
        points = ["save.before_marker", "save.before_rename", "save.after_optimizer", "save.after_adapter",
                  "save.after_scheduler", "rotate.before_delete"]
        self.installed = [(p, hooks.add(p, lambda _p=p, **_: self.hit(_p))) for p in points]
        self.installed.append(("step", hooks.add("step", lambda step, **_: self.hit(f"step{step}"))))
        self.installed.append(("loss", hooks.add("loss", lambda loss, step, **_: self.corrupt(loss, step))))
        return self

    def uninstall(self) -> None:
        for name, fn in self.installed:
            hooks.remove(name, fn)


# ------------------------------------------------------------------------------ traces


def install_trace_ids():
    """Returns the hook function (hooks.remove("window_done", it) uninstalls it in-process)."""
    def write(backend, step, window, **_):
        out = Path(backend.cfg.train.output_dir)
        with open(out / f"trace-ids-rank{backend.acc.process_index}.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "ids": [int(i) for b in window for i in b["ids"]]}) + "\n")

    return hooks.add("window_done", write)


def install_skip_gather() -> None:
    import torch

    hooks.add("adapter_state_dict", lambda sd, **_: {k: torch.empty(0) for k in sd})


# ------------------------------------------------------------------------------ comm bytes


class CommCounter:
    """Bytes the backend moves between ranks, counted at the collectives themselves.

    torch.distributed's collectives, wrapped at interpreter start (before any engine keeps references
    to them); DDP's buckets reach them through its Python default comm hook. Per call the payload is counted once: all-reduce and broadcast the tensor,
    reduce-scatter its full input, all-gather its full output. distlora's own small reductions
    (backend.all_sum: token counts, metrics) are not counted."""

    bytes = 0
    paused = False
    dtypes: dict = {}  # collective -> dtypes of the payloads it moved (training steps only)
    recording = False
    _ARG = {
        "all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "reduce": (0, "tensor"),
        "reduce_scatter_tensor": (1, "input"), "_reduce_scatter_base": (1, "input"),
        "all_gather_into_tensor": (0, "output_tensor"), "_all_gather_base": (0, "output_tensor"),
        "all_gather_single": (0, "output_tensor"), "reduce_scatter_single": (1, "input"),  # FSDP2
    }

    @classmethod
    def install(cls) -> None:
        import functools

        import torch
        import torch.distributed as tdist

        from distlora.backends.base import Backend

        for name, (pos, kw) in cls._ARG.items():
            fn = getattr(tdist, name, None)
            if fn is None:
                continue

            @functools.wraps(fn)
            def counted(*args, _fn=fn, _pos=pos, _kw=kw, **kwargs):
                t = kwargs.get(_kw, args[_pos] if len(args) > _pos else None)
                if t is not None and not cls.paused:
                    cls.bytes += t.numel() * t.element_size()
                    if cls.recording:
                        cls.dtypes.setdefault(_fn.__name__, set()).add(str(t.dtype))
                return _fn(*args, **kwargs)

            setattr(tdist, name, counted)
        import torch.distributed._functional_collectives as funcol

        for name, size in (("all_gather_single", "out"), ("all_reduce", "in"), ("reduce_scatter_single", "in")):
            fn = getattr(funcol, name)  # DTensor's collectives (FSDP2's full_tensor)

            @functools.wraps(fn)
            def counted_f(t, *args, _fn=fn, _size=size, **kwargs):
                out = _fn(t, *args, **kwargs)
                if not cls.paused:
                    cls.bytes += (out if _size == "out" else t).numel() * t.element_size()
                    if cls.recording:
                        cls.dtypes.setdefault(f"funcol.{_fn.__name__}", set()).add(str(t.dtype))
                return out

            setattr(funcol, name, counted_f)
        all_sum = Backend.all_sum

        def unpaused(self, tensor):
            cls.paused = True
            try:
                return all_sum(self, tensor)
            finally:
                cls.paused = False

        Backend.all_sum = unpaused

        def watch_ddp(backend, **_):
            model = backend.model
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                # the default hook all-reduces each bucket through torch.distributed.all_reduce (counted
                # there); without a hook the C++ reducer calls the process group directly
                model.register_comm_hook(None, default_hooks.allreduce_hook)

        def before_step(step, **_):
            cls.bytes = 0  # what eval or a save moved is not the step's

        def write(backend, step, **_):
            out = Path(backend.cfg.train.output_dir)
            with open(out / f"comm-rank{backend.acc.process_index}.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, "bytes": cls.bytes}) + "\n")

        def dtypes(backend, memory, **_):
            """What precision each piece really has at the end of training (summary.json)."""
            from distlora.backends.base import innermost_optimizer

            module = backend.unwrap()
            inner = innermost_optimizer(backend.optimizer)
            zero = getattr(backend.optimizer, "optimizer", None)
            masters = [*getattr(zero, "single_partition_of_fp32_groups", []), *getattr(zero, "fp32_partitioned_groups_flat", [])]
            memory["dtypes"] = {
                "collectives": {k: sorted(v) for k, v in cls.dtypes.items()},
                "adapter": sorted({str(p.dtype) for p in module.parameters() if p.requires_grad}),
                "base": sorted({str(p.dtype) for p in module.parameters() if not p.requires_grad}),
                "optimizer_state": sorted({str(v.dtype) for st in inner.state.values() for v in st.values()
                                           if torch.is_tensor(v) and v.dim()}),
                "master_weights": sorted({str(t.dtype) for t in masters}),
            }

        def step_dtypes_only(step, **_):
            cls.recording = True  # the step's collectives only (not prepare's broadcasts, eval or the summary)

        def step_done(**_):
            cls.recording = False

        hooks.add("prepared", watch_ddp)
        hooks.add("step", before_step)
        hooks.add("step", step_dtypes_only)
        hooks.add("window_done", write)
        hooks.add("window_done", step_done)
        hooks.add("run_end", dtypes)


# ------------------------------------------------------------------------------ gradient bytes


def install_grad_bytes() -> None:
    def attach(backend, **_):
        GradientBytes(backend)

    hooks.add("prepared", attach)


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

    def __init__(self, backend):
        from distlora.backends.base import innermost_optimizer

        acc, model, optimizer = backend.acc, backend.model, backend.optimizer
        module = backend.unwrap()  # its training flag: DeepSpeed's engine keeps its own at True in eval
        self.params = [p for p in module.parameters() if p.requires_grad]
        zero = getattr(optimizer, "optimizer", None)
        self.zero = zero if hasattr(zero, "ipg_buckets") else None
        self.accum = acc.gradient_accumulation_steps
        reducer = getattr(model, "reducer", None)  # DDP: its buckets live as long as the model
        self.ddp_bucket_bytes = sum(b.buffer().numel() * b.buffer().element_size()
                                    for b in reducer._get_zeros_like_grad_buckets()) if reducer else 0
        self.forwards = 0
        self.rec = {"peak_bytes": 0, "at": None, "by_kind": {}, "probes": 0}
        hooks.add("run_end", lambda memory, **_: memory.__setitem__("gradients", self.rec))

        def before_forward(*_):
            if module.training:
                self.forwards += 1
                self.probe("before forward")

        model.register_forward_pre_hook(before_forward)
        innermost_optimizer(optimizer).register_step_pre_hook(lambda *_: self.probe("before optimizer update"))
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
        import torch
        from torch.distributed.tensor import DTensor

        seen: dict[int, tuple[str, int]] = {}  # storage data_ptr -> (kind, nbytes); the first kind claims it

        def add(kind, t):
            if torch.is_tensor(t) and t.numel():
                st = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
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



# ------------------------------------------------------------------------------ live memory


def rss_anon_bytes() -> int:
    """This process's resident anonymous memory (RssAnon in /proc/self/status): heap and anonymous
    mappings, not the page cache of mapped files (a safetensors mmap)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class LiveMemory:
    """What this process really holds, not what the backend says it holds: at each "memory" point
    (after_prepare, after_train, after_eval, after_save), memory[f"live_{where}"] = {
      live_tensor_bytes: bytes of the distinct storages of every live torch tensor (gc.get_objects():
        every tensor with a Python object, nn.Parameter included; a DTensor counts as its local shard;
        meta tensors hold nothing; deduplicated by storage data_ptr, the largest extent kept),
      rss_anon_delta: RssAnon now minus RssAnon at "before_model" (after torch, the process group,
        tokenizer and data; before the base model loads),
      largest: the `TOP` largest storages (bytes, shape, dtype, and the module parameter they back,
        when one does: a DTensor's local shard, a ZeRO-3 partition `ds_tensor`, or the parameter)}.
    Tensors that only C++ holds (DDP's reducer buckets, autograd's saved tensors) have no Python
    object and are not counted; none of them is base-sized in a LoRA run.

    `install` fixes glibc's mmap threshold at 64 KiB (mallopt M_MMAP_THRESHOLD, as
    MALLOC_MMAP_THRESHOLD_=65536 would): every allocation of 64 KiB or more is its own mapping, given
    back on free, so RssAnon follows what is in use. With glibc's default (a threshold that rises to
    the largest block freed), the heap kept 25-50 MB of freed activation and gathered-weight blocks
    after the first step of a 53 MB base, on every backend, even after malloc_trim (measured)."""

    TOP = 6
    M_MMAP_THRESHOLD = -3  # glibc malloc.h

    def __init__(self):
        self.baseline = None

    def install(self) -> "LiveMemory":
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
        hooks.add("before_model", self.before_model)
        hooks.add("memory", self.record)
        return self

    def before_model(self, **_) -> None:
        import gc

        gc.collect()
        self.baseline = rss_anon_bytes()

    @staticmethod
    def _param_names(backend) -> dict[int, str]:
        from torch.distributed.tensor import DTensor

        names = {}
        try:
            module = backend.unwrap()
        except Exception:  # noqa: BLE001 - before prepare there is nothing to name
            return names
        for name, p in module.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            for t in (local, getattr(p, "ds_tensor", None)):
                if t is not None and t.numel():
                    names.setdefault(t.untyped_storage().data_ptr(), name)
        return names

    def live_storages(self) -> dict[int, tuple[int, object]]:
        """data_ptr -> (nbytes, a tensor on that storage) for every live tensor's storage."""
        import gc

        import torch
        from torch.distributed.tensor import DTensor

        gc.collect()
        seen: dict[int, tuple[int, object]] = {}
        for obj in gc.get_objects():
            try:
                if not issubclass(type(obj), torch.Tensor):  # not isinstance: it would touch deprecated objects' __class__
                    continue
                t = obj._local_tensor if isinstance(obj, DTensor) else obj
                if t.device.type == "meta":
                    continue
                st = t.untyped_storage()
                ptr, n = st.data_ptr(), st.nbytes()
            except Exception:  # noqa: BLE001 - a tensor subclass without a plain storage holds none of its own
                continue
            if n and (ptr not in seen or n > seen[ptr][0]):
                seen[ptr] = (n, t)
        return seen

    def record(self, backend, where, memory, **_) -> None:
        seen = self.live_storages()
        names = self._param_names(backend)
        largest = sorted(seen.items(), key=lambda kv: -kv[1][0])[: self.TOP]
        memory[f"live_{where}"] = {
            "live_tensor_bytes": sum(n for n, _ in seen.values()),
            "rss_anon_delta": rss_anon_bytes() - (self.baseline or 0),
            "largest": [{"bytes": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                         "param": names.get(ptr)} for ptr, (n, t) in largest],
        }


def frozen_checksum(backend) -> float:
    """A checksum of the frozen base this rank holds (its shard under ZeRO-3 / FSDP2), in float64: an
    O(model) pass, which is why it lives here and not in every launch."""
    import torch

    with torch.no_grad():
        total = 0.0
        for p in backend.unwrap().parameters():
            if not p.requires_grad:
                t = (p.to_local() if hasattr(p, "to_local") else p).detach()
                total += t.double().abs().sum().item() + t.double().sum().item()
        return total


def install_base_checksums() -> None:
    """Each rank writes its frozen-base checksum after prepare and at the run's end to
    output_dir/base-checksum-rank<R>.json: the base must be untouched by training and equal on every rank."""
    seen = {}

    def start(backend, **_):
        seen["start"] = frozen_checksum(backend)

    def end(backend, out, **_):
        rec = {"start": seen["start"], "end": frozen_checksum(backend)}
        (out / f"base-checksum-rank{backend.acc.process_index}.json").write_text(json.dumps(rec))

    hooks.add("prepared", start)
    hooks.add("run_end", end)


def install_from_env() -> None:
    if os.environ.get("DISTLORA_TEST_HOST_READS"):
        HostReads().install().write_at_end()
    if os.environ.get("DISTLORA_TEST_BASE_CHECKSUM"):
        install_base_checksums()
    if os.environ.get("DISTLORA_FAULT"):
        Faults(os.environ["DISTLORA_FAULT"]).install()
    if os.environ.get("DISTLORA_TRACE_IDS"):
        install_trace_ids()
    if os.environ.get("DISTLORA_TEST_SKIP_GATHER"):
        install_skip_gather()
    if os.environ.get("DISTLORA_TEST_COMM"):
        CommCounter.install()
    if os.environ.get("DISTLORA_TEST_GRAD_BYTES"):
        install_grad_bytes()
    if os.environ.get("DISTLORA_TEST_NO_WRAP"):
        import accelerate

        accelerate.Accelerator.prepare_model = lambda self, model, *a, **k: model
    if os.environ.get("DISTLORA_TEST_BF16_REDUCE"):
        import torch

        from distlora.backends.fsdp2 import FSDP2

        FSDP2.reduce_dtype = torch.bfloat16  # the bf16-reduce variant the precision tests must catch
    if os.environ.get("DISTLORA_TEST_LIVE_MEMORY"):
        LiveMemory().install()
    if os.environ.get("DISTLORA_TEST_FIRST_GRADS"):
        install_first_grads()
    if os.environ.get("DISTLORA_TEST_SP_VARIANT"):
        install_sp_variant(os.environ["DISTLORA_TEST_SP_VARIANT"])
    if os.environ.get("DISTLORA_TEST_SKEW_INIT"):
        install_skewed_init()


def install_first_grads() -> None:
    def dump(backend, step, out, **_):
        import torch

        if step != 0:
            return
        grads = {n: _full(p.grad).detach().double().cpu().clone() for n, p in backend.unwrap().named_parameters()
                 if p.requires_grad and p.grad is not None}
        torch.save(grads, Path(out) / f"first-grads-rank{backend.acc.process_index}.pt")

    hooks.add("backward_done", dump)


def _full(t):
    """A gradient whole on this rank: FSDP2's DTensor shards gathered (every rank calls)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def install_sp_variant(name: str) -> None:
    if name == "per_rank_norm":
        import torch.distributed as dist

        def per_rank(nll, host, n_target, **_):
            # the loop multiplies by world * accumulation / n_target: this leaves nll / (own targets)
            return nll * n_target / (dist.get_world_size() * max(host["targets"], 1))

        hooks.add("loss", per_rank)
    elif name == "stock_ulysses":
        hooks.add("sp_bounds", lambda bounds, **_: [0, bounds[-1]])
    else:
        raise ValueError(f"DISTLORA_TEST_SP_VARIANT: unknown variant {name}")


def install_skewed_init() -> None:
    from peft.tuners.lora import LoraLayer

    pissa_init = LoraLayer.pissa_init
    shift = 1e-2 * int(os.environ.get("RANK", "0"))

    def skewed(self, adapter_name, init_lora_weights):
        pissa_init(self, adapter_name, init_lora_weights)
        self.lora_A[adapter_name].weight.data += shift
        self.get_base_layer().weight.data += shift  # under ZeRO-3: the gathered copy, which rank 0 writes back

    LoraLayer.pissa_init = skewed


class HostReads:
    """Counts, per optimizer step, the operations that read a device value on the host: on CUDA each is a
    device-to-host sync that stalls the host until the GPU queue drains. Counted from the window's fetch
    to its log row ("fetched" .. "window_done"): the data loading before it runs on the host alone.

    On CPU every tensor is a host tensor, so the reads are found by what they are: a TorchDispatchMode sees
    `_local_scalar_dense` (`.item()`, `int(t)`, `float(t)`, `bool(t)`) and the ops whose output size
    depends on values (`nonzero`, `masked_select`, boolean indexing, `unique`, ...), and `Tensor.tolist` /
    `Tensor.numpy`, which dispatch nothing on CPU, are wrapped. The optimizer's own step is not counted: its
    `.item()` reads Adam's step counters, host tensors on CUDA too (torch.optim keeps them on the CPU
    unless capturable)."""

    def __init__(self):
        self.steps: list[dict[str, int]] = []
        self.where: list[list[str]] = []  # the distlora frame of each read, per step
        self._mode = None

    def _mode_class(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        value_sized = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                       aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
                       aten.repeat_interleave.Tensor, aten.equal.default, aten.nonzero_numpy.default}
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                boolean_index = func is aten.index.Tensor and any(
                    i is not None and i.dtype == torch.bool for i in args[1])
                if func in value_sized or boolean_index:
                    counter._count(func.__name__)
                return func(*args, **(kwargs or {}))

        return Mode

    def _count(self, name: str) -> None:
        import traceback

        step = self.steps[-1]
        step[name] = step.get(name, 0) + 1
        # the innermost frame outside torch and this file: distlora's own line, or the library's
        frames = [f for f in traceback.extract_stack()
                  if "/torch/" not in f.filename and not f.filename.endswith("distlora_test_hooks.py")]
        f = frames[-1]
        self.where[-1].append(f"{name} {Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}")

    def install(self) -> "HostReads":
        import torch
        from torch.utils._python_dispatch import _disable_current_modes

        from distlora.backends.base import innermost_optimizer

        Mode = self._mode_class()
        self._orig = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def wrapped(name):
            orig = self._orig[name]

            def read(t, *a, **k):
                if self._mode is not None:
                    self._count(name)
                return orig(t, *a, **k)
            return read

        for name in self._orig:
            setattr(torch.Tensor, name, wrapped(name))

        def prepared(backend, **_):
            inner = innermost_optimizer(backend.optimizer)
            step = inner.step

            def uncounted(*a, **k):
                with _disable_current_modes():
                    mode, self._mode = self._mode, None
                    try:
                        return step(*a, **k)
                    finally:
                        self._mode = mode
            inner.step = uncounted

        def fetched(**_):
            self.steps.append({})
            self.where.append([])
            self._mode = Mode()
            self._mode.__enter__()

        def done(**_):
            if self._mode is not None:
                self._mode.__exit__(None, None, None)
                self._mode = None

        self.installed = [("prepared", hooks.add("prepared", prepared)), ("fetched", hooks.add("fetched", fetched)),
                          ("window_done", hooks.add("window_done", done))]
        return self

    def write_at_end(self) -> "HostReads":
        """In a launched worker: output_dir/host-reads-rank<R>.json with the per-step counts and where."""

        def end(backend, out, **_):
            rec = {"steps": self.steps, "where": self.where}
            (out / f"host-reads-rank{backend.acc.process_index}.json").write_text(json.dumps(rec))

        self.installed.append(("run_end", hooks.add("run_end", end)))
        return self

    def uninstall(self) -> None:
        import torch

        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)
        for name, fn in self.installed:
            hooks.remove(name, fn)
