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


def _git_commit() -> str | None:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_info(acc, counts: dict) -> dict:
    """What a dashboard needs to tell runs apart: sizes, world, versions, commit (the loop adds the
    backend and the precision it runs, which the backend owns)."""
    import accelerate
    import peft
    import torch
    import transformers

    import distlora

    return {
        **counts,
        "world_size": acc.num_processes,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {
            "distlora": distlora.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__,
        },
        "git_commit": _git_commit(),
    }


RUN_ID_FILE = "tracker_run_id"
SAMPLES_FILE = "samples.jsonl"


def _flatten(d: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; values as scalars (tensorboard's hparams take no lists/None)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


class MetricsLog:
    """Main process only: appends rows to metrics.jsonl and forwards them to the trackers.

    One tracker run per job: its id is stored in output_dir and reused by every later leg (resume,
    SLURM requeue), so a job never shows up as several runs.
    """

    def __init__(self, acc, cfg, run_config: dict, start_step: int):
        self.acc = acc
        self.active = acc.is_main_process
        out = Path(cfg.train.output_dir)
        self.path = out / "metrics.jsonl"
        self.trackers = bool(cfg.log.report_to)
        if self.trackers:
            run_id = self._run_id(out)
            init_kwargs = {}
            if "wandb" in cfg.log.report_to:
                if not _wandb_has_credentials() and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
                    os.environ["WANDB_MODE"] = "offline"  # never a login prompt, never a network wait
                    if self.active:
                        print(f"distlora: no wandb credentials: logging offline to {out / 'wandb'} "
                              "(`wandb sync` it later)", flush=True)
                online = os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled")
                wb = {"name": cfg.log.run_name or out.name, "dir": str(out), "tags": list(cfg.log.tags)}
                if online and start_step > 0:
                    # rewind to the checkpoint: wandb drops steps below its current step otherwise
                    wb["resume_from"] = f"{run_id}?_step={start_step}"
                else:
                    wb.update(id=run_id, resume="allow")
                init_kwargs["wandb"] = wb
            project = os.environ.get("WANDB_PROJECT") or cfg.log.project
            self._start_trackers(project, _flatten(run_config), init_kwargs)
        self.samples_path = out / SAMPLES_FILE
        for path in (self.path, self.samples_path):
            if self.active and path.exists():
                # Drop rows a killed leg logged after the checkpoint this leg resumes from: they are
                # logged again, and metrics.jsonl stays one row per step, as the trackers show it.
                keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(ln + "\n" for ln in keep) if start_step > 0 else "")
                tmp.replace(path)
        self.fh = open(self.path, "a") if self.active else None

    def _start_trackers(self, project: str, config: dict, init_kwargs: dict) -> None:
        """Tracking never breaks or blocks training: a tracker that cannot start is reported and dropped.
        'run ID is in use' (the previous leg's wandb service still closing the run) is retried."""
        if not self.active:
            self.acc.init_trackers(project, config=config, init_kwargs=init_kwargs)  # no-op off the main process
            return
        for attempt in range(6):
            try:
                self.acc.init_trackers(project, config=config, init_kwargs=init_kwargs)
                return
            except Exception as exc:  # noqa: BLE001
                if "in use" in str(exc) and attempt < 5:
                    time.sleep(5)
                    continue
                print(f"distlora: warning: trackers {self.acc.log_with} did not start ({exc}); "
                      "training goes on with metrics.jsonl only", flush=True)
                self.acc.trackers = []
                self.trackers = False
                return

    def _run_id(self, out: Path) -> str:
        f = out / RUN_ID_FILE
        if self.active and not f.exists():
            import uuid

            f.write_text(uuid.uuid4().hex[:12] + "\n")
        self.acc.wait_for_everyone()
        return f.read_text().strip()

    def log(self, row: dict) -> None:
        if not self.active:
            return
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        if self.trackers:
            try:
                self.acc.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])
            except Exception as exc:  # noqa: BLE001 - a tracker hiccup must not end a training run
                print(f"distlora: warning: tracker log failed ({exc}); trackers disabled", flush=True)
                self.trackers = False

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Eval samples ({step, prompt, completion, reference}) appended to samples.jsonl, and to the
        trackers: a wandb table, tensorboard text (a markdown table)."""
        if not self.active or not rows:
            return
        with open(self.samples_path, "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
        if not self.trackers:
            return
        cols = ["prompt", "completion", "reference"]
        for tracker in self.acc.trackers:
            try:
                if tracker.name == "wandb":
                    import wandb

                    table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
                    tracker.log({"eval_samples": table}, step=step)
                elif tracker.name == "tensorboard":
                    md = "\n".join(["| " + " | ".join(cols) + " |", "|---|---|---|"]
                                   + ["| " + " | ".join(_md_cell(r[c]) for c in cols) + " |" for r in rows])
                    tracker.writer.add_text("eval_samples", md, global_step=step)
                    tracker.writer.flush()
            except Exception as exc:  # noqa: BLE001 - a tracker hiccup must not end a training run
                print(f"distlora: warning: logging samples to {tracker.name} failed ({exc})", flush=True)

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # a stop on request (preemption) is not a failure: the run goes on in the next leg
        self.close(failed=exc is not None and not getattr(exc, "resumable", False))

    def close(self, failed: bool = False) -> None:
        """Flush metrics.jsonl and finish the tracker runs (marked failed on an error exit)."""
        if self.fh:
            self.fh.close()
            self.fh = None
        if self.trackers and self.active:
            for tracker in self.acc.trackers:
                try:
                    if tracker.name == "wandb":
                        tracker.tracker.finish(exit_code=1 if failed else 0)
                    else:
                        tracker.finish()
                except Exception as exc:  # noqa: BLE001
                    print(f"distlora: warning: closing tracker {tracker.name} failed: {exc}", flush=True)
            self.acc.trackers = []
            self.trackers = False


def _md_cell(x) -> str:
    return "" if x is None else str(x).replace("|", "\\|").replace("\n", "<br>")


def summary_table(s: dict) -> str:
    rows = [
        ("steps", f"{s['steps']}"),
        ("tokens (input, all ranks)", f"{s['total_input_tokens']:,}"),
        ("wall time", f"{s['train_wall_s']:.1f} s"),
        ("tokens/s", f"{s['mean_tokens_per_s']:,.0f}"),
        ("model TFLOP/s per device", f"{s['mean_tflops_per_device']:.3f}"),
        ("MFU", "n/a (unknown device peak; set train.peak_tflops)" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"),
        ("peak memory (max rank)", f"{s['peak_mem_mb']:,.0f} MiB"),
        ("final train loss", _fmt(s["final_train_loss"], ".4f")),
        ("final eval loss", _fmt(s["final_eval_loss"], ".4f")),
        ("adapter", s["adapter"]),
    ]
    rows += [(k, f"{v:.4g}") for k, v in s.get("final_task_metrics", {}).items()]
    width = max(len(k) for k, _ in rows)
    lines = ["distlora: run summary"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    shown = s.get("samples", [])[:SUMMARY_SAMPLES]
    if shown:
        lines.append(f"  last eval's samples ({len(shown)} of {len(s['samples'])}; all in {SAMPLES_FILE}):")
        for r in shown:
            lines.append(f"    prompt:     {_oneline(r['prompt'])}")
            lines.append(f"    completion: {_oneline(r['completion'])}")
            if r.get("reference") is not None:
                lines.append(f"    reference:  {_oneline(r['reference'])}")
    return "\n".join(lines)


SUMMARY_SAMPLES = 3  # samples printed in the end-of-run summary


def _oneline(text: str, width: int = 100) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


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
