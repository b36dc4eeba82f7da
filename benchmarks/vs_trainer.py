"""distlora vs Hugging Face Trainer + PEFT on the same model, data slice, seed and hyperparameters.

    python benchmarks/vs_trainer.py            # 4-layer 256-wide Llama, GSM8K slice, 1 and 2 processes, 5 repeats
    python benchmarks/vs_trainer.py --quick    # tiny sizes, 1 process, 2 repeats (a few minutes on 2 cores)
    python benchmarks/vs_trainer.py --profile  # where the time goes: self CPU ms per op for a, b, c

Variants (each run in its own process, runs alternated round-robin, threads pinned):
  a    Trainer + PEFT, DataCollatorForSeq2Seq (padding), examples in distlora's order (sequential)
  a'   Trainer + PEFT with train_sampling_strategy=group_by_length
  a''  Trainer + PEFT with DataCollatorWithFlattening (padding-free, position ids)
  b    distlora, unpacked
  b'   distlora, data.group_by_length, lm_head + loss on target tokens only (train.loss_chunk_size)
  c    distlora, data.packing, lm_head + loss on target tokens only
  c'   c with one packed row per micro batch of train.micro_batch_tokens = micro x the mean example
       length: about b's tokens per step, so about b's number of optimizer steps over the epoch (c's
       rows hold ~3x b's examples: a third of the steps, a different optimization, not a slower one)
The model (LlamaConfig built here, random weights, a byte-level BPE tokenizer trained here on GSM8K's
text: nothing downloads), the GSM8K rows, the tokenization (distlora.data for every variant), LoRA init
(seeded, distlora.model.load_model), optimizer and schedule are shared. Data: every variant of a process
count trains on the same rows, one epoch (`steps` global batches; packed, the fewer steps its rows
make), so the grouped variants time the same examples: no tool's choice of which batches fall in a
dropped warm-up changes its number. Timing: every step, from the first fetch to the last step end
(each side pays its own first-step costs); tokens/s counts real (non-padding) input tokens. Each step is
split (StepSplit) into data, forward, backward, optimizer and other by wrapping each side's calls from
outside. Both sides log a loss every step (Trainer logging_steps=1, distlora log_every=1) and evaluate
only after training. The final eval loss is computed the same way for every variant (sum of token NLL /
target tokens over the eval slice, distlora.loop.evaluate). Ratios are tokens/s vs variant a of the
same process count, with a bootstrap 95% interval over the repeats. Round i runs every variant with
seed 7 + i (a and b of a round see the same batches and LoRA init), so the eval-loss spread over
rounds is the seed-to-seed variance. Threads: 2 for one process; with 2 processes each rank is
pinned to its own core with 1 thread. The table ends with the issue's targets (lower bounds of the
intervals), each met or MISSED.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data/gsm8k next to the checkout (a git worktree one level deeper also finds it); or $DISTLORA_GSM8K
_CANDIDATES = [Path(os.environ["DISTLORA_GSM8K"])] if os.environ.get("DISTLORA_GSM8K") else []
_CANDIDATES += [ROOT.parent / "shared" / "data" / "gsm8k", ROOT.parent.parent / "shared" / "data" / "gsm8k"]
GSM8K = next((c for c in _CANDIDATES if (c / "train.jsonl").is_file()), _CANDIDATES[0])
VARIANTS = ["a", "a'", "a''", "b", "b'", "c", "c'"]
NAMES = {
    "a": "Trainer+PEFT",
    "a'": "Trainer+PEFT group_by_length",
    "a''": "Trainer+PEFT DataCollatorWithFlattening",
    "b": "distlora unpacked",
    "b'": "distlora group_by_length (loss on targets)",
    "c": "distlora packed (loss on targets)",
    "c'": "distlora packed, b's tokens per step (loss on targets)",
}

QUICK = dict(layers=2, hidden=64, vocab=1024, n_eval=8, max_seq_len=512, micro=4, steps=8, repeats=2, procs=[1])
FULL = dict(layers=4, hidden=256, vocab=4096, n_eval=128, max_seq_len=512, micro=8, steps=40, repeats=3, procs=[1, 2])


# --------------------------------------------------------------------------------------------- setup


def _gsm8k_texts() -> list[str]:
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines() if line.strip()]
    return [r["question"] + "\n" + r["answer"] for r in rows]


def build_bpe_tokenizer(out: Path, texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained here on GSM8K's training text: token lengths like a real LLM's
    (GSM8K rows ~100-300 tokens), so the padding that packing removes is realistic. distlora.tiny's
    character-level tokenizer makes most rows longer than 512 tokens: all truncated to about the same
    length, ~12% padding, nothing for packing to gain. Specials and chat template as distlora.tiny's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distlora.tiny import CHAT_TEMPLATE, SPECIALS

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=SPECIALS[3:])
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def prepare(work: Path, spec: dict) -> None:
    """Model + tokenizer under work/model; GSM8K slices: work/train-{P}.jsonl holds exactly one epoch of
    `steps` global batches for P processes (so every variant of a process count trains on the same
    multiset of examples once), work/eval.jsonl the eval rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_bpe_tokenizer(work / "model", _gsm8k_texts(), spec["vocab"])
    h = spec["hidden"]
    conf = LlamaConfig(
        vocab_size=len(tok), hidden_size=h, intermediate_size=4 * h, num_hidden_layers=spec["layers"],
        num_attention_heads=max(4, h // 64), num_key_value_heads=max(4, h // 64), max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(conf).save_pretrained(work / "model", safe_serialization=True)
    train = (GSM8K / "train.jsonl").read_text().splitlines()
    for procs in spec["procs"]:
        (work / f"train-{procs}.jsonl").write_text("\n".join(train[: epoch_rows(spec, procs)]) + "\n")
    (work / "eval.jsonl").write_text("\n".join((GSM8K / "test.jsonl").read_text().splitlines()[: spec["n_eval"]]) + "\n")
    from distlora import config as config_mod
    from distlora import data

    cfg = config_mod.validate(run_config(work, {**spec, "procs": spec["procs"][:1]}, "b", work / "probe", spec["procs"][0]))
    train, _, _ = data.build_datasets(cfg, tok, log=lambda *_: None)
    lengths = [len(r["input_ids"]) for r in train]
    (work / "lengths.json").write_text(json.dumps({"mean": sum(lengths) / len(lengths)}))


TARGETS_ONLY = 1 << 20  # a loss chunk larger than any micro batch's target count: one chunk, kept for backward


def epoch_rows(spec: dict, procs: int) -> int:
    return spec["steps"] * spec["micro"] * procs


def run_config(work: Path, spec: dict, variant: str, out: Path, procs: int, seed: int = 7) -> dict:
    """One epoch of work/train-{procs}.jsonl: `steps` optimizer steps unpacked; packed (c), the fewer
    steps its rows make (max_steps null, epochs 1)."""
    return {
        "model": {"name_or_path": str(work / "model"), "dtype": "float32", "attn_implementation": "sdpa"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {
            "train": str(work / f"train-{procs}.jsonl"), "eval": str(work / "eval.jsonl"),
            "max_seq_len": spec["max_seq_len"], "format": "completion", "prompt_field": "question",
            "completion_field": "answer", "packing": variant in ("c", "c'"), "group_by_length": variant == "b'",
        },
        "train": {
            "output_dir": str(out), "micro_batch_size": spec["micro"], "gradient_accumulation_steps": 1,
            "max_steps": None if variant in ("c", "c'") else spec["steps"], "epochs": 1, "lr": 1e-3, "warmup_steps": 2,
            "lr_scheduler": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0, "save_every": 0,
            "mixed_precision": "no", "seed": seed, "log_every": 1,
            # b' and c as a CPU user would run them fastest: lm_head and the loss over target tokens only, in
            # one chunk (no recompute); b keeps the plain loss, so its per-step losses compare with a's
            "loss_chunk_size": TARGETS_ONLY if variant in ("b'", "c", "c'") else 0,
            **({"micro_batch_size": 1, "micro_batch_tokens": _token_budget(work, spec)} if variant == "c'" else {}),
        },
    }


def _token_budget(work: Path, spec: dict) -> int:
    """c''s packed row: micro x the mean tokenized length of the training rows (prepare writes it), at
    least max_seq_len so every example fits."""
    mean = json.loads((work / "lengths.json").read_text())["mean"]
    return max(spec["max_seq_len"], round(spec["micro"] * mean))


# --------------------------------------------------------------------------------------------- workers


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _profiled(fn, result: Path):
    """Run fn(); with DISTLORA_BENCH_PROFILE=1, under torch.profiler, writing self CPU ms per op family."""
    if not os.environ.get("DISTLORA_BENCH_PROFILE"):
        return fn()
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    ops["(wall of the whole run, ms)"] = wall * 1e3
    result.with_name("profile.json").write_text(json.dumps(ops))
    return out


class StepSplit:
    """Where each optimizer step's wall time goes, measured from outside the loop being timed: the step
    is the time between consecutive step-end marks (the first from the first fetch), and `timed(cat, fn)`
    wraps the calls of each part. data: fetching the window; forward: model forward and loss; backward
    (gradient all-reduce included under DDP); optimizer: clipping, the optimizer step, zeroing gradients;
    other: the rest (the loop's own bookkeeping: counts, collectives of counts, host reads, schedule,
    logging, checks). Only ends of whole steps are kept, so nested parts never count twice."""

    PARTS = ("data", "forward", "backward", "optimizer")

    def __init__(self):
        self.rows: list[dict] = []
        self.mark = None
        self.cur = dict.fromkeys(self.PARTS, 0.0)
        self.depth = 0

    def begin(self) -> None:
        if self.mark is None:
            self.mark = time.perf_counter()

    def timed(self, part: str, fn):
        def wrapper(*a, **k):
            self.begin()
            if self.depth:  # a part called inside another (e.g. zero_grad inside step): counted once
                return fn(*a, **k)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.cur[part] += time.perf_counter() - t0
                self.depth -= 1
        return wrapper

    def end_step(self) -> None:
        now = time.perf_counter()
        total = now - self.mark
        row = {**self.cur, "total": total}
        row["other"] = total - sum(self.cur[k] for k in self.PARTS)
        self.rows.append(row)
        self.mark, self.cur = now, dict.fromkeys(self.PARTS, 0.0)

    def summary(self) -> dict:
        """Seconds per part summed over every step (all steps are timed)."""
        return {k: sum(r[k] for r in self.rows) for k in (*self.PARTS, "other", "total")}


def worker_distlora(cfg_dict: dict, result: Path) -> None:
    from distlora import config as config_mod
    from distlora import hooks, loop
    from distlora.loop import run

    if os.environ.get("DISTLORA_BENCH_PROFILE"):
        cfg_dict["data"]["eval"] = None  # profile the training steps only, as for Trainer below
    cfg = config_mod.validate(cfg_dict)
    from distlora import backends
    from distlora.plan import resolve_for_training

    resolve_for_training(cfg, backends.launched_backend(), backends.env_world_size())  # as distlora.train does
    split, fetch = StepSplit(), {}

    def on_prepared(backend):
        for name, part in (("backward", "backward"), ("clip", "optimizer"), ("step", "optimizer"),
                           ("zero_grad", "optimizer")):
            setattr(backend, name, split.timed(part, getattr(backend, name)))

    def on_step(step):
        split.begin()
        fetch["t"] = time.perf_counter()

    def on_fetched(step, window):
        split.cur["data"] += time.perf_counter() - fetch["t"]

    hooks.add("prepared", on_prepared)
    hooks.add("step", on_step)
    hooks.add("fetched", on_fetched)
    hooks.add("window_done", lambda backend, step, window: split.end_step())
    loop.forward_nll = split.timed("forward", loop.forward_nll)
    _profiled(lambda: run(cfg), result)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    rows = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    ev = [r["eval_loss"] for r in rows if "eval_loss" in r] or [float("nan")]  # no eval when profiling
    result.write_text(json.dumps({
        "time_s": split.summary()["total"],
        "split": split.summary(),
        "steps": len(steps),
        "tokens": sum(r["input_tokens"] for r in steps),
        "padded": sum(r["padded_tokens"] for r in steps),
        "examples": sum(r["examples"] for r in steps),
        "losses": [r["loss"] for r in steps],
        "eval_loss": ev[-1],
        "rss_mb": _rss_mb(),
    }))


def worker_trainer(cfg_dict: dict, variant: str, result: Path) -> None:
    import torch
    from accelerate import Accelerator
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    from distlora import config as config_mod
    from distlora import data
    from distlora.model import load_model, load_tokenizer
    from distlora.loop import evaluate

    cfg = config_mod.validate(cfg_dict)
    t = cfg.train
    tok = load_tokenizer(cfg)
    train, evals, _ = data.build_datasets(cfg, tok, log=lambda *_: None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    # distlora's order (seeded permutation per epoch), fed sequentially: a and b see the same batches
    sampler = data.GlobalBatchSampler(len(train), t.micro_batch_size, 1, world, t.seed, True)
    order: list[int] = []
    epoch = 0
    while len(order) < t.max_steps * sampler.global_batch:
        sampler.position(epoch, 0)
        order += [i for i in sampler.order() if i >= 0]
        epoch += 1
    ds = Dataset.from_list([{"input_ids": train[i]["input_ids"], "labels": train[i]["labels"]} for i in order])
    model = load_model(cfg, "no")
    base = DataCollatorWithFlattening() if variant == "a''" else DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    counts: list[tuple[int, int]] = []  # (real tokens, padded tokens) per micro batch, in order

    def collate(features):
        counts.append((sum(len(f["input_ids"]) for f in features), 0))
        batch = base(features)
        counts[-1] = (counts[-1][0], int(batch["input_ids"].numel()))
        return batch

    losses: list[float] = []
    split = StepSplit()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            split.end_step()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(
        output_dir=t.output_dir, per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=1,
        max_steps=t.max_steps, learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_epsilon=t.adam_eps, max_grad_norm=t.max_grad_norm, lr_scheduler_type="cosine",
        warmup_steps=t.warmup_steps, optim="adamw_torch",
        train_sampling_strategy="group_by_length" if variant == "a'" else "sequential",
        dataloader_num_workers=0, remove_unused_columns=False, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, seed=t.seed, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()])
    trainer.get_batch_samples = split.timed("data", trainer.get_batch_samples)
    trainer.compute_loss = split.timed("forward", trainer.compute_loss)
    trainer.accelerator.backward = split.timed("backward", trainer.accelerator.backward)
    trainer._clip_grad_norm = split.timed("optimizer", trainer._clip_grad_norm)
    # the optimizer (made inside train) and the model's zero_grad (on the wrapped model): patched by class
    opt_start = {}
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(lambda *a: opt_start.__setitem__("t", time.perf_counter()))
    register_optimizer_step_post_hook(
        lambda *a: split.cur.__setitem__("optimizer", split.cur["optimizer"] + time.perf_counter() - opt_start["t"]))
    zero_grad = torch.nn.Module.zero_grad
    torch.nn.Module.zero_grad = lambda self, *a, **k: split.timed("optimizer", zero_grad)(self, *a, **k)
    _profiled(trainer.train, result)
    torch.nn.Module.zero_grad = zero_grad
    acc = Accelerator(cpu=True)
    loader, _ = data.make_loader(evals, tok.pad_token_id, t.micro_batch_size, 1, 1, 0, False)
    ev = evaluate(acc, model, loader)
    result.with_name(result.stem + f"-rank{rank}.json").write_text(json.dumps({
        "time_s": split.summary()["total"],
        "split": split.summary(),
        "steps": len(split.rows),
        "tokens": sum(c[0] for c in counts[: t.max_steps]),
        "padded": sum(c[1] for c in counts[: t.max_steps]),
        "examples": min(len(counts), t.max_steps) * t.micro_batch_size,
        "losses": losses,
        "eval_loss": ev["eval_loss"],
        "rss_mb": _rss_mb(),
    }))


# --------------------------------------------------------------------------------------------- driver


def launch_run(work: Path, spec: dict, variant: str, procs: int, rep: int) -> dict:
    out = work / "runs" / f"{variant.replace(chr(39), 'p')}-{procs}-{rep}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = run_config(work, spec, variant, out / "out", procs, seed=7 + rep)  # every variant of a round: one seed
    (out / "cfg.json").write_text(json.dumps(cfg))
    result = out / "result.json"
    threads = "2" if procs == 1 else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    worker = [str(Path(__file__).resolve()), "--worker", variant, "--cfg", str(out / "cfg.json"),
              "--result", str(result)]
    if procs == 1:
        cmd = [sys.executable, *worker]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"), "--num_processes", str(procs), *worker]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"run {variant} x{procs} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    if variant.startswith("a"):
        parts = [json.loads(p.read_text()) for p in sorted(out.glob("result-rank*.json"))]
        r = {
            "time_s": max(p["time_s"] for p in parts), "split": parts[0]["split"], "steps": parts[0]["steps"],
            "tokens": sum(p["tokens"] for p in parts),
            "padded": sum(p["padded"] for p in parts), "examples": sum(p["examples"] for p in parts),
            "losses": parts[0]["losses"], "eval_loss": parts[0]["eval_loss"], "rss_mb": max(p["rss_mb"] for p in parts),
        }
    else:
        r = json.loads(result.read_text())
    r["wall_s"] = wall
    return r


def bootstrap_ratio(xs: list[float], ys: list[float], n: int = 2000) -> tuple[float, float]:
    """95% interval of mean(xs) / mean(ys), resampling each with replacement."""
    rng = random.Random(0)
    out = sorted(
        statistics.fmean(rng.choices(xs, k=len(xs))) / statistics.fmean(rng.choices(ys, k=len(ys))) for _ in range(n)
    )
    return out[int(0.025 * n)], out[int(0.975 * n) - 1]


def _mean_sd(xs: list[float], digits: int) -> str:
    return f"{statistics.fmean(xs):.{digits}f}" + (f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else "")


def _tps(results: dict, v: str, procs: int) -> list[float]:
    return [r["tokens"] / r["time_s"] for r in results[(v, procs)]]


def _ratio(results: dict, v: str, base: str, procs: int) -> tuple[float, float, float]:
    """mean tok/s of v / mean of base, with the bootstrap 95% interval (nan for one repeat)."""
    xs, ys = _tps(results, v, procs), _tps(results, base, procs)
    lo, hi = bootstrap_ratio(xs, ys) if len(xs) > 1 and len(ys) > 1 else (float("nan"), float("nan"))
    return statistics.fmean(xs) / statistics.fmean(ys), lo, hi


def other_share(results: dict, v: str, procs: int) -> float:
    """The mean share of step time outside data, forward, backward and optimizer (StepSplit's 'other')."""
    return statistics.fmean(r["split"]["other"] / r["split"]["total"] for r in results[(v, procs)])


def targets(results: dict, procs: int, loss_diff: float) -> list[str]:
    """The issue's targets for this process count, judged on the interval's lower bound where there is
    one, each with its numbers and met / MISSED."""
    trainer = [v for v in ("a", "a'", "a''") if (v, procs) in results]
    best = max(trainer, key=lambda v: statistics.fmean(_tps(results, v, procs)))
    rows = []
    if (("b'", procs) in results) and (("a'", procs) in results):
        r, lo, hi = _ratio(results, "b'", "a'", procs)
        rows.append(("b' >= 1.05x a' (group_by_length vs group_by_length, lower bound)", lo >= 1.05,
                     f"{r:.2f}x [{lo:.2f}, {hi:.2f}]"))
    for c in (v for v in ("c", "c'") if (v, procs) in results):
        r, lo, hi = _ratio(results, c, best, procs)
        rows.append((f"{c} >= 1.2x the best Trainer row ({best}, lower bound)", lo >= 1.2, f"{r:.2f}x [{lo:.2f}, {hi:.2f}]"))
        ev_b = [r["eval_loss"] for r in results[("b", procs)]]
        ev_c = [r["eval_loss"] for r in results[(c, procs)]]
        sd_b = statistics.stdev(ev_b) if len(ev_b) > 1 else float("nan")
        gap = statistics.fmean(ev_c) - statistics.fmean(ev_b)
        steps = statistics.fmean(r["steps"] for r in results[(c, procs)])
        rows.append((f"{c} eval loss within the seed-to-seed spread of b's (|mean diff| <= 2 sd of b)", abs(gap) <= 2 * sd_b,
                     f"{c} - b {gap:+.4f}, sd(b) {sd_b:.4f}; same examples once each, in {steps:.0f} steps vs b's "
                     f"{results[('b', procs)][0]['steps']}"))
    rows.append(("b losses equal a's, same batches (max |diff| < 1e-4)", loss_diff < 1e-4, f"{loss_diff:.1e}"))
    for v in ("b", "b'", "c", "c'"):
        if (v, procs) in results:
            share = other_share(results, v, procs)
            rows.append((f"{v} bookkeeping < 3% of step time", share < 0.03, f"{share:.1%}"))
    return [f"target {name}: {'met' if ok else 'MISSED'} ({detail})" for name, ok, detail in rows]


def table(results: dict, spec: dict) -> str:
    lines = [
        f"distlora vs Trainer+PEFT: {spec['layers']}-layer {spec['hidden']}-wide Llama, one epoch of "
        f"{spec['steps']} global batches of GSM8K rows (micro batch {spec['micro']} per process), {spec['n_eval']} "
        f"eval rows, max_seq_len {spec['max_seq_len']}, every step timed, {spec['repeats']} repeats",
        "",
        "| variant | procs | steps | input tok/s | examples/s | timed s | run wall s | peak RSS MB | final eval loss | padding | tok/s vs a [95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for procs in spec["procs"]:
        for v in (v for v in VARIANTS if (v, procs) in results):
            rs = results[(v, procs)]
            tps = _tps(results, v, procs)
            eps = [r["examples"] / r["time_s"] for r in rs]
            pad = statistics.fmean(1 - r["tokens"] / r["padded"] for r in rs) if v in ("a", "a'", "b", "b'") else None
            ratio, lo, hi = _ratio(results, v, "a", procs)
            sd = statistics.stdev(tps) if len(tps) > 1 else 0.0
            lines.append(
                f"| {v} {NAMES[v]} | {procs} | {rs[0]['steps']} | {statistics.fmean(tps):.0f} ± {sd:.0f} | "
                f"{statistics.fmean(eps):.1f} | {statistics.fmean(r['time_s'] for r in rs):.2f} | "
                f"{statistics.fmean(r['wall_s'] for r in rs):.1f} | {max(r['rss_mb'] for r in rs):.0f} | "
                f"{_mean_sd([r['eval_loss'] for r in rs], 5)} | {'' if pad is None else f'{pad:.1%}'} | "
                f"{ratio:.2f}x [{lo:.2f}, {hi:.2f}] |"
            )
    lines += ["", "Where a step's time goes (ms per step, mean over repeats; other = everything but data, forward, "
              "backward, optimizer):", "",
              "| variant | procs | data | forward | backward | optimizer | other | other share |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for procs in spec["procs"]:
        for v in (v for v in VARIANTS if (v, procs) in results):
            rs = results[(v, procs)]
            ms = {k: statistics.fmean(1e3 * r["split"][k] / r["steps"] for r in rs)
                  for k in (*StepSplit.PARTS, "other")}
            lines.append(f"| {v} {NAMES[v]} | {procs} | " + " | ".join(f"{ms[k]:.1f}" for k in (*StepSplit.PARTS, "other"))
                         + f" | {other_share(results, v, procs):.1%} |")
    for procs in spec["procs"]:
        n_rounds = min(len(results[("a", procs)]), len(results[("b", procs)]))
        diffs = []
        for i in range(n_rounds):  # round i: a and b with the same seed, so the same batches and init
            la, lb = results[("a", procs)][i]["losses"], results[("b", procs)][i]["losses"]
            diffs += [abs(x - y) for x, y in zip(la, lb)]
        lines.append("")
        lines.append(f"{procs} process(es): per-step training loss, a vs b (same seed, batches and init per round): "
                     f"max |diff| {max(diffs) if diffs else float('nan'):.2e} over {len(diffs)} steps")
        lines += [f"  {t}" for t in targets(results, procs, max(diffs) if diffs else float("nan"))]
    return "\n".join(lines)


def profile(spec: dict) -> int:
    """Self CPU time per op over training (warm-up steps included, no eval) for a, b and c, one process."""
    os.environ["DISTLORA_BENCH_PROFILE"] = "1"
    profs, runs = {}, {}
    with tempfile.TemporaryDirectory(prefix="distlora-prof-") as tmp:
        work = Path(tmp)
        prepare(work, spec)
        for v in ("a", "b", "c"):
            runs[v] = launch_run(work, spec, v, 1, 0)
            profs[v] = json.loads((work / "runs" / f"{v}-1-0" / "profile.json").read_text())
    top = sorted({k for pr in profs.values() for k in sorted(pr, key=pr.get, reverse=True)[:14]},
                 key=lambda k: -profs["a"].get(k, 0))
    print(f"self CPU ms per op over all {spec['steps']} training steps (profiler on: slower than the timed runs); "
          f"timed tok/s: " + ", ".join(f"{v} {r['tokens'] / r['time_s']:.0f}" for v, r in runs.items()))
    print(f"| op | {' | '.join(NAMES[v] for v in profs)} |")
    print("| --- | --- | --- | --- |")
    for k in top:
        print(f"| {k} | " + " | ".join(f"{profs[v].get(k, 0):.0f}" for v in profs) + " |")
    total = {v: sum(x for k, x in pr.items() if not k.startswith("(")) for v, pr in profs.items()}
    print("| all ops | " + " | ".join(f"{total[v]:.0f}" for v in profs) + " |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 process, 2 repeats")
    p.add_argument("--repeats", type=int, help="runs per variant and process count")
    p.add_argument("--procs", type=int, nargs="+", help="process counts, e.g. 1 2")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                   help="override sizes, e.g. --set layers=4 hidden=256 steps=12 (keys: " + ", ".join(QUICK) + ")")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the table")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS,
                   help="a subset to run (a and b always run: the baseline and the loss check)")
    p.add_argument("--profile", action="store_true",
                   help="one 1-process run of a, b, c under torch.profiler: where the time goes, op by op")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        import torch

        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        torch.set_num_threads(threads)
        cores = sorted(os.sched_getaffinity(0))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and len(cores) >= int(os.environ["WORLD_SIZE"]) * threads:
            rank = int(os.environ.get("LOCAL_RANK", "0"))  # pin: rank r on its own core(s)
            os.sched_setaffinity(0, cores[rank * threads:(rank + 1) * threads])
        cfg = json.loads(Path(a.cfg).read_text())
        if a.worker.startswith("a"):
            worker_trainer(cfg, a.worker, Path(a.result))
        else:
            worker_distlora(cfg, Path(a.result))
        return 0
    if not (GSM8K / "train.jsonl").is_file():
        print(f"GSM8K not found at {GSM8K}: the benchmark needs ../shared/data/gsm8k", file=sys.stderr)
        return 3
    spec = dict(QUICK if a.quick else FULL)
    if a.repeats:
        spec["repeats"] = a.repeats
    if a.procs:
        spec["procs"] = a.procs
    for item in a.set:
        key, value = item.split("=", 1)
        if key not in spec or key == "procs":
            raise SystemExit(f"--set: unknown size '{key}'; use one of {', '.join(k for k in spec if k != 'procs')}")
        spec[key] = int(value)
    if a.profile:
        return profile(spec)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="distlora-bench-") as tmp:
        work = Path(tmp)
        prepare(work, spec)
        for rep in range(spec["repeats"]):  # alternate: one run of every variant per round
            for procs in spec["procs"]:
                for v in (v for v in VARIANTS if v in {"a", "b", *a.variants}):
                    r = launch_run(work, spec, v, procs, rep)
                    results.setdefault((v, procs), []).append(r)
                    print(f"round {rep + 1}/{spec['repeats']} {v:4} x{procs}: {r['tokens'] / r['time_s']:.0f} tok/s, "
                          f"eval {r['eval_loss']:.5f}", flush=True)
    text = table(results, spec)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"vs_trainer-{'quick' if a.quick else 'full'}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    (out / name).write_text(text + "\n")
    print(f"written to {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
