"""metrics.jsonl (always), trackers through accelerate (wandb/tensorboard), progress and memory."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class MetricsLog:
    """Main process only: appends rows to metrics.jsonl and forwards them to the trackers."""

    def __init__(self, acc, cfg, run_config: dict):
        self.acc = acc
        self.active = acc.is_main_process
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        self.trackers = bool(cfg.log.report_to)
        if self.trackers:
            if "wandb" in cfg.log.report_to and not _wandb_has_credentials() and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"
                if self.active:
                    print("distlora: no wandb credentials found: logging offline to output_dir/wandb", flush=True)
            os.environ.setdefault("WANDB_DIR", str(cfg.train.output_dir))
            name = cfg.log.run_name or Path(cfg.train.output_dir).name
            acc.init_trackers(cfg.log.project, config=run_config, init_kwargs={"wandb": {"name": name}})
        self.fh = open(self.path, "a") if self.active else None

    def log(self, row: dict) -> None:
        if not self.active:
            return
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        if self.trackers:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.fh:
            self.fh.close()
            self.fh = None


def _fmt(x: float | None, spec: str) -> str:
    return "nan" if x is None else format(x, spec)


class Progress:
    """tqdm on a TTY, one plain line per log step otherwise (SLURM logs); main process only."""

    def __init__(self, active: bool, total: int, initial: int):
        self.active = active
        self.bar = None
        if active and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
        self.total = total
        self.t0 = time.time()
        self.start = initial

    def update(self, step: int, row: dict | None) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
            if row:
                self.bar.set_postfix(loss=_fmt(row["loss"], ".4f"), tok_s=f"{row['tokens_per_s']:.0f}")
        elif row:
            done = step - self.start
            eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
            print(
                f"step {step}/{self.total} loss {_fmt(row['loss'], '.4f')} lr {row['lr']:.3e} "
                f"grad_norm {_fmt(row['grad_norm'], '.3f')} "
                f"tok/s {row['tokens_per_s']:.0f} eta {eta:.0f}s",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
