"""`accelerate launch [--config_file X.yaml] -m distlora.train --config run.yaml [dotted.key=value ...]`

main() validates the config before anything heavy, builds the pieces, and runs `fit()`, the one
training loop, which reads top to bottom: per optimizer step, fetch the whole accumulation window,
count its target tokens across ranks (one all-reduce), then forward/backward each micro batch with
the loss scaled so the step's gradient is exactly sum(token NLL) / (target tokens in the window,
all ranks), clip, step, log, evaluate, checkpoint.
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
        cfg = config_mod.load(args.config, args.overrides)
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
    run(cfg)
    return 0


# ---------------------------------------------------------------------------------------------


def forward_nll(model, batch, chunk: int = 0):
    """Per-example summed NLL and target-token counts of a padded or packed batch; `chunk` > 0 computes
    lm_head + cross-entropy `chunk` target tokens at a time (distlora.loss)."""
    from distlora.loss import example_nll

    return example_nll(model, batch, chunk)


def evaluate(acc, model, loader, chunk: int = 0) -> dict:
    """Eval loss from per-example (NLL sum, token count) gathered across ranks, summed in example-id
    order in float64: the same value for any number of processes."""
    import torch

    model.eval()
    ids, nlls, counts = [], [], []
    with torch.no_grad():
        for batch in loader:
            nll, n = forward_nll(model, batch, chunk)
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

    from distlora import checkpoint, data, datacache
    from distlora import distributed as dist
    from distlora.metrics import MetricsLog, Progress, peak_memory_mb
    from distlora.model import load_model, load_tokenizer, param_counts

    acc = dist.build_accelerator(cfg)
    say = acc.print
    t = cfg.train
    out = Path(t.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config_mod.dump(cfg, out / "config.yaml")
    dist.barrier(acc)
    set_seed(t.seed)

    tokenizer = load_tokenizer(cfg)
    train_records, eval_records, _ = datacache.load_datasets(cfg, tokenizer, acc.main_process_first, log=say)
    model = load_model(cfg, acc.mixed_precision)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    base_sum_start = _checksum(frozen)
    optimizer = make_optimizer(model, cfg)

    dp = dist.data_parallel_size(acc)
    pad_id = tokenizer.pad_token_id
    pack = cfg.data.max_seq_len if cfg.data.packing else 0
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
    model, optimizer, train_loader = acc.prepare(model, optimizer, train_loader)
    dist.check_wrapped(acc, model)
    comm = dist.GradCommCounter(acc, model)
    counts = param_counts(model)
    say(
        f"distlora: {acc.num_processes} process(es), {acc.distributed_type}, mixed precision {acc.mixed_precision}; "
        f"trainable {counts['trainable_params']:,} of {counts['total_params']:,} parameters; "
        f"global batch {sampler.global_batch} = micro {t.micro_batch_size} x accumulation "
        f"{t.gradient_accumulation_steps} x {dp} rank(s); {steps_per_epoch} steps/epoch, {total_steps} steps"
    )

    start_step, best_eval = 0, None
    resume_from = None
    if t.resume == "auto":
        resume_from = checkpoint.latest(out)
        _, partial = checkpoint.complete_checkpoints(out)
        for p in partial:
            say(f"distlora: ignoring incomplete checkpoint {p}")
    elif t.resume != "never":
        resume_from = Path(t.resume)
    if resume_from is not None:
        state = checkpoint.read_state(resume_from)
        if state["global_batch"] != sampler.global_batch:
            raise SystemExit(
                f"distlora: {resume_from} was written with global batch {state['global_batch']}, this run has "
                f"{sampler.global_batch}; keep micro_batch_size x gradient_accumulation_steps x processes equal, or "
                "set train.resume=never"
            )
        if state["config_hash"] != cfg.hash():
            say(f"distlora: warning: the run config changed since {resume_from.name}; resuming anyway")
        state = checkpoint.load(acc, model, optimizer, scheduler, resume_from)
        start_step, best_eval = state["step"], state.get("best_eval_loss")
        say(f"distlora: resumed from {resume_from} at step {start_step}")

    metrics = MetricsLog(acc, cfg, cfg.to_dict() | {"world_size": acc.num_processes, **counts})
    progress = Progress(acc.is_main_process, total_steps, start_step)
    trace = os.environ.get("DISTLORA_TRACE_IDS")  # test hook: per-rank example ids per step
    trace_fh = open(out / f"trace-ids-rank{acc.process_index}.jsonl", "a") if trace else None

    def run_eval(step: int) -> dict | None:
        nonlocal best_eval
        if eval_loader is None:
            return None
        ev = evaluate(acc, model, eval_loader, t.loss_chunk_size)
        best_eval = ev["eval_loss"] if best_eval is None else min(best_eval, ev["eval_loss"])
        metrics.log({"step": step, **ev})
        say(f"eval step {step}: loss {ev['eval_loss']:.6f} ppl {ev['eval_ppl']:.3f}")
        return ev

    if t.eval_at_start and start_step == 0:
        run_eval(0)

    # ------------------------------------------------------------------ the loop
    model.train()
    accum = t.gradient_accumulation_steps
    device = acc.device
    params = [p for p in model.parameters() if p.requires_grad]
    it = None
    last_eval = None
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if it is None or in_epoch == 0:
            sampler.position(epoch, in_epoch)
            it = iter(train_loader)
        window = [next(it) for _ in range(accum)]
        t_data = time.perf_counter() - t0
        local = torch.tensor(
            [sum(int((b["labels"][:, 1:] != data.IGNORE).sum()) for b in window)], dtype=torch.float64, device=device
        )
        n_target = acc.reduce(local, "sum").item()  # target tokens of the whole window, all ranks
        torch.manual_seed(_dropout_seed(t.seed, step, acc.process_index))
        nll_total = torch.zeros((), dtype=torch.float64, device=device)
        for batch in window:
            with acc.accumulate(model):
                nll, _ = forward_nll(model, batch, t.loss_chunk_size)
                nll = nll.sum()
                # accelerate divides by `accum` and DDP averages over `dp` ranks; undo both so the
                # summed gradient is d(sum NLL)/dθ / n_target exactly.
                acc.backward(nll * (dp * accum / max(n_target, 1)))
                nll_total += nll.detach().double()
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        done = step + 1
        if trace_fh:
            trace_fh.write(json.dumps({"step": done, "ids": [int(i) for b in window for i in b["ids"]]}) + "\n")

        row = None
        if done % t.log_every == 0 or done == total_steps:
            stats = torch.tensor(
                [
                    nll_total.item(),
                    sum(data.input_tokens(b) for b in window),
                    sum(b["input_ids"].numel() for b in window),
                    sum(int((b["ids"] >= 0).sum()) for b in window),
                ],
                dtype=torch.float64,
                device=device,
            )
            nll_sum, n_input, n_padded, n_examples = acc.reduce(stats, "sum").tolist()
            dt = time.perf_counter() - t0
            row = {
                "step": done,
                "epoch": round(done / steps_per_epoch, 6),
                "loss": nll_sum / max(n_target, 1),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "target_tokens": int(n_target),
                "input_tokens": int(n_input),
                "padded_tokens": int(n_padded),
                "examples": int(n_examples),
                "tokens_per_s": n_input / dt,
                "step_time_s": dt,
                "data_wait_s": t_data,
                "grad_comm_bytes": comm.take(),
                "peak_mem_mb": peak_memory_mb(),
            }
            metrics.log(row)
        progress.update(done, row)

        if t.eval_every and done % t.eval_every == 0 and done != total_steps:
            last_eval = run_eval(done)
        if t.save_every and done % t.save_every == 0 and done != total_steps:
            _save(acc, model, optimizer, scheduler, tokenizer, cfg, done, sampler, best_eval, last_eval)
    # ------------------------------------------------------------------ end of loop
    progress.close()
    if trace_fh:
        trace_fh.close()
    final_eval = run_eval(total_steps)
    if t.save_every and total_steps % t.save_every == 0 and start_step < total_steps:
        _save(acc, model, optimizer, scheduler, tokenizer, cfg, total_steps, sampler, best_eval, final_eval)
    checkpoint.save_adapter(acc, model, tokenizer, out / "adapter")
    base_sum_end = _checksum(frozen)
    adapter_sum = _checksum(params)
    sums = acc.gather(torch.tensor([[base_sum_start, base_sum_end, adapter_sum]], dtype=torch.float64, device=device))
    if acc.is_main_process:
        summary = {
            "steps": total_steps,
            "final_eval_loss": final_eval["eval_loss"] if final_eval else None,
            "adapter": str(out / "adapter"),
            "per_rank": [dict(zip(("base_checksum_start", "base_checksum_end", "adapter_checksum"), r)) for r in sums.tolist()],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        say(f"distlora: done; adapter in {out / 'adapter'}")
    metrics.close()
    if cfg.log.report_to:
        acc.end_training()  # destroys the process group: last


def _save(acc, model, optimizer, scheduler, tokenizer, cfg, step, sampler, best_eval, ev) -> None:
    from distlora import checkpoint

    state = {
        "step": step,
        "examples_seen": step * sampler.global_batch,
        "global_batch": sampler.global_batch,
        "dp_size": sampler.world,
        "config_hash": cfg.hash(),
        "eval_loss": ev["eval_loss"] if ev else None,
        "best_eval_loss": best_eval,
    }
    checkpoint.save(acc, model, optimizer, scheduler, tokenizer, cfg.train.output_dir, state, cfg.train.keep_last)


if __name__ == "__main__":
    sys.exit(main())
