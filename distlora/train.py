"""`accelerate launch [--config_file X.yaml] -m distlora.train --config run.yaml [dotted.key=value ...]`

main() validates the config before anything heavy; run() builds the pieces, resumes if there is a
checkpoint, and runs the one training loop, which reads top to bottom: per optimizer step, fetch
the whole accumulation window, count its target tokens across ranks and the stop votes (one
all-reduce), then forward/backward each micro batch with the loss scaled so the step's gradient is
exactly sum(token NLL) / (target tokens in the window, all ranks), clip, step (or skip a
non-finite one), log, evaluate, checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from distlora import config as config_mod


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distlora train", description="LoRA fine-tuning of a causal LM.")
    p.add_argument("--config", required=True, help="run config YAML (only overrides of the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4")
    return p.parse_args(argv)


def _say_once(msg: str) -> None:
    from distlora.distributed import env_rank

    if env_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides, check_device=True)
        from distlora import distributed as dist

        conflicts = dist.launcher_conflicts(cfg)
        if conflicts:
            raise config_mod.ConfigError(conflicts)
    except config_mod.ConfigError as err:
        _say_once(err.render())
        from distlora.distributed import env_rank

        if env_rank() > 0:
            # Under a launcher the first worker to exit gets the others SIGTERMed: give rank 0,
            # the one that prints, time to do so.
            time.sleep(3)
        return 2
    try:
        run(cfg)
        _end_process_group()
    except Stopped as stop:
        _say_once(str(stop))
        return EXIT_STOPPED
    except BaseException as exc:  # noqa: BLE001 - report which rank failed, then fail
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        import traceback

        from distlora.distributed import env_rank

        print(f"distlora: rank {env_rank()} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if not isinstance(exc, _expected_errors()):
            traceback.print_exc()
        return 1
    return 0


def _end_process_group() -> None:
    """Destroy the process group before exit: gloo's threads torn down at interpreter exit can abort
    the process ("terminate called without an active exception") after a successful run."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request after writing a checkpoint; rerun the same command


class Stopped(Exception):
    resumable = True


class NonFiniteError(RuntimeError):
    pass


class ResumeError(RuntimeError):
    pass


def _expected_errors() -> tuple:
    """Failures with a message that says everything: shown without a traceback."""
    from distlora.checkpoint import CheckpointError
    from distlora.data import DataError
    from distlora.distributed import DistributedSetupError

    return (CheckpointError, DataError, DistributedSetupError, NonFiniteError, ResumeError)


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


# ---------------------------------------------------------------------------------------------


def forward_nll(model, batch, chunk: int = 0, impl: str = "torch", total: bool = False):
    """Per-example summed NLL and target-token counts of a padded or packed batch (`total`: the batch's
    summed NLL alone); `chunk` > 0 computes lm_head + cross-entropy `chunk` target tokens at a time,
    impl="liger" in liger-kernel's fused kernel (distlora.loss)."""
    from distlora.loss import batch_nll, example_nll

    return batch_nll(model, batch, chunk, impl) if total else example_nll(model, batch, chunk, impl)


def evaluate(acc, model, loader, chunk: int = 0, impl: str = "torch") -> dict:
    """Eval loss from per-example (NLL sum, token count) gathered across ranks, summed in example-id
    order in float64: the same value for any number of processes."""
    import torch

    model.eval()
    ids, nlls, counts = [], [], []
    with torch.no_grad():
        for batch in loader:
            nll, n = forward_nll(model, batch, chunk, impl)
            # packed rows hold different numbers of examples on each rank: pad (id -1) before gathering
            ids.append(acc.gather(acc.pad_across_processes(batch["ids"], pad_index=-1)))
            nlls.append(acc.gather(acc.pad_across_processes(nll.double())))
            counts.append(acc.gather(acc.pad_across_processes(n)))
    from distlora import distributed as dist

    dist.release_gathered(acc, model)
    model.train()
    ids, nlls, counts = torch.cat(ids).cpu(), torch.cat(nlls).cpu(), torch.cat(counts).cpu()
    keep = ids >= 0
    order = torch.argsort(ids[keep])
    total_nll = nlls[keep][order].sum().item()
    total_tok = int(counts[keep].sum())
    loss = total_nll / max(total_tok, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)), "eval_tokens": total_tok}


def make_optimizer(model, cfg):
    import torch

    decay, no_decay = [], []
    for _n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # biases and norm weights are not decayed
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    t = cfg.train
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


def make_scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(total_steps * t.effective_warmup_ratio)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _dropout_seed(seed: int, step: int, rank: int) -> int:
    """Dropout RNG for an optimizer step: a function of (seed, step, rank) only, so a resumed run
    draws exactly the masks the uninterrupted run drew, with no RNG state to save."""
    h = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _checksum(params) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum().item() + p.detach().double().sum().item() for p in params))


def run(cfg) -> None:
    import torch
    from accelerate.utils import set_seed

    from distlora import checkpoint, data, datacache, faults
    from distlora import distributed as dist
    from distlora.flops import device_peak_flops, flop_model
    from distlora.metrics import MetricsLog, Progress, peak_memory_mb, run_info, summary_table
    from distlora.model import load_model, load_tokenizer, param_counts

    acc = dist.build_accelerator(cfg)

    def say(*msg) -> None:  # the global main process only (accelerate's print is once per node)
        if acc.is_main_process:
            print(*msg, flush=True)

    t = cfg.train
    out = Path(t.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "STOP").unlink(missing_ok=True)  # a leftover from the stop that ended the previous leg
        config_mod.dump(cfg, out / "config.yaml")
    dist.barrier(acc)
    blind = dist.ranks_not_sharing(acc, out)
    if blind:
        raise dist.DistributedSetupError(
            f"rank(s) {blind} do not see train.output_dir={out} as rank 0 does; checkpoints need one directory that "
            "every node shares: put output_dir on a shared filesystem"
        )
    stop = StopRequest(out)  # from here on a signal asks for a checkpoint at the next step boundary
    set_seed(t.seed)

    tokenizer = load_tokenizer(cfg)
    train_records, eval_records, _ = datacache.load_datasets(cfg, tokenizer, acc.main_process_first, log=say)
    model = load_model(cfg, acc.mixed_precision)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    base_sum_start = _checksum(frozen)
    optimizer = make_optimizer(model, cfg)

    dp = dist.data_parallel_size(acc)
    pad_id = tokenizer.pad_token_id
    pack = data.row_capacity(cfg)  # 0: no packing
    train_loader, sampler = data.make_loader(
        train_records, pad_id, t.micro_batch_size, t.gradient_accumulation_steps, dp, t.seed, cfg.data.shuffle, pack,
        cfg.data.group_by_length,
    )
    if pack:
        say(f"distlora: {sampler.summary()}")
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    eval_loader = None
    if eval_records:
        eval_loader, _ = data.make_loader(
            eval_records, pad_id, t.eval_micro_batch_size or t.micro_batch_size, 1, dp, t.seed, False, pack
        )
        eval_loader = acc.prepare_data_loader(eval_loader)
    # The scheduler is not prepared: accelerate would step it once per process per step.
    model, optimizer, train_loader = dist.prepare(acc, model, optimizer, train_loader)
    dist.check_wrapped(acc, model)
    memory = {"after_prepare": dist.model_state_bytes(acc, model, optimizer)}  # per rank, into summary.json
    dist.CommCounter.watch_ddp(model)
    dist.watch_gradient_bytes(acc, model, optimizer, memory)  # test hook: gradient memory per step
    counts = param_counts(model)
    if acc.is_main_process:  # the launcher's preflight again, now that the run is really here (not the port)
        problem = checkpoint.check_room(out, counts["trainable_params"], t.keep_last, t.save_every)
        if problem:
            raise checkpoint.CheckpointError(problem)
    say(
        f"distlora: {acc.num_processes} process(es), {acc.distributed_type}, mixed precision {acc.mixed_precision}; "
        f"trainable {counts['trainable_params']:,} of {counts['total_params']:,} parameters; "
        f"global batch {sampler.global_batch} = micro {t.micro_batch_size} x accumulation "
        f"{t.gradient_accumulation_steps} x {dp} rank(s); {steps_per_epoch} steps/epoch, {total_steps} steps"
    )

    start_step, best_eval, skipped, in_a_row = 0, None, 0, 0
    resume_from = None
    if acc.is_main_process:
        for p in checkpoint.clean_partial(out):
            say(f"distlora: removed incomplete checkpoint {p} (an interrupted save)")
    dist.barrier(acc)
    if t.resume == "auto":
        resume_from = checkpoint.latest(out)
    elif t.resume != "never":
        resume_from = Path(t.resume)
    if resume_from is not None:
        state = checkpoint.read_state(resume_from)
        problems = checkpoint.resume_problems(
            state, resume_from, cfg, sampler.global_batch, dp, dist.optimizer_reshardable(acc), _data_order(cfg, sampler))
        blocking = [msg for msg, weights_ok in problems if not (t.resume_weights_only and weights_ok)]
        if blocking:
            raise ResumeError(f"cannot resume from {resume_from}:\n  - " + "\n  - ".join(blocking))
        if state["dp_size"] != dp and not problems:
            say(f"distlora: resuming a {state['dp_size']}-process checkpoint on {dp} processes with the same global "
                "batch: same examples per step; results equal up to summation order, not bitwise")
        if state["config_hash"] != cfg.hash():
            say(f"distlora: warning: the run config changed since {resume_from.name}; resuming anyway")
    if resume_from is not None and t.resume_weights_only:
        checkpoint.load_weights_only(acc, model, resume_from)
        say(f"distlora: loaded the adapter of {resume_from} (weights only): fresh optimizer, schedule and data "
            "order from step 0")
    elif resume_from is not None:
        state = checkpoint.load(acc, model, optimizer, scheduler, resume_from)
        start_step, best_eval = state["step"], state.get("best_eval_loss")
        skipped, in_a_row = state.get("nonfinite_skipped", 0), state.get("nonfinite_in_a_row", 0)
        say(f"distlora: resumed from {resume_from} at step {start_step}")

    info = run_info(acc, counts)
    if acc.is_main_process:
        (out / "run_info.json").write_text(json.dumps(info, indent=1))
    with MetricsLog(acc, cfg, cfg.to_dict() | info, start_step) as metrics:  # trackers closed on any exit
        fm = flop_model(dist.unwrap(acc, model))
        peak = device_peak_flops(t.peak_tflops)
        totals = torch.zeros(2, dtype=torch.float64)  # this rank's input tokens and model FLOPs, all steps
        t_loop = time.perf_counter()
        progress = Progress(acc.is_main_process, total_steps, start_step)
        trace = os.environ.get("DISTLORA_TRACE_IDS")  # test hook: per-rank example ids per step
        trace_fh = open(out / f"trace-ids-rank{acc.process_index}.jsonl", "a") if trace else None

        def save(step: int, ev: dict | None) -> None:
            _save(acc, model, optimizer, scheduler, tokenizer, cfg, step, sampler, best_eval, ev,
                  {"nonfinite_skipped": skipped, "nonfinite_in_a_row": in_a_row})
            dist.note_gathered_base(acc, model, memory, f"save {step}")  # ZeRO-3: base back in its partitions

        def run_eval(step: int) -> dict | None:
            nonlocal best_eval
            if eval_loader is None:
                return None
            ev = {"step": step, **evaluate(acc, model, eval_loader, t.loss_chunk_size, t.loss_impl)}
            dist.note_gathered_base(acc, model, memory, f"eval {step}")
            best_eval = ev["eval_loss"] if best_eval is None else min(best_eval, ev["eval_loss"])
            metrics.log(ev)
            say(f"eval step {step}: loss {ev['eval_loss']:.6f} ppl {ev['eval_ppl']:.3f}")
            return ev

        if t.eval_at_start and start_step == 0:
            run_eval(0)

        # ------------------------------------------------------------------ the loop
        model.train()
        accum = t.gradient_accumulation_steps
        device = acc.device
        params = [p for p in model.parameters() if p.requires_grad]
        in_backward = dist.steps_in_backward(acc)
        fp16 = acc.mixed_precision == "fp16"
        it, last_eval, row, last_logged, comm_bytes = None, None, None, start_step, 0
        for step in range(start_step, total_steps):
            faults.hit(f"step{step}")
            dist.CommCounter.take()  # what eval or a save moved since the last step is not the step's
            t0 = time.perf_counter()
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if it is None or in_epoch == 0:
                sampler.position(epoch, in_epoch)
                it = iter(train_loader)
            window = [next(it) for _ in range(accum)]
            t_data = time.perf_counter() - t0
            local = torch.tensor(
                [sum(int((b["labels"][:, 1:] != data.IGNORE).sum()) for b in window), stop.requested()],
                dtype=torch.float64,
                device=device,
            )
            n_target, stop_votes = dist.all_sum(acc, local).tolist()  # one all-reduce: the window's tokens, stop votes
            if stop_votes:  # every rank agrees here, so none enters a collective alone
                if step != start_step or resume_from is None:
                    save(step, None)
                raise Stopped(
                    f"distlora: stopped at step {step}/{total_steps} ({stop.reason or 'another rank was asked'}); "
                    f"checkpoint in {checkpoint.step_dir(out, step)}; rerun the same command to resume"
                )
            torch.manual_seed(_dropout_seed(t.seed, step, acc.process_index))
            # the backend divides by `accum` and averages over ranks; the scale undoes both so the summed
            # gradient is d(sum NLL)/dθ / n_target exactly (under DeepSpeed the engine steps in backward)
            scale = dist.loss_scale(acc, n_target)
            nll_total = torch.zeros((), dtype=torch.float64, device=device)
            loss_bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss on this rank's window
            for batch in window:
                with acc.accumulate(model):
                    nll = forward_nll(model, batch, t.loss_chunk_size, t.loss_impl, total=True)
                    nll = faults.corrupt_loss(f"step{step}", nll)
                    loss_bad |= ~torch.isfinite(nll.detach())
                    if acc.sync_gradients:
                        # Decided before the backward that may apply the update (DeepSpeed steps inside
                        # it), alike on every rank: a window with a non-finite loss anywhere gets a NaN
                        # gradient, which every backend then discards (see below).
                        window_bad = dist.any_rank(acc, loss_bad)
                        if window_bad:
                            nll = nll * float("nan")
                    acc.backward(nll * scale)
                    nll_total += nll.detach().double()
                    if acc.sync_gradients:
                        # The norm is taken on all-reduced gradients: every rank decides alike.
                        grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
                        if in_backward:
                            applied = dist.step_applied(acc)
                        elif math.isfinite(float(grad_norm)) or acc.scaler is not None:
                            optimizer.step()  # an fp16 grad scaler skips a non-finite step itself, lowering its scale
                            applied = not optimizer.step_was_skipped
                        else:
                            applied = False
                        if window_bad and applied:
                            raise NonFiniteError(
                                f"step {step + 1}: the backend applied an update from a non-finite loss; the "
                                "adapter is now corrupt: resume from the last checkpoint"
                            )
                        if applied:
                            in_a_row = 0
                        elif fp16 and not window_bad:
                            say(f"distlora: fp16 gradient overflow at step {step + 1}: step skipped, loss scale lowered")
                        else:
                            skipped, in_a_row = skipped + 1, in_a_row + 1
                            what = "loss" if window_bad else "gradient"
                            say(f"distlora: non-finite {what} at step {step + 1}: step skipped ({skipped} so far)")
                            if t.nonfinite == "abort" or in_a_row >= t.nonfinite_max_in_a_row:
                                raise NonFiniteError(
                                    f"non-finite {what} at step {step + 1} ({in_a_row} in a row, "
                                    f"train.nonfinite={t.nonfinite}, nonfinite_max_in_a_row={t.nonfinite_max_in_a_row}); "
                                    "the update was not applied; lower train.lr, check the data, or resume from the "
                                    "last checkpoint"
                                )
                        optimizer.zero_grad(set_to_none=dist.grads_set_to_none(acc))
            comm_bytes += dist.CommCounter.take()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()  # also on a skipped step: the lr stays a function of the step index
            done = step + 1
            dist.note_gathered_base(acc, model, memory, f"step {done}")
            if trace_fh:
                trace_fh.write(json.dumps({"step": done, "ids": [int(i) for b in window for i in b["ids"]]}) + "\n")

            lengths = torch.cat([data.example_lengths(b) for b in window])  # real examples, padded or packed
            local_tokens = int(lengths.sum())
            local_flops = fm.step(local_tokens, lengths.tolist())
            totals += torch.tensor([local_tokens, local_flops], dtype=torch.float64)
            row = None
            if done % t.log_every == 0 or done == total_steps:
                stats = torch.tensor(
                    [
                        nll_total.item(),
                        local_tokens,
                        sum(b["input_ids"].numel() for b in window),
                        len(lengths),
                        local_flops,
                    ],
                    dtype=torch.float64,
                    device=device,
                )
                nll_sum, n_input, n_padded, n_examples, flops = dist.all_sum(acc, stats).tolist()
                dt = time.perf_counter() - t0
                row = {
                    "step": done,
                    "epoch": round(done / steps_per_epoch, 6),
                    "loss": _finite_or_none(nll_sum / max(n_target, 1)),
                    "lr": lr,
                    "grad_norm": _finite_or_none(float(grad_norm)),
                    "nonfinite_skipped": skipped,
                    "target_tokens": int(n_target),
                    "input_tokens": int(n_input),
                    "padded_tokens": int(n_padded),
                    "examples": int(n_examples),
                    "tokens_per_s": n_input / dt,
                    "tokens_per_s_per_device": n_input / dt / dp,
                    "examples_per_s": n_examples / dt,
                    "tflops_per_device": flops / dt / dp / 1e12,
                    "mfu": flops / dt / dp / peak if peak else None,
                    "step_time_s": dt,
                    "data_wait_s": t_data,
                    "comm_bytes": comm_bytes // (done - last_logged),  # per optimizer step
                    "peak_mem_mb": peak_memory_mb(),
                }
                metrics.log(row)
                last_logged, comm_bytes = done, 0
            progress.update(done, row)

            if t.eval_every and done % t.eval_every == 0 and done != total_steps:
                last_eval = run_eval(done)
            if t.save_every and done % t.save_every == 0 and done != total_steps:
                save(done, last_eval if last_eval and last_eval["step"] == done else None)
        # ------------------------------------------------------------------ end of loop
        loop_s = time.perf_counter() - t_loop
        progress.close()
        if trace_fh:
            trace_fh.close()
        memory["after_train"] = dist.model_state_bytes(acc, model, optimizer)
        final_eval = run_eval(total_steps)
        memory["after_eval"] = dist.model_state_bytes(acc, model, optimizer)
        if t.save_every and total_steps % t.save_every == 0 and start_step < total_steps:
            save(total_steps, final_eval)
        checkpoint.save_adapter(acc, model, tokenizer, out / "adapter")
        dist.note_gathered_base(acc, model, memory, "save adapter")
        memory["after_save"] = dist.model_state_bytes(acc, model, optimizer)
        memory_per_rank = dist.gather_objects(acc, memory)
        base_sum_end = _checksum(frozen)
        adapter_sum = _checksum(params)
        per_rank = acc.gather(torch.tensor(
            [[base_sum_start, base_sum_end, adapter_sum, peak_memory_mb()]], dtype=torch.float64, device=device))
        tokens, flops = dist.all_sum(acc, totals.to(device)).tolist()
        if acc.is_main_process:
            summary = {
                "steps": total_steps,
                "steps_this_leg": total_steps - start_step,
                "total_input_tokens": int(tokens),
                "train_wall_s": loop_s,
                "mean_tokens_per_s": tokens / max(loop_s, 1e-9),
                "mean_tflops_per_device": flops / max(loop_s, 1e-9) / dp / 1e12,
                "mfu": flops / max(loop_s, 1e-9) / dp / peak if peak else None,
                "peak_mem_mb": max(r[3] for r in per_rank.tolist()),
                "final_train_loss": row["loss"] if row else None,
                "final_eval_loss": final_eval["eval_loss"] if final_eval else None,
                "adapter": str(out / "adapter"),
                "per_rank": [dict(zip(("base_checksum_start", "base_checksum_end", "adapter_checksum", "peak_mem_mb"), r))
                             for r in per_rank.tolist()],
                "backend": dist.backend_name(acc),
                "memory_per_rank": memory_per_rank,
            }
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            say(summary_table(summary))


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _data_order(cfg, sampler) -> dict:
    """What, besides the global batch, fixes which examples each step holds: an exact resume needs it equal."""
    from distlora import data

    return {"seed": cfg.train.seed, "shuffle": cfg.data.shuffle, "group_by_length": cfg.data.group_by_length,
            "row_capacity": data.row_capacity(cfg), "items": sampler.n}


def _save(acc, model, optimizer, scheduler, tokenizer, cfg, step, sampler, best_eval, ev, extra) -> None:
    from distlora import checkpoint

    state = {
        **extra,
        "step": step,
        "examples_seen": step * sampler.global_batch,
        "global_batch": sampler.global_batch,
        "data_order": _data_order(cfg, sampler),
        "dp_size": sampler.world,
        "config_hash": cfg.hash(),
        "model": cfg.model.name_or_path,
        "lora_shape": checkpoint.lora_shape(cfg),
        "eval_loss": ev["eval_loss"] if ev else None,
        "best_eval_loss": best_eval,
    }
    checkpoint.save(acc, model, optimizer, scheduler, tokenizer, cfg.train.output_dir, state, cfg.train.keep_last)


if __name__ == "__main__":
    code = main()
    # Leave without interpreter teardown: C++ threads (gloo, torch's pools) destroyed at exit have been
    # seen to abort a finished worker ("terminate called without an active exception", exit -6), which
    # the launcher reports as a failed job. Everything is written and closed by now.
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
