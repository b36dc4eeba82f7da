"""The benchmark (benchmarks/vs_trainer.py) runs end to end with --quick so it never rots. Not a
timed test: it checks that every variant ran and the table was written, not any speed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_vs_trainer_quick_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("vs_trainer", ROOT / "benchmarks" / "vs_trainer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not (bench.GSM8K / "train.jsonl").is_file():
        pytest.skip(f"GSM8K not found at {bench.GSM8K} (shared data absent on this machine)")
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vs_trainer.py"), "--quick", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    [written] = list(tmp_path.glob("vs_trainer-quick-*.md"))
    text = written.read_text()
    for v in bench.VARIANTS:
        assert f"| {v} {bench.NAMES[v]} | 1 |" in text, v
    assert "per-step training loss, a vs b" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "x [" in line]
    assert len(rows) == len(bench.VARIANTS)
    assert all("nan" not in line.split("|")[9] for line in rows), "every variant reports a final eval loss"
    # every step of every variant split into its parts, and the targets judged
    split = text.split("Where a step's time goes")[1]
    assert all(f"| {v} {bench.NAMES[v]} | 1 |" in split for v in bench.VARIANTS)
    assert "target b' >= 1.05x a'" in text and "target c >= 1.2x the best Trainer row" in text
    assert "target b bookkeeping < 3% of step time" in text


@pytest.mark.slow
def test_data_scale_quick_end_to_end(tmp_path):
    """benchmarks/data_scale.py --quick (100k examples; real 2-process launches at 100k and 10k on a
    warm cache): the packing plan equals the old packer's, and a rank's anonymous memory at step 1
    and at the last step grows by less than 100 MB from 10k to 100k examples (the issue's bound for
    100k to 10M; measured here +10 MB from 2k to 20k: the data is mapped, not held). Speeds are
    reported, not asserted."""
    import json

    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_scale.py"), "--quick", "--steps", "20",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["examples"] == 100_000 and r["plans_identical"]
    lo, hi = r["launch"]["small"], r["launch"]["full"]
    assert hi["anon_step1"] - lo["anon_step1"] < 100, r["launch"]
    assert hi["anon_last"] - lo["anon_last"] < 100, r["launch"]
