"""Data at scale (issue 14), first part: preprocessing into the token store vs `datasets.map(batched=True)`,
per-process anonymous memory of the data path, and the packing plan. Prints one table of ratios.

    python benchmarks/data_scale.py --quick      # 100k synthetic examples (2 weighted sources)
    python benchmarks/data_scale.py --workdir /work/scale10m --examples 10000000 --no-baseline --json t.json

`--workdir DIR` keeps the data, tiny model and cache in DIR and reuses what is already there (data at 10M
takes hours to make and tokenize): DIR/c.yaml and its sources, DIR/tiny, a cache hit under DIR/cache (its
preprocessing numbers then come from DIR/preprocess.json, written when they were measured), the same for
the tenth-size baseline under DIR/small. `--no-baseline` skips the datasets.map baseline (automatic
above BASELINE_MAX examples: it needs ~2.2 GB at 1M, ~20 GB at 10M); the old list packer, kept here as
the packing reference, runs up to OLD_PACK_MAX examples (72 s and 1.2 GB at 10M).

`--index-only` measures what a rank holds and the launch without tokenizing anything: each size's
store is its real index (offsets, lengths, packing plan: ~300 tokens an example, drawn like the
synthetic data's) over token files that are sparse (all zeros, no disk, no tokenization), registered
in the cache under the key of a one-line placeholder data set. The rank, packing and launch rows at
10M then take minutes, not the hours of making and tokenizing ~3B tokens; preprocessing is not measured.

Each measurement runs in its own process (peak RSS = ru_maxrss of that process and its workers).
"Rank at step 1" is the data side of a rank only (records or store opened, loader built, first batch
collated; no model): RssAnon and Pss from /proc, two processes at once.
"Launch" rows are real 2-process `accelerate launch` runs of the tiny model on a warm cache, at the
full size and at a tenth of it (the baseline: what must not grow with the data): seconds from the
command to step 1 in metrics.jsonl, and each worker's RssAnon read from /proc at step 1 and at the
last step (--steps, default 100).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))  # this checkout's distlora, as the measured subprocesses get (PYTHONPATH)


def run(code: str, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([PY, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


LIST_MAX = 200_000
BASELINE_MAX = 2_000_000
OLD_PACK_MAX = 2_000_000


def make_data(d: Path, n: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["the", "sum", "of", "apples", "is", "then", "she", "buys", "more", "each", "day", "total", "so"]
    sources = []
    for name, share, weight in (("math", 0.7, 1.0), ("chat", 0.3, 0.5)):
        k = int(n * share / weight) if weight < 1 else int(n * share)
        f = d / f"{name}.jsonl"
        with open(f, "w") as fh:
            for a, b in zip(rng.lognormal(3.0, 0.7, k).astype(int) + 2, rng.lognormal(3.5, 0.8, k).astype(int) + 2):
                fh.write(json.dumps({"prompt": " ".join(rng.choice(words, a)), "completion": " ".join(rng.choice(words, b))}) + "\n")
        sources.append({"path": str(f), "weight": weight})
    return sources


OURS = """
import json, resource, sys, time
from distlora import config as C, datacache
from distlora.model import load_tokenizer
cfg = C.load(sys.argv[1], check_model=False)
tok = load_tokenizer(cfg)
if len(sys.argv) > 2:  # reuse a cache hit: nothing measured
    hit = datacache.read(cfg, tok, log=lambda *_: None)
    if hit is not None:
        print(json.dumps({"store": str(hit[0].path.parent), "tokens": hit[0].n_tokens, "reused": True}))
        sys.exit(0)
t = time.perf_counter()
d = datacache.build(cfg, tok, log=lambda *_: None)
wall = time.perf_counter() - t
from distlora.store import TokenStore
tokens = TokenStore(d / "train").n_tokens
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"wall": wall, "tokens": tokens, "peak_mb": peak / 1024, "store": str(d)}))
"""

REGISTER = """
import json, sys
from pathlib import Path
from distlora import config as C, datacache
from distlora.model import load_tokenizer
cfg = C.load(sys.argv[1], check_model=False)
key = datacache.cache_key(cfg, load_tokenizer(cfg))
d = datacache.cache_root(cfg) / key
if not (d / "meta.json").is_file():  # the index store, as the cache entry of the placeholder data's key
    d.mkdir(parents=True, exist_ok=True)
    (d / "train").symlink_to(Path(sys.argv[2]).resolve())
    stats = {"examples": int(sys.argv[3])}
    (d / "meta.json").write_text(json.dumps({"key": key, "parts": {}, "stats": stats, "has_eval": False, "layout": "store-1"}))
print(json.dumps({"store": str(d)}))
"""

BASELINE = """
import json, os, resource, sys, time
import datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
files, procs, cache = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t = time.perf_counter()
ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache)
def enc(b):
    p = tok(b["prompt"], add_special_tokens=False)["input_ids"]
    c = tok(b["completion"], add_special_tokens=False)["input_ids"]
    ids = [[tok.bos_token_id] + x + y + [tok.eos_token_id] for x, y in zip(p, c)]
    return {"input_ids": ids, "labels": [[-100] * (len(x) + 1) + y + [tok.eos_token_id] for x, y in zip(p, c)]}
ds = ds.map(enc, batched=True, num_proc=procs, remove_columns=ds.column_names)
tokens = sum(len(x) for x in ds.with_format("numpy")["input_ids"])
wall = time.perf_counter() - t
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"wall": wall, "tokens": int(tokens), "peak_mb": peak / 1024}))
"""

RANK = """
import json, os, sys, time
from pathlib import Path
def mem():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k == "RssAnon":
            out[k] = int(v.split()[0]) / 1024
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1]) / 1024
    return out
import torch, numpy as np
from distlora import config as C, data as D
from distlora.store import TokenStore
D.release_freed_memory()  # the sampler trims the heap: the baseline must start trimmed too, or reads low
base = mem()
if sys.argv[1] == "store":
    recs = TokenStore(Path(sys.argv[2]) / "train")
else:  # the list path: every rank holds the records as Python lists (as each rank did without a cache)
    s = TokenStore(Path(sys.argv[2]) / "train")
    recs = [dict(r) for r in s]
loader, sampler = D.make_loader(recs, 0, 4, 1, 2, 0, True, pack=512, rank=int(sys.argv[4]))  # as rank r of 2
it = iter(loader)  # held, as a training rank holds it: the epoch's share lives in the iterator
next(it)
Path(sys.argv[3] + f".{os.getpid()}").write_text("x")
while len(list(Path(sys.argv[3]).parent.glob(Path(sys.argv[3]).name + ".*"))) < 2:
    time.sleep(0.05)
m = mem()
time.sleep(1.0)
print(json.dumps({k: m[k] - base[k] for k in m}))
"""

PACK = """
import bisect, json, sys, time
import numpy as np
from distlora import data as D
from distlora.store import TokenStore
store = TokenStore(sys.argv[1] + "/train")
L = store.lengths
order = np.random.default_rng(0).permutation(len(L))
t = time.perf_counter(); plan = D.PackPlan(L, 512); flat, off = plan.rows_for(order); new = time.perf_counter() - t
D.PackPlan.for_store(store, 512)  # saved next to the store, as a launch's main process saves it for the ranks
Ll, ol = L.tolist(), order.tolist()
def ref(order, lengths, capacity):
    rows, free = [], []
    for i in sorted(order, key=lambda j: -lengths[j]):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k); rows[r].append(i)
        else:
            r, room = len(rows), capacity; rows.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows
if len(L) > int(sys.argv[2]):
    print(json.dumps({"new": new, "old_twice": None, "same": None}))
    sys.exit(0)
t = time.perf_counter(); r = ref(ol, Ll, 512); old = time.perf_counter() - t
same = r == [flat[a:b].tolist() for a, b in zip(off[:-1], off[1:])]
print(json.dumps({"new": new, "old_twice": 2 * old, "same": same}))
"""


def _worker_pids(pid: int) -> list[int]:
    """The launcher's descendants that run distlora.train (accelerate -> torch elastic agent -> workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            try:
                cmd = Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"distlora.train" in cmd and b"accelerate.commands.launch" not in cmd:
                out.append(k)
            todo.append(k)
    return sorted(set(out))


def _anon_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def launch_run(tmp: Path, cfg: dict, name: str, steps: int) -> dict:
    """A real 2-process launch on the warm cache: seconds to step 1, workers' RssAnon at step 1 and at
    the last step (polled from /proc while the run holds there: a hook-free reading from outside)."""
    import time

    import yaml

    import shutil

    out = tmp / f"launch-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a finished earlier run there would make the launch a no-op
    run_cfg = {**cfg, "train": {**cfg["train"], "output_dir": str(out), "max_steps": steps, "log_every": 1,
                                "save_every": 0, "eval_every": 0, "micro_batch_size": 4}}
    path = tmp / f"launch-{name}.yaml"
    path.write_text(yaml.safe_dump(run_cfg))
    cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml"),
           "--num_processes", "2", "-m", "distlora.train", "--config", str(path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    metrics, first, at_first, at_last = out / "metrics.jsonl", None, [], []
    while proc.poll() is None:
        done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        pids = _worker_pids(proc.pid)
        if done >= 1 and first is None:
            first = time.perf_counter() - t0
            at_first = [_anon_mb(p) for p in pids]
        if done >= steps - 1 and pids:
            at_last = [_anon_mb(p) for p in pids]  # the last reading before the workers exit
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(proc.stderr.read()[-3000:])
    return {"to_step1": first, "anon_step1": max(at_first), "anon_last": max(at_last or at_first)}


def prepare(d: Path, n: int, tiny: Path) -> Path:
    """DIR/c.yaml over n synthetic examples in DIR, made unless already there; DIR/data.json records n."""
    import yaml

    cfg_path, record = d / "c.yaml", d / "data.json"
    if cfg_path.is_file():
        held = json.loads(record.read_text())["examples"] if record.is_file() else None
        if held not in (None, n):
            raise SystemExit(f"{d} holds {held:,} examples, not {n:,}: pass --examples {held} or another --workdir")
        return cfg_path
    d.mkdir(parents=True, exist_ok=True)
    sources = make_data(d, n)
    cfg = {"model": {"name_or_path": str(tiny / "model")},
           "data": {"train": sources, "eval": None, "max_seq_len": 512, "cache_dir": str(d / "cache")},
           "train": {"output_dir": str(d / "out")}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    record.write_text(json.dumps({"examples": n}))
    return cfg_path


def preprocessed(d: Path, cfg_path: Path, reuse: bool) -> dict:
    """The preprocessing run's numbers (and its store); with `reuse`, a cache hit is taken as is and its
    numbers are those DIR/preprocess.json kept from when they were measured (None: not measured)."""
    got = run(OURS, cfg_path, *(["reuse"] if reuse else []))
    kept = d / "preprocess.json"
    if got.get("reused"):
        before = json.loads(kept.read_text()) if kept.is_file() else {}
        return {**before, **got} if before.get("store") == got["store"] else {**got, "wall": None, "peak_mb": None}
    kept.write_text(json.dumps(got))
    return got


def index_store(path: Path, n: int) -> None:
    """A store of n examples whose index is real and whose tokens are sparse zeros (see the module doc)."""
    import numpy as np

    from distlora.store import IDS, LABELS, OFFSETS, lengths_from_offsets

    if (path / OFFSETS).is_file():
        return
    rng = np.random.default_rng(0)
    words = rng.lognormal(3.0, 0.7, n).astype(np.int64) + rng.lognormal(3.5, 0.8, n).astype(np.int64) + 4
    lengths = np.minimum(4 * words + 2, 512)  # ~4 tokens a word: ~300 tokens an example, as make_data's
    del words
    path.mkdir(parents=True, exist_ok=True)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    for name in (IDS, LABELS):
        with open(path / name, "wb") as fh:
            fh.truncate(int(offsets[-1]) * 4)  # a hole: reads as zeros, takes no disk
    np.save(path / "lengths.npy", lengths_from_offsets(offsets))
    np.save(path / OFFSETS, offsets)


def index_only(tmp: Path, n: int, args) -> int:
    """The rank, packing and launch rows over index stores of n and n // 10 examples."""
    import yaml

    from distlora.tiny import build_assets

    tiny = tmp / "tiny"
    if not (tiny / "model" / "config.json").is_file():
        build_assets(tiny)
    cfgs, stores = {}, {}
    for name, k in (("full", n), ("small", n // 10)):
        d = tmp / f"index-{k}"
        index_store(d / "store", k)
        (d / "placeholder.jsonl").write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
        cfgs[name] = {"model": {"name_or_path": str(tiny / "model")},
                      "data": {"train": str(d / "placeholder.jsonl"), "eval": None, "max_seq_len": 512,
                               "cache_dir": str(d / "cache")},
                      "train": {"output_dir": str(d / "out")}}
        (d / "c.yaml").write_text(yaml.safe_dump(cfgs[name]))
        stores[name] = run(REGISTER, d / "c.yaml", d / "store", k)["store"]
    pack = run(PACK, stores["full"], OLD_PACK_MAX)
    anon = {}
    for name in ("small", "full"):
        for old in tmp.glob(f"sync-{name}.*"):
            old.unlink()
        ps = [subprocess.Popen([PY, "-c", textwrap.dedent(RANK), "store", stores[name], tmp / f"sync-{name}", rank],
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
              for rank in ("0", "1")]
        anon[name] = max(json.loads(p.communicate()[0].strip().splitlines()[-1])["RssAnon"] for p in ps)
    launched = {k: launch_run(tmp, c, k, args.steps) for k, c in cfgs.items()}
    lo, hi = launched["small"], launched["full"]
    small_n = f"{n // 10:,} examples"
    rows = [
        ("rank RssAnon at step 1 MB (data)", f"{anon['full']:.1f}", f"{anon['small']:.1f} ({small_n})", anon["full"] / anon["small"]),
        ("packing plan s", f"{pack['new']:.2f}", "-" if pack["old_twice"] is None else f"{pack['old_twice']:.2f} (old packer, run twice)",
         None if pack["old_twice"] is None else pack["new"] / pack["old_twice"]),
        ("launch to step 1 s (warm cache)", f"{hi['to_step1']:.1f}", f"{lo['to_step1']:.1f} ({small_n})", hi["to_step1"] / lo["to_step1"]),
        ("launch: rank RssAnon step 1 MB", f"{hi['anon_step1']:.0f}", f"{lo['anon_step1']:.0f} ({small_n})", hi["anon_step1"] / lo["anon_step1"]),
        (f"launch: rank RssAnon step {args.steps} MB", f"{hi['anon_last']:.0f}", f"{lo['anon_last']:.0f} ({small_n})", hi["anon_last"] / lo["anon_last"]),
    ]
    table(f"data_scale --index-only: {n:,} examples (sparse tokens); plans identical: {pack['same']}", rows)
    if args.json:
        args.json.write_text(json.dumps({"examples": n, "index_only": True, "plans_identical": pack["same"], "launch": launched,
                                         "rows": [{"name": r[0], "ours": r[1], "baseline": r[2], "ratio": r[3]} for r in rows]}))
    return 0 if pack["same"] in (True, None) else 1


def table(title: str, rows) -> None:
    print(title)
    print(f"| {'measure':34} | {'token store':>12} | {'baseline':44} | {'ratio':>6} |")
    print(f"|{'-' * 36}|{'-' * 14}|{'-' * 46}|{'-' * 8}|")
    for name, a, b, r in rows:
        print(f"| {name:34} | {a:>12} | {b:44} | {'-' if r is None else f'{r:.2f}':>6} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="100k examples")
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--steps", type=int, default=100, help="steps of each real launch (RssAnon at the last one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the table's rows here (name, ours, baseline, ratio)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep data, tiny model and cache here, reusing what is there (default: a temporary directory)")
    ap.add_argument("--index-only", action="store_true",
                    help="sparse-token stores with real indexes: rank, packing and launch rows only (see the module doc)")
    ap.add_argument("--no-baseline", action="store_true",
                    help=f"skip the datasets.map baseline (skipped anyway above {BASELINE_MAX:,} examples)")
    args = ap.parse_args(argv)
    n = args.examples or 100_000
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.index_only:
            return index_only(tmp.resolve(), n, args)
        return measure(tmp.resolve(), n, args, reuse=args.workdir is not None)


def measure(tmp: Path, n: int, args, reuse: bool) -> int:
    from distlora.data import tokenizer_procs
    from distlora.tiny import build_assets

    procs = tokenizer_procs()
    tiny = tmp / "tiny"
    if not (reuse and (tiny / "model" / "config.json").is_file()):
        build_assets(tiny)
    cfg_path = prepare(tmp, n, tiny)
    ours = preprocessed(tmp, cfg_path, reuse)
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    base = None
    if not args.no_baseline and n <= BASELINE_MAX:
        files = [s["path"] for s in cfg["data"]["train"]]
        base = run(BASELINE, tiny / "model", json.dumps(files), procs, tmp / "hf")
    pack = run(PACK, ours["store"], OLD_PACK_MAX)
    ranks = {}
    # records as lists cost ~8.5 KB an example per rank (850 MB at 100k): past LIST_MAX two ranks would
    # not fit in this machine's memory, so that baseline is measured only up to there
    for kind in ("list", "store") if n <= LIST_MAX else ("store",):
        for old in tmp.glob(f"sync-{kind}.*"):
            old.unlink()
        ps = [subprocess.Popen([PY, "-c", textwrap.dedent(RANK), kind, ours["store"], tmp / f"sync-{kind}", rank],
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
              for rank in ("0", "1")]
        ranks[kind] = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
    # the warm cache at a tenth of the size: what a rank holds must not grow with the data
    small_path = prepare(tmp / "small", n // 10, tiny)
    preprocessed(tmp / "small", small_path, reuse)
    small = yaml.safe_load(small_path.read_text())
    launched = {k: launch_run(tmp, c, k, args.steps) for k, c in (("small", small), ("full", cfg))}
    rows = []
    if ours.get("wall") is not None and base is not None:
        tps_o, tps_b = ours["tokens"] / ours["wall"], base["tokens"] / base["wall"]
        rows += [
            ("preprocess tokens/s", f"{tps_o:,.0f}", f"{tps_b:,.0f} (datasets.map, num_proc={procs})", tps_o / tps_b),
            ("preprocess peak RSS MB", f"{ours['peak_mb']:.0f}", f"{base['peak_mb']:.0f}", ours["peak_mb"] / base["peak_mb"]),
        ]
    elif ours.get("wall") is not None:
        rows += [("preprocess tokens/s", f"{ours['tokens'] / ours['wall']:,.0f}", "baseline not run", None),
                 ("preprocess peak RSS MB", f"{ours['peak_mb']:.0f}", "baseline not run", None)]
    else:
        rows += [("preprocess", "cache reused", "not measured this run", None)]
    anon = {k: max(r["RssAnon"] for r in v) for k, v in ranks.items()}
    pss = {k: max(r["Pss"] for r in v) for k, v in ranks.items()}
    if "list" in anon:
        rows += [
            ("rank RssAnon at step 1 MB (data)", f"{anon['store']:.1f}", f"{anon['list']:.1f} (records as lists)", anon["store"] / anon["list"]),
            ("rank Pss at step 1 MB (data)", f"{pss['store']:.1f}", f"{pss['list']:.1f} (records as lists)", pss["store"] / pss["list"]),
        ]
    else:
        rows += [("rank RssAnon at step 1 MB (data)", f"{anon['store']:.1f}", "lists not run", None),
                 ("rank Pss at step 1 MB (data)", f"{pss['store']:.1f}", "lists not run", None)]
    if pack["old_twice"] is not None:
        rows += [("packing plan s", f"{pack['new']:.2f}", f"{pack['old_twice']:.2f} (old packer, run twice)", pack["new"] / pack["old_twice"])]
    else:
        rows += [("packing plan s", f"{pack['new']:.2f}", f"old packer not run above {OLD_PACK_MAX:,}", None)]
    lo, hi = launched["small"], launched["full"]
    small_n = f"{n // 10:,} examples"
    rows += [
        ("launch to step 1 s (warm cache)", f"{hi['to_step1']:.1f}", f"{lo['to_step1']:.1f} ({small_n})", hi["to_step1"] / lo["to_step1"]),
        ("launch: rank RssAnon step 1 MB", f"{hi['anon_step1']:.0f}", f"{lo['anon_step1']:.0f} ({small_n})", hi["anon_step1"] / lo["anon_step1"]),
        (f"launch: rank RssAnon step {args.steps} MB", f"{hi['anon_last']:.0f}", f"{lo['anon_last']:.0f} ({small_n})", hi["anon_last"] / lo["anon_last"]),
    ]
    table(f"data_scale: {n:,} examples, {ours['tokens']:,} tokens, {procs} processes; plans identical: {pack['same']}", rows)
    if args.json:
        args.json.write_text(json.dumps({"examples": n, "plans_identical": pack["same"], "launch": launched,
                                         "rows": [{"name": r[0], "ours": r[1], "baseline": r[2], "ratio": r[3]} for r in rows]}))
    return 0 if pack["same"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
