"""`distlora plot <output_dir>`: PNG charts from metrics.jsonl, for people without a dashboard."""

from __future__ import annotations

import json
from pathlib import Path

from distlora.evaltask import TASK_PREFIX, task_means

CHARTS = {
    "loss.png": ("loss", [("loss", "train loss"), ("eval_loss", "eval loss")]),
    "lr.png": ("learning rate", [("lr", "lr")]),
    "tokens_per_s.png": ("input tokens/s (all ranks)", [("tokens_per_s", "tokens/s")]),
    "memory.png": ("peak memory (MiB, main process)", [("peak_mem_mb", "peak memory")]),
}


def read_rows(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {output_dir} a distlora output_dir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(output_dir, out_dir=None) -> dict[str, dict[str, tuple[list, list]]]:
    """Write the charts; return, per file, the (steps, values) of each line as drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(output_dir)
    out_dir = Path(out_dir or Path(output_dir) / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, dict[str, tuple[list, list]]] = {}
    charts = dict(CHARTS)
    task = sorted({name for r in rows for name in task_means(r)})
    if task:  # the eval's task metrics (eval.exact_match, eval.metric_fn): a mean per eval
        charts["task_metrics.png"] = ("task metric (mean over eval examples)", [(TASK_PREFIX + k, k) for k in task])
    for fname, (ylabel, series) in charts.items():
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key, label in series:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts],
                        marker="o" if key.startswith(("eval", TASK_PREFIX)) else None,
                        markersize=3, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(ax.lines) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname)
        drawn[fname] = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines}
        plt.close(fig)
    return drawn
