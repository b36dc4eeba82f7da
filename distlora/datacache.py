"""Tokenize once: `distlora preprocess --config run.yaml` writes the tokenized train/eval records to
`<data.cache_dir or output_dir/data_cache>/<key>/`, and the trainer loads them when the key matches.

The key is a sha256 over everything that decides the token ids and labels:
- the data files' contents (every file each train source and the eval path expand to; a hub
  dataset id is keyed by its name and split only: its contents cannot be hashed offline). A file's
  sha256 is remembered in `<cache root>/file-hashes.json` under its (device, inode, size, mtime_ns,
  ctime_ns), so a launch stats the data instead of reading it all again (GBs at 10M examples, in
  every rank): a write to the file changes its mtime and ctime, and ctime cannot be set back (utime
  sets it to now), so an unchanged stat means unchanged bytes. A file changed within the clock tick
  of its last write before hashing could keep its stat: files written less than MEMO_SETTLE_S before
  they were hashed are not remembered, only hashed again next time (git's "racy" rule). The memo is
  written only once the key names good data (a cache hit, or a build committed): a launch refused for
  its data changes nothing in the output dir.
- the tokenizer (its full serialized state for fast tokenizers, else its vocabulary), its special
  tokens and pad token, and the chat template,
- the format settings (sources with format, fields, split, truncation side and weight; eval;
  format, fields, max_seq_len, too_long, truncation_side, train_on_prompt;
  tokenizer.add_special_tokens; train.seed, which picks the weighted samples and the held-out eval
  fraction),
- the versions of transformers, tokenizers and datasets,
- the data code's version: the sha256 of the source of distlora/data.py and of this module.
Anything else (learning rate, batch sizes, packing, token budget...) does not change the records: same key.

Each split is a token store (distlora.store: flat int32 token and label files and an int64 offsets
index) under `<key>/train/` and `<key>/eval/`, written chunk by chunk while the data is tokenized in
parallel, into a temporary directory renamed into place, so a reader never sees half a cache. A hit maps
the store read-only: every rank on a node shares the same page-cache pages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from distlora import data as data_mod
from distlora import store as store_mod

CODE_FILES = [data_mod.__file__, __file__, store_mod.__file__]
MEMO = "file-hashes.json"
MEMO_SETTLE_S = 2.0  # a file last written this recently before its hash began is not remembered


def _sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stat_key(path: str) -> list:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class FileHashes:
    """sha256 of data files, remembered under their stat in the cache root (see the module doc)."""

    def __init__(self, root: Path):
        self.path = Path(root) / MEMO
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.added = False

    def sha256(self, path: str) -> str:
        import time

        real = os.path.realpath(path)
        stat = _stat_key(real)
        got = self.known.get(real)
        if got is not None and got["stat"] == stat:
            return got["sha256"]
        began = time.time_ns()
        digest = _sha_file(real)
        if _stat_key(real) == stat and stat[3] < began - MEMO_SETTLE_S * 1e9 and stat[4] < began - MEMO_SETTLE_S * 1e9:
            self.known[real] = {"stat": stat, "sha256": digest}
            self.added = True
        return digest

    def save(self) -> None:
        """Merge into the file on disk (another process may have added others) and replace it whole;
        a cache root that cannot be written only costs the next launch a hash. A missing root is left
        missing (written when the cache is): its existence turns the cache lookup on (load_datasets)."""
        if not self.added or not self.path.parent.is_dir():
            return
        try:
            on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            on_disk = {}
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{MEMO}-", dir=self.path.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump({**on_disk, **self.known}, fh)
            os.replace(tmp, self.path)
        except OSError:
            pass
        self.added = False


# The memo of a cache root, pending until its key is known to name good data: saved on a cache hit or
# after a build commits (`_remember`), never by a launch whose data is refused (that run leaves its
# output dir as it was). Kept per process, so the key's several computations hash each file once.
_PENDING: dict[Path, FileHashes] = {}


def _remember(cfg) -> None:
    memo = _PENDING.pop(cache_root(cfg), None)
    if memo is not None:
        memo.save()


def _files_part(cfg) -> list:
    root = cache_root(cfg)
    memo = _PENDING.get(root)
    if memo is None:
        memo = _PENDING[root] = FileHashes(root)
    out = []
    paths = [s["path"] for s in data_mod._sources(cfg.data)]
    if isinstance(cfg.data.eval, str):
        paths.append(cfg.data.eval)
    for p in paths:
        files = data_mod._expand(p)
        if not files and data_mod._is_hub_id(p):
            out.append({"hub": p})
        out += [{"file": Path(f).name, "sha256": memo.sha256(f)} for f in files]
    return out


def _tokenizer_part(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return {
        "state": hashlib.sha256(state.encode()).hexdigest(),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "pad_token_id": tok.pad_token_id,
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template),
    }


def _format_part(cfg) -> dict:
    d = cfg.data.model_dump(mode="json")
    keep = ("train", "eval", "format", "prompt_field", "completion_field", "max_seq_len", "too_long", "truncation_side",
            "train_on_prompt")
    return {
        "data": {k: d[k] for k in keep},
        "add_special_tokens": cfg.tokenizer.add_special_tokens,
        "seed": cfg.train.seed,
    }


def _versions_part() -> dict:
    from importlib.metadata import version

    import tokenizers
    import transformers

    # datasets' installed version read without importing it (~1 s a rank; the others are loaded already)
    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "datasets": version("datasets")}


def _code_part() -> str:
    h = hashlib.sha256()
    for f in CODE_FILES:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def key_parts(cfg, tokenizer) -> dict:
    return {
        "files": _files_part(cfg),
        "tokenizer": _tokenizer_part(tokenizer),
        "format": _format_part(cfg),
        "versions": _versions_part(),
        "code": _code_part(),
    }


def cache_key(cfg, tokenizer) -> str:
    return hashlib.sha256(json.dumps(key_parts(cfg, tokenizer), sort_keys=True).encode()).hexdigest()[:20]


def cache_root(cfg) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.train.output_dir) / "data_cache"


def _meta(cfg, tokenizer, key, stats, has_eval) -> dict:
    return {"key": key, "parts": key_parts(cfg, tokenizer), "stats": vars(stats), "has_eval": has_eval, "layout": "store-1"}


def _commit(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "meta.json").is_file():  # another process won the race: fine; else a real error
            raise


def _tmpdir(cfg, key) -> tuple[Path, Path]:
    final = cache_root(cfg) / key
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent)), final


def write(cfg, tokenizer, train, evals, stats, log=print) -> Path:
    """Write already tokenized records (lists of {input_ids, labels}) as the cache's stores."""
    key = cache_key(cfg, tokenizer)
    if (cache_root(cfg) / key / "meta.json").is_file():
        return cache_root(cfg) / key
    tmp, final = _tmpdir(cfg, key)
    try:
        for name, recs in (("train", train), ("eval", evals)):
            if recs is not None:
                w = store_mod.StoreWriter(tmp / name)
                w.add_records(recs)
                w.close()
        (tmp / "meta.json").write_text(json.dumps(_meta(cfg, tokenizer, key, stats, evals is not None), indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, final)
    _remember(cfg)
    log(f"data cache: wrote {final}")
    return final


def build(cfg, tokenizer, log=print, procs=None) -> Path:
    """Read, check and tokenize the data (in parallel, distlora.data.iter_encoded) straight into the
    cache's stores; no split is ever held as Python lists of tokens."""
    key = cache_key(cfg, tokenizer)
    tmp, final = _tmpdir(cfg, key)
    try:
        train_rows, eval_rows = data_mod.split_rows(cfg)
        stats = None
        for name, pairs in (("train", train_rows), ("eval", eval_rows)):
            if not pairs:
                continue
            w = store_mod.StoreWriter(tmp / name)
            try:
                st = data_mod.encode_split(cfg, tokenizer, pairs, f"{name} data", w.add, None, log, procs)
            finally:
                w.close()
            stats = stats or st
        (tmp / "meta.json").write_text(json.dumps(_meta(cfg, tokenizer, key, stats, bool(eval_rows)), indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, final)
    _remember(cfg)
    log(f"data cache: wrote {final}")
    return final


def _indexed(cfg, path: Path):
    """The store at `path`, its index files made where missing: the lengths (a store written before they
    were part of it) and the packing plan of this run's row capacity. Under `load_datasets` the main
    process gets here first and writes them; the other ranks map what it wrote."""
    store_mod.ensure_lengths(path)
    store = store_mod.TokenStore(path)
    capacity = data_mod.row_capacity(cfg)
    if capacity:
        try:
            data_mod.PackPlan.for_store(store, capacity)
        except ValueError:  # an example longer than a row: make_loader says so on every rank, not here alone
            pass
    return store


def read(cfg, tokenizer, log=print):
    """(train, eval, stats) from the cache, each split a read-only TokenStore, or None on a miss."""
    key = cache_key(cfg, tokenizer)
    d = cache_root(cfg) / key
    if not (d / "meta.json").is_file():
        log(f"data cache: miss (no {d})")
        return None
    meta = json.loads((d / "meta.json").read_text())
    if meta.get("layout") != "store-1":
        log(f"data cache: miss ({d} has an older layout)")
        return None
    _remember(cfg)
    train = _indexed(cfg, d / "train")
    evals = _indexed(cfg, d / "eval") if meta["has_eval"] else None
    stats = data_mod.DataStats(**meta["stats"])
    log(f"data cache: hit {d} ({len(train)} train, {len(evals) if evals else 0} eval examples)")
    return train, evals, stats


def load_datasets(cfg, tokenizer, main_process_first=None, log=print, write_cache: bool | None = None):
    """The trainer's entry: map the cache when the key matches, else tokenize. With `data.cache` (the
    default) or `write_cache`, the main process tokenizes in parallel into the cache and every process
    maps it (TokenStores); otherwise each process tokenizes into lists. Under several processes the
    main process goes first, so the others only check the key and map what it wrote."""
    import contextlib

    first = main_process_first or contextlib.nullcontext
    write_cache = cfg.data.cache if write_cache is None else write_cache
    with first():
        if cache_root(cfg).is_dir() or write_cache:
            hit = read(cfg, tokenizer, log)
            if hit is not None:
                return hit
        if write_cache:
            try:
                build(cfg, tokenizer, log)
            except OSError as exc:
                log(f"data cache: not written ({exc}); tokenizing in memory")
            else:
                hit = read(cfg, tokenizer, lambda *_: None)
                if hit is not None:
                    return hit
        return data_mod.build_datasets(cfg, tokenizer, None, log)
