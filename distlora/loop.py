"""The one training loop, in four named parts: `setup` (accelerator, data, model, optimizer, schedule
through the backend chosen once), `resume` (the newest complete checkpoint, checked before anything
is loaded), `fit` (the steps), `finish` (final eval, adapter, summary).

Each optimizer step: fetch the whole accumulation window, count its target tokens across ranks
together with the stop votes (one all-reduce), then forward/backward each micro batch with the loss
scaled so that the step's gradient is exactly sum(token NLL) / (target tokens in the window, all
ranks); the backend clips and updates, or skips a non-finite window; log, evaluate, checkpoint.
No backend is named here: `distlora.backends` holds every difference.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distlora import checkpoint, data, evaltask, hooks, layout
from distlora import config as config_mod


class Stopped(Exception):
    resumable = True


class Complete(Exception):
    """The output dir holds this run, finished: nothing to do, nothing written."""


class NonFiniteError(RuntimeError):
    pass


class ResumeError(RuntimeError):
    pass


class StopRequest:
    """A stop asked for by SIGTERM/SIGINT/SIGUSR1 or by a file `output_dir/STOP` (what the SLURM
    scripts touch on preemption). Checked at each optimizer-step boundary and agreed across ranks."""

    def __init__(self, out: Path):
        import signal

        self.file = out / "STOP"
        self.reason = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        import signal

        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.reason = signal.Signals(signum).name

    def requested(self) -> int:
        if self.reason is None and self.file.exists():
            self.reason = f"stop file {self.file}"
        return int(self.reason is not None)


# --------------------------------------------------------------------------------------------- pieces


def forward_nll(model, batch, chunk: int = 0, impl: str = "torch", total: bool = False):
    """Per-example summed NLL and target-token counts of a padded or packed batch (`total`: the batch's
    summed NLL alone); `chunk` > 0 computes lm_head + cross-entropy `chunk` target tokens at a time,
    impl="liger" in liger-kernel's fused kernel (distlora.loss)."""
    from distlora.loss import batch_nll, example_nll

    return batch_nll(model, batch, chunk, impl) if total else example_nll(model, batch, chunk, impl)


def evaluate(acc, model, loader, chunk: int = 0, impl: str = "torch") -> dict:
    """Eval loss from per-example (NLL sum, token count) gathered across ranks, summed in example-id
    order in float64: the same value for any number of processes."""
    model.eval()
    ids, nlls, counts = [], [], []
    with torch.no_grad():
        for batch in loader:
            nll, n = forward_nll(model, batch, chunk, impl)
            # packed rows hold different numbers of examples on each rank: pad (id -1) before gathering
            ids.append(acc.gather(acc.pad_across_processes(batch["ids"], pad_index=-1)))
            nlls.append(acc.gather(acc.pad_across_processes(nll.double())))
            counts.append(acc.gather(acc.pad_across_processes(n)))
    model.train()
    ids, nlls, counts = torch.cat(ids).cpu(), torch.cat(nlls).cpu(), torch.cat(counts).cpu()
    keep = ids >= 0
    order = torch.argsort(ids[keep])
    total_nll = nlls[keep][order].sum().item()
    total_tok = int(counts[keep].sum())
    loss = total_nll / max(total_tok, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)), "eval_tokens": total_tok}


def make_optimizer(model, cfg):
    """AdamW over the trainable parameters: biases and norm weights not decayed; under LoRA+
    (lora.plus_lr_ratio) the B matrices in their own group at ratio x train.lr. Group 0 holds the
    A matrices at train.lr: the lr the metrics log. The schedule scales every group's lr alike."""
    t, ratio = cfg.train, cfg.lora.plus_lr_ratio
    decay, no_decay, plus = [], [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ratio is not None and ".lora_B." in n:
            plus.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)  # biases and norm weights are not decayed
    groups = [{"params": decay, "weight_decay": t.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if plus:
        groups.append({"params": plus, "weight_decay": t.weight_decay, "lr": t.lr * ratio})
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


def make_scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(total_steps * t.effective_warmup_ratio)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """Dropout RNG for an optimizer step: a function of (seed, step, rank) only, so a resumed run
    draws exactly the masks the uninterrupted run drew, with no RNG state to save."""
    h = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def data_order(cfg, sampler) -> dict:
    """What, besides the global batch, fixes which examples each step holds: an exact resume needs it equal."""
    return {"seed": cfg.train.seed, "shuffle": cfg.data.shuffle, "group_by_length": cfg.data.group_by_length,
            "row_capacity": data.row_capacity(cfg), "items": sampler.n}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------- state


@dataclass
class Run:
    """Everything the loop works with; built by `setup`, advanced by `resume` and `fit`."""

    cfg: object
    backend: object
    out: Path
    stop: StopRequest
    tokenizer: object
    model: object
    optimizer: object
    scheduler: object
    sampler: object
    train_loader: object
    eval_loader: object
    total_steps: int
    counts: dict
    memory: dict = field(default_factory=dict)  # per rank, into summary.json
    start_step: int = 0
    resumed_from: Path | None = None
    best_eval: float | None = None
    skipped: int = 0  # non-finite steps skipped so far
    in_a_row: int = 0
    generation: object = None  # evaltask.EvalGeneration: eval samples and task metrics; None = off
    samples: list = field(default_factory=list)  # the last eval's sample rows (main process), for the summary

    @property
    def acc(self):
        return self.backend.acc

    def say(self, *msg) -> None:  # the global main process only (accelerate's print is once per node)
        if self.acc.is_main_process:
            print(*msg, flush=True)


# --------------------------------------------------------------------------------------------- setup


def raise_on_main_problem(backend, problem: str | None) -> None:
    """A problem only the main process can see (its file system checks), raised on every rank alike: the
    others would otherwise wait in the next collective and die of the main process's exit with a
    transport error that buries the one line that says what to fix."""
    problem = backend.gather_objects(problem)[0]
    if problem:
        raise checkpoint.CheckpointError(problem)


def setup(cfg, backend) -> Run:
    from accelerate.utils import set_seed

    from distlora import datacache
    from distlora.model import load_model, load_tokenizer, param_counts

    from distlora import sequence_parallel

    acc = backend.build_accelerator()
    t = cfg.train
    sequence_parallel.init(acc.process_index, acc.num_processes, backend.sp_size)
    out = Path(t.output_dir)
    problem = None
    if acc.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "STOP").unlink(missing_ok=True)  # a leftover from the stop that ended the previous leg
        except OSError as exc:
            problem = f"train.output_dir: cannot create {out} ({exc.strerror or exc}); point it at a writable directory"
    raise_on_main_problem(backend, problem)
    blind = backend.ranks_not_sharing(out)
    if blind:
        from distlora.backends import DistributedSetupError

        raise DistributedSetupError(
            f"rank(s) {blind} do not see train.output_dir={out} as rank 0 does; checkpoints need one directory that "
            "every node shares: put output_dir on a shared filesystem"
        )
    stop = StopRequest(out)  # from here on a signal asks for a checkpoint at the next step boundary
    set_seed(t.seed)

    def say(*msg):
        if acc.is_main_process:
            print(*msg, flush=True)

    tokenizer = load_tokenizer(cfg)
    train_records, eval_records, _ = datacache.load_datasets(cfg, tokenizer, acc.main_process_first, log=say)
    hooks.point("before_model", backend=backend)
    model = load_model(cfg, backend.mixed_precision)
    if backend.sp_size > 1:
        sequence_parallel.use(model)
    # rank: each process keeps only its share of every epoch's order (accelerate's prepare deals the rest)
    dp, sp = backend.dp_size, {"sp": backend.sp_size, "sp_rank": sequence_parallel.rank(), "rank": acc.process_index}
    pad_id = tokenizer.pad_token_id
    pack = data.row_capacity(cfg)  # 0: no packing
    train_loader, sampler = data.make_loader(
        train_records, pad_id, t.micro_batch_size, t.gradient_accumulation_steps, dp, t.seed, cfg.data.shuffle, pack,
        cfg.data.group_by_length, **sp,
    )
    if pack:
        say(f"distlora: {sampler.summary()}")
    total_steps = t.max_steps or math.ceil(t.epochs * sampler.steps_per_epoch)
    eval_loader = None
    if eval_records:
        eval_loader, _ = data.make_loader(
            eval_records, pad_id, t.eval_micro_batch_size or t.micro_batch_size, 1, dp, t.seed, False, pack, **sp
        )
        eval_loader = acc.prepare_data_loader(eval_loader)
    if cfg.lora.init == "eva":  # data-driven: on this rank's first micro batches, before the backend wraps the model
        from distlora.model import eva_init

        eva_init(model, cfg, train_loader, acc)
    model, optimizer, train_loader = backend.prepare(model, lambda m: make_optimizer(m, cfg), train_loader)
    # The scheduler is not prepared: accelerate would step it once per process per step.
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    counts = param_counts(model)
    run = Run(cfg, backend, out, stop, tokenizer, model, optimizer, scheduler, sampler, train_loader, eval_loader,
              total_steps, counts)
    run.generation = evaltask.EvalGeneration(cfg, tokenizer, eval_records) or None
    record_memory(run, "after_prepare")
    # the launcher's preflight again, now that the run is really here (not the port)
    problem = checkpoint.check_room(out, counts["trainable_params"], t.keep_last, t.save_every, total_steps) \
        if acc.is_main_process else None
    raise_on_main_problem(backend, problem)
    say(
        f"distlora: {acc.num_processes} process(es), backend {backend.name}, mixed precision {backend.mixed_precision}; "
        f"trainable {counts['trainable_params']:,} of {counts['total_params']:,} parameters; "
        f"global batch {sampler.global_batch} = micro {t.micro_batch_size} x accumulation "
        f"{t.gradient_accumulation_steps} x {dp} data-parallel rank(s)"
        + (f" (x {backend.sp_size} sequence-parallel)" if backend.sp_size > 1 else "")
        + f"; {sampler.steps_per_epoch} steps/epoch, {total_steps} steps"
    )
    return run


# --------------------------------------------------------------------------------------------- resume


def resume(run: Run) -> None:
    """Continue from the newest complete checkpoint (train.resume: auto) or the one named, after
    checking that it can be resumed exactly (or, with resume_weights_only, from its adapter alone)."""
    t, backend = run.cfg.train, run.backend
    if run.acc.is_main_process:
        for p in checkpoint.clean_partial(run.out):
            run.say(f"distlora: removed incomplete checkpoint {p} (an interrupted save)")
    backend.barrier()
    ckpt = checkpoint.latest(run.out) if t.resume == "auto" else None if t.resume == "never" else Path(t.resume)
    if ckpt is None:
        return
    dp = backend.dp_size
    state = checkpoint.read_state(ckpt)
    problems = checkpoint.resume_problems(state, ckpt, run.cfg, run.sampler.global_batch, dp,
                                          data_order(run.cfg, run.sampler))
    blocking = [msg for msg, weights_ok in problems if not (t.resume_weights_only and weights_ok)]
    if blocking:
        raise ResumeError(f"cannot resume from {ckpt}:\n  - " + "\n  - ".join(blocking))
    if state["dp_size"] != dp and not problems:
        run.say(f"distlora: resuming a {state['dp_size']}-process checkpoint on {dp} processes with the same global "
                "batch: same examples per step; results equal up to summation order, not bitwise")
    changes = layout.config_changes(state.get("config"), run.cfg.to_dict())
    if changes:
        run.say(f"distlora: the run config changed since {ckpt.name}: "
                + "; ".join(f"{k}: {a} -> {b}" for k, a, b in changes))
    elif state["config_hash"] != run.cfg.hash():  # a checkpoint that predates the recorded config
        run.say(f"distlora: warning: the run config changed since {ckpt.name}; resuming anyway")
    run.resumed_from = ckpt
    if t.resume_weights_only:
        checkpoint.load_weights_only(backend, ckpt)
        run.say(f"distlora: loaded the adapter of {ckpt} (weights only): fresh optimizer, schedule and data "
                "order from step 0")
        return
    state = checkpoint.load(backend, run.scheduler, ckpt)
    run.start_step, run.best_eval = state["step"], state.get("best_eval_loss")
    run.skipped, run.in_a_row = state.get("nonfinite_skipped", 0), state.get("nonfinite_in_a_row", 0)
    run.say(f"distlora: resumed from {ckpt} at step {run.start_step}")


# --------------------------------------------------------------------------------------------- fit


def save(run: Run, step: int, ev: dict | None) -> None:
    state = {
        "nonfinite_skipped": run.skipped,
        "nonfinite_in_a_row": run.in_a_row,
        "step": step,
        "examples_seen": step * run.sampler.global_batch,
        "global_batch": run.sampler.global_batch,
        "data_order": data_order(run.cfg, run.sampler),
        "dp_size": run.sampler.world,
        "config_hash": run.cfg.hash(),
        "config": run.cfg.to_dict(),  # a resume names each key that changed (layout.config_changes)
        "model": run.cfg.model.name_or_path,
        "lora_shape": checkpoint.lora_shape(run.cfg),
        "eval_loss": ev.get("eval_loss") if ev else None,
        "best_eval_loss": run.best_eval,
    }
    checkpoint.save(run.backend, run.scheduler, run.tokenizer, run.cfg.train.output_dir, state, run.cfg.train.keep_last)
    note_gathered_base(run, f"save {step}")


def run_eval(run: Run, metrics, step: int) -> dict | None:
    """Eval loss (when there is eval data), then the eval generation (samples, task metrics): one
    metrics row, the samples into samples.jsonl and the trackers. Every rank calls."""
    if run.eval_loader is None and run.generation is None:
        return None
    t = run.cfg.train
    ev = {"step": step}
    if run.eval_loader is not None:
        ev.update(evaluate(run.acc, run.model, run.eval_loader, t.loss_chunk_size, t.loss_impl))
    if run.generation is not None:
        task, run.samples = run.generation(run.backend, step)
        ev.update(task)
    run.backend.release_gathered()
    note_gathered_base(run, f"eval {step}")
    if "eval_loss" in ev:
        run.best_eval = ev["eval_loss"] if run.best_eval is None else min(run.best_eval, ev["eval_loss"])
    metrics.log(ev)
    metrics.log_samples(step, run.samples)
    shown = [f"loss {ev['eval_loss']:.6f} ppl {ev['eval_ppl']:.3f}"] if "eval_loss" in ev else []
    shown += [f"{k} {v:.4g}" for k, v in evaltask.task_means(ev).items()]
    run.say(f"eval step {step}: " + ", ".join(shown or [f"{len(run.samples)} sample(s)"]))
    return ev


def record_memory(run: Run, where: str) -> None:
    """The model-state bytes this rank holds now (backend.model_state_bytes), into summary.json."""
    run.memory[where] = run.backend.model_state_bytes()
    hooks.point("memory", backend=run.backend, where=where, memory=run.memory)


def note_gathered_base(run: Run, where: str) -> None:
    """Check the backend's `gathered_base_bytes` at `where` ("step N", "eval N", "save N", ...) and keep,
    per rank, in memory["gathered_base"]: the most bytes seen and where first, how many checks of each
    kind ran, and the seconds they took (the overhead)."""
    t0 = time.perf_counter()
    n = run.backend.gathered_base_bytes()
    rec = run.memory.setdefault("gathered_base", {"max_bytes": 0, "at": None, "checks": {}, "seconds": 0.0})
    kind = where.split()[0]
    rec["checks"][kind] = rec["checks"].get(kind, 0) + 1
    if n > rec["max_bytes"]:
        rec["max_bytes"], rec["at"] = n, where
    rec["seconds"] += time.perf_counter() - t0


def train_window(run: Run, window: list, step: int, n_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward every micro batch of the window, the loss scaled by the window's target tokens
    over all ranks (`n_target`, a device tensor). Returns this rank's summed NLL and whether any of its
    losses was non-finite, both on the device: nothing here reads a device value on the host.

    A non-finite loss is turned into a NaN gradient on this rank (NaN * 0 stays NaN, where inf * 0 of a
    zero-initialised LoRA B would not); the backend's gradient reduction carries it to every rank, so
    every backend discards the window alike (DeepSpeed inside the last backward) without a vote
    between forward and backward."""
    t, backend, model = run.cfg.train, run.backend, run.model
    torch.manual_seed(dropout_seed(t.seed, step, run.acc.process_index))
    scale = backend.loss_scale(n_target)
    nll_total = torch.zeros((), dtype=torch.float64, device=run.acc.device)
    loss_bad = torch.zeros((), dtype=torch.bool, device=run.acc.device)
    for i, batch in enumerate(window):
        with backend.micro_step(model, i == len(window) - 1):
            nll = forward_nll(model, batch, t.loss_chunk_size, t.loss_impl, total=True)
            nll = hooks.transform("loss", nll, step=step, host=batch["host"], n_target=n_target)
            finite = torch.isfinite(nll.detach())
            loss_bad |= ~finite
            nll = nll * torch.where(finite, 1.0, float("nan"))
            backend.backward(nll * scale)
            nll_total += nll.detach().double()
    return nll_total, loss_bad


def apply_nonfinite_policy(run: Run, step: int, applied: bool, window_bad: bool) -> None:
    """Count a skipped step; abort under train.nonfinite=abort or after too many in a row. An fp16
    overflow with a finite loss is the scaler's business: logged, not counted."""
    t = run.cfg.train
    if applied:
        run.in_a_row = 0
        return
    if run.backend.mixed_precision == "fp16" and not window_bad:
        run.say(f"distlora: fp16 gradient overflow at step {step + 1}: step skipped, loss scale lowered")
        return
    run.skipped, run.in_a_row = run.skipped + 1, run.in_a_row + 1
    what = "loss" if window_bad else "gradient"
    run.say(f"distlora: non-finite {what} at step {step + 1}: step skipped ({run.skipped} so far)")
    if t.nonfinite == "abort" or run.in_a_row >= t.nonfinite_max_in_a_row:
        raise NonFiniteError(
            f"non-finite {what} at step {step + 1} ({run.in_a_row} in a row, train.nonfinite={t.nonfinite}, "
            f"nonfinite_max_in_a_row={t.nonfinite_max_in_a_row}); the update was not applied; lower train.lr, "
            "check the data, or resume from the last checkpoint"
        )


def fit(run: Run, metrics) -> dict:
    """The optimizer steps from `run.start_step` to the end; returns totals for the summary.

    Per step: two small all-reduces (the window's target tokens with the stop votes before the
    forward; the loss, non-finite votes and throughput counts after the backward) and ONE host read of
    a device value (those sums with the grad norm, which decides whether the update is applied).
    Every count the loop needs of a micro batch comes from the collator, computed on the host. A stop
    asked for during a step is agreed on with that step's counts and taken after it: checkpoint, exit."""
    from distlora.flops import device_peak_flops, flop_model
    from distlora.metrics import Progress, peak_memory_mb

    t, backend, acc = run.cfg.train, run.backend, run.acc
    # per-device rates divide by every process (sequence-parallel ranks are devices too)
    devices, device, accum = acc.num_processes, acc.device, t.gradient_accumulation_steps
    steps_per_epoch = run.sampler.steps_per_epoch
    params = [p for p in run.model.parameters() if p.requires_grad]
    fm = flop_model(backend.unwrap())
    peak = device_peak_flops(t.peak_tflops)
    comm_per_step = backend.comm_bytes_per_step()
    totals = torch.zeros(2, dtype=torch.float64)  # this rank's input tokens and model FLOPs, all steps
    progress = Progress(acc.is_main_process, run.total_steps, run.start_step)
    if t.eval_at_start and run.start_step == 0:
        run_eval(run, metrics, 0)
    run.model.train()
    t_loop = time.perf_counter()
    log_s = 0.0  # seconds spent building and writing log rows (summary.json: log_overhead)
    it, last_eval, row = None, None, None
    for step in range(run.start_step, run.total_steps):
        hooks.point("step", step=step)
        t0 = time.perf_counter()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if it is None or in_epoch == 0:
            run.sampler.position(epoch, in_epoch)
            it = iter(run.train_loader)
        window = [next(it) for _ in range(accum)]
        t_data = time.perf_counter() - t0
        hooks.point("fetched", step=step, window=window)
        host = [b["host"] for b in window]
        counts = backend.all_sum(torch.tensor([sum(h["targets"] for h in host), run.stop.requested()],
                                              dtype=torch.float64, device=device))
        nll_sum, loss_bad = train_window(run, window, step, counts[0])
        hooks.point("backward_done", backend=backend, step=step, out=run.out)
        norm = backend.clip(params, t.max_grad_norm)
        lengths = [n for h in host for n in h["lengths"]]
        local_flops = fm.step(sum(lengths), lengths)
        local = torch.tensor([sum(lengths), sum(h["padded"] for h in host), len(lengths), local_flops],
                             dtype=torch.float64)
        stats = backend.all_sum(torch.cat([nll_sum.reshape(1), loss_bad.double().reshape(1), local.to(device)]))
        # the step's one host read
        grad_norm, n_target, stop_votes, nll_all, bad_ranks, n_input, n_padded, n_examples, flops = torch.cat(
            [norm.detach().reshape(1).to(device, torch.float64), counts, stats]).tolist()
        applied = backend.step(grad_norm)
        window_bad = bad_ranks > 0
        if window_bad and applied:
            raise NonFiniteError(
                f"step {step + 1}: the backend applied an update from a non-finite loss; the adapter is now corrupt: "
                "resume from the last checkpoint"
            )
        backend.zero_grad()
        apply_nonfinite_policy(run, step, applied, window_bad)
        lr = run.scheduler.get_last_lr()[0]
        run.scheduler.step()  # also on a skipped step: the lr stays a function of the step index
        done = step + 1
        totals += local[[0, 3]]
        note_gathered_base(run, f"step {done}")

        t_log = time.perf_counter()
        row = None
        if done % t.log_every == 0 or done == run.total_steps or stop_votes:
            dt = t_log - t0
            row = {
                "step": done,
                "epoch": round(done / steps_per_epoch, 6),
                "loss": _finite_or_none(nll_all / max(n_target, 1)),
                "lr": lr,
                "grad_norm": _finite_or_none(grad_norm),
                "nonfinite_skipped": run.skipped,
                "target_tokens": int(n_target),
                "input_tokens": int(n_input),
                "padded_tokens": int(n_padded),
                "examples": int(n_examples),
                "tokens_per_s": n_input / dt,
                "tokens_per_s_per_device": n_input / dt / devices,
                "examples_per_s": n_examples / dt,
                "tflops_per_device": flops / dt / devices / 1e12,
                "mfu": flops / dt / devices / peak if peak else None,
                "step_time_s": dt,
                "data_wait_s": t_data,
                "comm_bytes": comm_per_step,
                "peak_mem_mb": peak_memory_mb(),
            }
            metrics.log(row)
        progress.update(done, row)
        log_s += time.perf_counter() - t_log
        hooks.point("window_done", backend=backend, step=done, window=window)

        if stop_votes:  # every rank read the same sum, so every rank stops here
            save(run, done, None)
            if acc.is_main_process:
                layout.write_status(run.out, "stopped", step=done, total_steps=run.total_steps)
            raise Stopped(
                f"distlora: stopped at step {done}/{run.total_steps} ({run.stop.reason or 'another rank was asked'}); "
                f"checkpoint in {checkpoint.step_dir(run.out, done)}; rerun the same command to resume"
            )
        if t.eval_every and done % t.eval_every == 0 and done != run.total_steps:
            last_eval = run_eval(run, metrics, done)
        if t.save_every and done % t.save_every == 0 and done != run.total_steps:
            save(run, done, last_eval if last_eval and last_eval["step"] == done else None)
    progress.close()
    return {"loop_s": time.perf_counter() - t_loop, "log_s": log_s, "totals": totals, "last_row": row, "peak": peak}


# --------------------------------------------------------------------------------------------- finish


def finish(run: Run, metrics, fitted: dict) -> None:
    """Final eval, checkpoint and adapter; per-rank memory and checksums; summary.json."""
    from distlora.metrics import peak_memory_mb, summary_table

    t, backend, acc = run.cfg.train, run.backend, run.acc
    record_memory(run, "after_train")
    final_eval = run_eval(run, metrics, run.total_steps)
    record_memory(run, "after_eval")
    if t.save_every and run.total_steps % t.save_every == 0 and run.start_step < run.total_steps:
        save(run, run.total_steps, final_eval)
    checkpoint.save_adapter(backend, run.tokenizer, run.out / "adapter")
    backend.release_gathered()
    note_gathered_base(run, "save adapter")
    record_memory(run, "after_save")
    hooks.point("run_end", backend=backend, out=run.out, memory=run.memory)
    memory_per_rank = backend.gather_objects(run.memory)
    adapter_sum = sum(float(v.double().abs().sum() + v.double().sum()) for v in backend.adapter_state_dict().values())
    per_rank = acc.gather(torch.tensor([[adapter_sum, peak_memory_mb()]], dtype=torch.float64, device=acc.device))
    tokens, flops = backend.all_sum(fitted["totals"].to(acc.device)).tolist()
    if acc.is_main_process:
        loop_s, peak, row, devices = fitted["loop_s"], fitted["peak"], fitted["last_row"], acc.num_processes
        summary = {
            "steps": run.total_steps,
            "steps_this_leg": run.total_steps - run.start_step,
            "total_input_tokens": int(tokens),
            "train_wall_s": loop_s,
            "mean_tokens_per_s": tokens / max(loop_s, 1e-9),
            "mean_tflops_per_device": flops / max(loop_s, 1e-9) / devices / 1e12,
            "mfu": flops / max(loop_s, 1e-9) / devices / peak if peak else None,
            "peak_mem_mb": max(r[1] for r in per_rank.tolist()),
            "final_train_loss": row["loss"] if row else None,
            "final_eval_loss": final_eval.get("eval_loss") if final_eval else None,
            "final_task_metrics": {k: v for k, v in (final_eval or {}).items() if k.startswith(evaltask.TASK_PREFIX)},
            "samples": run.samples,
            "adapter": str(run.out / "adapter"),
            "per_rank": [dict(zip(("adapter_checksum", "peak_mem_mb"), r)) for r in per_rank.tolist()],
            # seconds spent building and writing metrics rows and progress: the cost of train.log_every
            "log_overhead_s": fitted["log_s"],
            "log_overhead_fraction": fitted["log_s"] / max(loop_s, 1e-9),
            "backend": backend.name,
            "memory_per_rank": memory_per_rank,
        }
        (run.out / "summary.json").write_text(json.dumps(summary, indent=1))
        layout.write_status(run.out, "complete", step=run.total_steps, total_steps=run.total_steps,
                            config_hash=run.cfg.hash())
        run.say(summary_table(summary))


def check_not_complete(run: Run) -> None:
    """A rerun of a finished run (its status says complete with this config, or its checkpoint is at
    the last step) changes nothing: no summary rewritten, no eval row appended."""
    t = run.cfg.train
    if t.resume == "never" or t.resume_weights_only:
        return
    status = layout.read_status(run.out) or {}
    done = status.get("status") == "complete" and status.get("config_hash") == run.cfg.hash()
    if (done or run.start_step >= run.total_steps) and layout.is_complete(run.out / "adapter"):
        raise Complete(
            f"distlora: {run.out} holds this run, finished (step {run.total_steps}/{run.total_steps}; adapter in "
            f"{run.out / 'adapter'}); nothing to do, nothing changed. To train again there set train.resume=never, "
            "or use another train.output_dir"
        )


def run(cfg, backend=None) -> None:
    """setup -> resume -> fit -> finish, with the trackers closed on any exit."""
    from distlora import backends
    from distlora.metrics import MetricsLog, run_info

    backend = backend or backends.select(cfg)
    r = setup(cfg, backend)
    resume(r)
    check_not_complete(r)
    # The run really starts here: only now are the files of a previous run in output_dir replaced.
    info = run_info(r.acc, r.counts) | {"backend": backend.name, "mixed_precision": backend.mixed_precision}
    if r.start_step == 0 and r.resumed_from is None:
        checkpoint.save_initial_adapter(backend, r.tokenizer, r.out)
    if r.acc.is_main_process:
        config_mod.dump(cfg, r.out / "config.yaml")
        (r.out / "run_info.json").write_text(json.dumps(info, indent=1))
        layout.write_status(r.out, "running", step=r.start_step, total_steps=r.total_steps)
    with MetricsLog(r.acc, cfg, cfg.to_dict() | info, r.start_step) as metrics:
        fitted = fit(r, metrics)
        finish(r, metrics, fitted)
