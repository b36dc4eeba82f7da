"""Data: read sources, render formats, tokenize with prompt masking, order batches, collate.

The batch order is a function of (seed, epoch, global batch) only: each epoch is one seeded
permutation, padded to a whole number of global batches with padding examples (index -1: one pad
token, no label, so they add zero tokens), and cut into micro batches. `accelerate.prepare`
deals micro batch i to rank i % world, so micro step k on rank r of an optimizer step gets chunk
k * world + r: 1 process x accumulation 2 sees the very examples 2 processes x accumulation 1 see.
"""

from __future__ import annotations

import glob as globlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Iterator, Optional

IGNORE = -100
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class DataError(Exception):
    """A problem with the data, named with its file and line where there is one."""


# ---------------------------------------------------------------------------------------------
# Sources


def _sources(data_cfg) -> list[dict]:
    """Normalise data.train into a list of source dicts with every setting resolved."""
    from distlora.config import DataSource

    train = data_cfg.train
    items = [DataSource(path=train)] if isinstance(train, str) else list(train)
    return [
        {
            "path": s.path,
            "format": s.format or data_cfg.format,
            "prompt_field": s.prompt_field or data_cfg.prompt_field,
            "completion_field": s.completion_field or data_cfg.completion_field,
            "split": s.split,
            "truncation_side": s.truncation_side or data_cfg.truncation_side,
            "weight": s.weight,
        }
        for s in items
    ]


def _expand(path: str) -> list[str]:
    p = Path(path).expanduser()
    if p.is_dir():
        return sorted(str(f) for f in p.iterdir() if f.suffix in FILE_SUFFIXES)
    if any(ch in path for ch in "*?["):
        return sorted(globlib.glob(str(p), recursive=True))
    return [str(p)] if p.exists() else []


def _is_hub_id(path: str) -> bool:
    return not path.startswith((".", "/", "~")) and path.count("/") <= 1 and not Path(path).suffix


def check_sources(data_cfg) -> list[str]:
    """Config-time checks: every local source exists and has a readable suffix."""
    problems = []
    named = [("data.train", s) for s in _sources(data_cfg)]
    if isinstance(data_cfg.eval, str):
        named.append(("data.eval", {"path": data_cfg.eval}))
    for field, s in named:
        path = s["path"]
        if _is_hub_id(path) and not Path(path).exists():
            continue  # a hub dataset id: checked when loaded
        files = _expand(path)
        if not files:
            problems.append(f"{field}: '{path}' matches no file")
        for f in files:
            if Path(f).suffix not in FILE_SUFFIXES:
                problems.append(f"{field}: '{f}' has an unknown suffix; use one of {', '.join(FILE_SUFFIXES)}")
    return problems


class JsonlRows(Sequence):
    """The rows of one JSON-lines file as the byte offset and length of each line (12 bytes a row): a
    row is read (os.pread: no shared file position, so forked tokenizer workers read their own chunks)
    and parsed when asked for. A source of millions of rows holds no Python object per row."""

    def __init__(self, path: str, starts, sizes):
        self.path, self.starts, self.sizes = path, starts, sizes

    def __len__(self) -> int:
        return len(self.starts)

    def _read(self, rows) -> list[dict]:
        import os

        fd = os.open(self.path, os.O_RDONLY)  # per read: a directory of many shards holds no descriptors
        try:
            return [json.loads(os.pread(fd, int(self.sizes[i]), int(self.starts[i]))) for i in rows]
        finally:
            os.close(fd)

    def take(self, rows) -> list[dict]:
        return self._read(rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._read(range(*i.indices(len(self))))
        return self._read([range(len(self))[i]])[0]


class RowRefs(Sequence):
    """Rows picked from several sequences: row i is parts[part[i]][index[i]] (int32 and int64 arrays).
    A slice is a list of rows, in order."""

    def __init__(self, parts: list, part, index):
        self.parts, self.part, self.index = parts, part, index

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows) -> list[dict]:
        """The rows at these positions, each part read once (one open per file, not per row)."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        part, index = self.part[rows], self.index[rows]
        out: list = [None] * len(rows)
        for p in np.unique(part).tolist():
            at = np.flatnonzero(part == p)
            for k, row in zip(at.tolist(), take(self.parts[p], index[at].tolist())):
                out[k] = row
        return out

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        return self.parts[int(self.part[i])][int(self.index[i])]


def take(rows: Sequence, positions) -> list[dict]:
    """rows[j] for each j, through the sequence's own batched read where it has one."""
    return rows.take(positions) if hasattr(rows, "take") else [rows[j] for j in positions]


class DatasetRows(Sequence):
    """A `datasets` table (memory-mapped Arrow) as a sequence of row dicts."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.ds[j] for j in range(*i.indices(len(self)))]
        return self.ds[range(len(self))[i]]


def read_jsonl(path: str) -> JsonlRows:
    """Every line read and checked; a file with bad lines is one DataError naming the first (file:line
    and what is wrong) and the line numbers of the others, so one fix-and-rerun finds them all. The
    rows are kept as line offsets (JsonlRows), parsed again when tokenized."""
    from array import array

    import numpy as np

    starts, sizes, bad = array("q"), array("i"), []  # 12 bytes a row, no Python int per row
    at = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            start, at = at, at + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append((lineno, f"not UTF-8 ({exc.reason} at byte {exc.start})"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append((lineno, f"malformed JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(row, dict):
                bad.append((lineno, f"each line must be a JSON object, got {type(row).__name__}"))
                continue
            starts.append(start)
            sizes.append(len(raw))
    if bad:
        (first, what), more = bad[0], [n for n, _ in bad[1:]]
        shown = ", ".join(map(str, more[:10])) + (", ..." if len(more) > 10 else "")
        also = f" (and {len(more)} more bad line(s): {shown})" if more else ""
        raise DataError(f"{path}:{first}: {what}{also}")
    return JsonlRows(path, np.frombuffer(starts, dtype=np.int64), np.frombuffer(sizes, dtype=np.int32))


def read_file(path: str) -> Sequence:
    suffix = Path(path).suffix
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            with open(path, encoding="utf-8") as fh:
                obj = json.load(fh)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # JSON lines in a .json file
                return read_jsonl(path)
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a list of objects (or JSON lines)")
        return obj
    import datasets

    return DatasetRows(datasets.load_dataset(FILE_SUFFIXES[suffix], data_files=path, split="train"))


def read_source(path: str, split: str = "train") -> Sequence:
    """Every row of a source (a file, a directory or glob of files, or a hub dataset), each file
    checked on the way; rows are read again when tokenized (JsonlRows, DatasetRows), not held."""
    import numpy as np

    files = _expand(path)
    if not files and _is_hub_id(path):
        import datasets

        try:
            return DatasetRows(datasets.load_dataset(path, split=split))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot load hub dataset '{path}' (split {split}): {exc}") from None
    parts = [read_file(f) for f in files]
    n = sum(len(p) for p in parts)
    if not n:
        raise DataError(f"'{path}' holds no examples")
    if len(parts) == 1:
        return parts[0]
    return RowRefs(parts, np.repeat(np.arange(len(parts), dtype=np.int32), [len(p) for p in parts]),
                   np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts]))


# ---------------------------------------------------------------------------------------------
# Formats


def detect_format(row: dict, prompt_field: str, completion_field: str) -> tuple[str, str, str]:
    """Return (format, prompt_field, completion_field) guessed from one row's fields."""
    keys = set(row)
    if "messages" in keys:
        return "chat", prompt_field, completion_field
    if {"instruction", "output"} <= keys:
        return "alpaca", prompt_field, completion_field
    for p, c in ((prompt_field, completion_field), ("prompt", "completion"), ("question", "answer"), ("input", "output")):
        if {p, c} <= keys:
            return "completion", p, c
    if "text" in keys:
        return "text", prompt_field, completion_field
    raise DataError(
        f"cannot tell the format from the fields {sorted(keys)}; set data.format "
        "(completion needs data.prompt_field/completion_field, alpaca needs instruction/output, "
        "chat needs messages, text needs text)"
    )


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def alpaca_prompt(row: dict) -> str:
    inp = str(row.get("input") or "")
    return ALPACA_PROMPT.format(
        ctx=", paired with an input that provides further context" if inp else "",
        instruction=row["instruction"],
        input_block=f"### Input:\n{inp}\n\n" if inp else "",
    )


class Renderer:
    """Turns one row into token ids and labels for its format."""

    def __init__(self, tokenizer, fmt: str, prompt_field: str, completion_field: str, data_cfg, add_bos: bool,
                 truncation_side: str):
        self.tok = tokenizer
        self.fmt = fmt
        self.pf = prompt_field
        self.cf = completion_field
        self.train_on_prompt = data_cfg.train_on_prompt
        self.bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        self.side = truncation_side

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _need(self, row: dict, *fields: str) -> None:
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataError(
                f"format '{self.fmt}' needs field(s) {missing}; this example has {sorted(row)} "
                "(set data.prompt_field / data.completion_field or data.format)"
            )

    def _prompt_completion(self, prompt: str, completion: str) -> Tokenized:
        p = self.bos + self._ids(prompt)
        c = self._ids(completion) + [self.eos]
        labels = (p if self.train_on_prompt else [IGNORE] * len(p)) + c
        return Tokenized(p + c, labels)

    def __call__(self, row: dict) -> Tokenized:
        if self.fmt == "completion":
            self._need(row, self.pf, self.cf)
            return self._prompt_completion(str(row[self.pf]), str(row[self.cf]))
        if self.fmt == "alpaca":
            self._need(row, "instruction", "output")
            return self._prompt_completion(alpaca_prompt(row), str(row["output"]))
        if self.fmt == "text":
            self._need(row, "text")
            ids = self.bos + self._ids(str(row["text"])) + [self.eos]
            return Tokenized(ids, list(ids))
        if self.fmt == "chat":
            self._need(row, "messages")
            return self._chat(row["messages"])
        raise DataError(f"unknown format {self.fmt}")

    def batch(self, rows: list[dict], start: int = 0, source: str = "") -> list[Tokenized]:
        """`self(row)` for each row, with one call of the fast tokenizer's batch API per text field
        (chat renders row by row). The first bad row raises, named by its example index."""
        if self.fmt not in ("completion", "alpaca", "text"):
            out = []
            for j, row in enumerate(rows):
                try:
                    out.append(self(row))
                except DataError as exc:
                    raise DataError(f"{source}, example {start + j}: {exc}") from None
            return out
        fields = {"completion": (self.pf, self.cf), "alpaca": ("instruction", "output"), "text": ("text",)}[self.fmt]
        for j, row in enumerate(rows):
            try:
                self._need(row, *fields)
            except DataError as exc:
                raise DataError(f"{source}, example {start + j}: {exc}") from None
        if not rows:
            return []
        if self.fmt == "text":
            ids = self._batch_ids([str(r["text"]) for r in rows])
            return [Tokenized(x, list(x)) for x in (self.bos + t + [self.eos] for t in ids)]
        if self.fmt == "completion":
            prompts, completions = [str(r[self.pf]) for r in rows], [str(r[self.cf]) for r in rows]
        else:
            prompts, completions = [], []
            for row in rows:
                prompts.append(alpaca_prompt(row))
                completions.append(str(row["output"]))
        out = []
        for p_ids, c_ids in zip(self._batch_ids(prompts), self._batch_ids(completions)):
            p = self.bos + p_ids
            c = c_ids + [self.eos]
            out.append(Tokenized(p + c, (p if self.train_on_prompt else [IGNORE] * len(p)) + c))
        return out

    def _batch_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, row: dict) -> list[int]:
        """The tokens a model continues for this row, rendered as training renders its prompt: BOS + the
        prompt (completion, alpaca), the conversation before its first assistant turn with the template's
        generation prompt (chat), BOS + the text (text). The row needs no completion field."""
        if self.fmt == "completion":
            self._need(row, self.pf)
            return self.bos + self._ids(str(row[self.pf]))
        if self.fmt == "alpaca":
            self._need(row, "instruction")
            return self.bos + self._ids(alpaca_prompt(row))
        if self.fmt == "text":
            self._need(row, "text")
            return self.bos + self._ids(str(row["text"]))
        if self.fmt == "chat":
            self._need(row, "messages")
            if self.tok.chat_template is None:
                raise DataError("chat data needs a chat template: set tokenizer.chat_template")
            msgs = row["messages"]
            first = next((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), len(msgs))
            return self._ids(self._render(msgs[:first], True))
        raise DataError(f"unknown format {self.fmt}")

    def _render(self, messages: list[dict], gen: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def _chat(self, messages: list[dict]) -> Tokenized:
        if self.tok.chat_template is None:
            raise DataError("chat data needs a chat template: set tokenizer.chat_template")
        render = self._render
        full = render(messages)
        spans = []  # character spans of assistant turns in the full rendering
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start, end = len(render(messages[:i], True)), len(render(messages[: i + 1]))
            if not full.startswith(render(messages[: i + 1])):
                raise DataError("the chat template does not render conversations prefix by prefix; cannot mask turns")
            spans.append((start, end))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = []
        for tid, (a, _b) in zip(ids, enc["offset_mapping"]):
            trained = self.train_on_prompt or any(s <= a < e for s, e in spans)
            labels.append(tid if trained else IGNORE)
        return Tokenized(ids, labels)

    def truncate(self, row: dict, t: Tokenized, limit: int) -> Tokenized:
        """Cut a too-long example to `limit` tokens; labels stay with their tokens (masking unchanged).

        right: keep the first `limit` tokens (the end, EOS included, is lost).
        left: keep the end (a completion and its EOS, the last assistant turn) and a leading BOS; the
        tokens right after the BOS go. Chat first drops whole turns from the start (a leading system
        message stays) and keeps the longest rest that starts at a user turn, still holds an assistant
        turn and fits; only when even the last exchange does not fit is the rendering cut token-wise.
        """
        if self.side == "right":
            return Tokenized(t.input_ids[:limit], t.labels[:limit])
        if self.fmt == "chat":
            fewer = self._chat_fewer_turns(row["messages"], limit)
            if fewer is not None:
                return fewer
        ids, labels = t.input_ids, t.labels
        bos = self.tok.bos_token_id
        head = 1 if bos is not None and ids[:1] == [bos] else 0
        start = len(ids) - (limit - head)
        return Tokenized(ids[:head] + ids[start:], labels[:head] + labels[start:])

    def _chat_fewer_turns(self, messages: list[dict], limit: int) -> Tokenized | None:
        head = messages[:1] if messages and messages[0].get("role") == "system" else []
        rest = messages[len(head):]
        for k in range(1, len(rest)):
            if not any(m.get("role") == "assistant" for m in rest[k:]):
                break
            if rest[k].get("role") == "user" and len(self._ids(self._render(head + rest[k:]))) <= limit:
                return self._chat(head + rest[k:])
        return None


@dataclass
class DataStats:
    examples: int = 0
    truncated_right: int = 0  # cut at the end (data.truncation_side: right)
    truncated_left: int = 0  # cut at the start (left)
    dropped_too_long: int = 0
    dropped_no_target: int = 0

    @property
    def truncated(self) -> int:
        return self.truncated_right + self.truncated_left

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.examples} examples; truncated {self.truncated} (right {self.truncated_right}, "
            f"left {self.truncated_left}), dropped {self.dropped_too_long} too long, "
            f"dropped {self.dropped_no_target} with no trained token"
        )


CHUNK = 1024  # rows per batch-API call and per task of a tokenizing worker
PARALLEL_MIN_ROWS = 8 * CHUNK  # fewer rows: tokenize in this process (starting workers costs more)


def encode_chunk(rows: list[dict], renderer: Renderer, data_cfg, start: int = 0, source: str = ""):
    """Rows -> (input_ids int32, labels int32, lengths int64, DataStats): flat arrays of the usable
    examples, too-long ones truncated or dropped and examples without a trained token dropped, counted."""
    import numpy as np

    stats = DataStats()
    ids_out: list[int] = []
    labels_out: list[int] = []
    lengths: list[int] = []
    for row, t in zip(rows, renderer.batch(rows, start, source)):
        ids, labels = t.input_ids, t.labels
        if len(ids) > data_cfg.max_seq_len:
            if data_cfg.too_long == "drop":
                stats.dropped_too_long += 1
                continue
            t = renderer.truncate(row, t, data_cfg.max_seq_len)
            ids, labels = t.input_ids, t.labels
            if renderer.side == "left":
                stats.truncated_left += 1
            else:
                stats.truncated_right += 1
        if not any(lab != IGNORE for lab in labels[1:]):
            stats.dropped_no_target += 1
            continue
        ids_out += ids
        labels_out += labels
        lengths.append(len(ids))
    stats.examples = len(lengths)
    return (np.array(ids_out, dtype=np.int32), np.array(labels_out, dtype=np.int32),
            np.array(lengths, dtype=np.int64), stats)


_JOB: tuple = ()  # (rows, renderer, data_cfg, source) of the group the forked workers tokenize


def _encode_task(start: int):
    rows, renderer, data_cfg, source = _JOB
    return encode_chunk(rows[start : start + CHUNK], renderer, data_cfg, start, source)


def tokenizer_procs() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def iter_encoded(rows: list[dict], renderer: Renderer, data_cfg, stats: DataStats, source: str, procs: int | None = None):
    """Yield `encode_chunk` arrays for consecutive chunks of `rows`, in order, tokenized by `procs`
    forked workers (default: the CPUs this process may use); `stats` gathers the counts."""
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    global _JOB
    procs = tokenizer_procs() if procs is None else procs
    starts = iter(range(0, len(rows), CHUNK))

    def add(counts):
        for k, v in vars(counts).items():
            setattr(stats, k, getattr(stats, k) + v)

    if procs <= 1 or len(rows) < PARALLEL_MIN_ROWS or "fork" not in mp.get_all_start_methods():
        for i in starts:
            ids, labels, lengths, st = encode_chunk(rows[i : i + CHUNK], renderer, data_cfg, i, source)
            add(st)
            yield ids, labels, lengths
        return
    # fork: the workers inherit rows and renderer; only chunk starts and token arrays travel. A bounded
    # window of chunks in flight keeps the results in order and the memory flat.
    _JOB = (rows, renderer, data_cfg, source)
    n = min(procs, -(-len(rows) // CHUNK))
    ex = ProcessPoolExecutor(n, mp_context=mp.get_context("fork"), initializer=_die_with_parent)
    try:
        pending = deque(ex.submit(_encode_task, i) for _, i in zip(range(4 * n), starts))
        while pending:
            ids, labels, lengths, st = pending.popleft().result()
            nxt = next(starts, None)
            if nxt is not None:
                pending.append(ex.submit(_encode_task, nxt))
            add(st)
            yield ids, labels, lengths
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        _JOB = ()


def _die_with_parent() -> None:
    """A tokenizer worker ends when the process that forked it does (killed mid-tokenization, a worker
    would otherwise sleep on forever as an orphan: seen here after a stopped launch)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux/glibc: no such guarantee
        pass


def tokenize_rows(rows: list[dict], renderer: Renderer, data_cfg, stats: DataStats, source: str,
                  procs: int | None = None) -> list[dict]:
    out = []
    for ids, labels, lengths in iter_encoded(rows, renderer, data_cfg, stats, source, procs):
        ids, labels = ids.tolist(), labels.tolist()
        at = 0
        for n in lengths.tolist():
            out.append({"input_ids": ids[at : at + n], "labels": labels[at : at + n]})
            at += n
    return out


def _weighted(n: int, weight: float, seed: int):
    """Mixing weight w over n rows: floor(w) full copies plus a seeded (w - floor(w)) fraction; the
    row indices, in order (random.sample picks by position: the same rows as sampling the rows)."""
    import random

    import numpy as np

    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(range(n), int(round(frac * n))) if weight != 1.0 else []
    return np.concatenate([np.tile(np.arange(n, dtype=np.int64), whole if weight != 1.0 else 1),
                           np.asarray(extra, dtype=np.int64)])


def split_rows(cfg):
    """(train, eval or None): each a list of (rows, source settings) groups in data order, the rows of
    every source weighted and split; the bytes are read and checked here (file:line errors). Rows are
    references (RowRefs: 12 bytes each), read again when tokenized."""
    import numpy as np

    data_cfg = cfg.data
    sources = _sources(data_cfg)
    seqs = [read_source(s["path"], s["split"]) for s in sources]
    picks = [_weighted(len(rows), s["weight"], cfg.train.seed) for rows, s in zip(seqs, sources)]
    part = np.repeat(np.arange(len(seqs), dtype=np.int32), [len(p) for p in picks])
    index = np.concatenate(picks)
    keep = np.ones(len(index), dtype=bool)
    eval_groups = None
    if isinstance(data_cfg.eval, float):
        import random

        order = list(range(len(index)))
        random.Random(cfg.train.seed).shuffle(order)
        n_eval = max(1, int(round(data_cfg.eval * len(order))))
        keep[np.asarray(order[:n_eval], dtype=np.int64)] = False
        del order
        eval_groups = _groups(seqs, sources, part[~keep], index[~keep])
    elif isinstance(data_cfg.eval, str):
        rows = read_source(data_cfg.eval)
        eval_groups = [(rows, {**sources[0], "path": data_cfg.eval})]
    return _groups(seqs, sources, part[keep], index[keep]), eval_groups


def _groups(seqs: list, sources: list[dict], part, index) -> list[tuple[Sequence, dict]]:
    """Rows grouped by their source's settings (the weight aside), groups in order of first
    appearance, rows in data order within a group: how each group is rendered and tokenized."""
    import numpy as np

    def key(s):
        return tuple(sorted((k, v) for k, v in s.items() if k != "weight"))

    present, first = np.unique(part, return_index=True)
    out: dict[tuple, list[int]] = {}
    for i in present[np.argsort(first)].tolist():  # source indices in order of first appearance
        out.setdefault(key(sources[i]), []).append(i)
    groups = []
    for members in out.values():
        mask = np.isin(part, members)
        if mask.any():
            groups.append((RowRefs(seqs, part[mask], index[mask]), sources[members[0]]))
    return groups


def source_renderer(cfg, tokenizer, s: dict, first_row: dict, log=None) -> Renderer:
    """The Renderer of one source (`s`: its settings from _sources); format auto is detected from `first_row`."""
    fmt, pf, cf = s["format"], s["prompt_field"], s["completion_field"]
    if fmt == "auto":
        fmt, pf, cf = detect_format(first_row, pf, cf)
        if log:
            log(f"data: {s['path']}: detected format '{fmt}'" + (f" ({pf} -> {cf})" if fmt == "completion" else ""))
    return Renderer(tokenizer, fmt, pf, cf, cfg.data, add_bos=cfg.tokenizer.add_special_tokens,
                    truncation_side=s["truncation_side"])


def encode_split(cfg, tokenizer, groups, name: str, sink, main_process_first=None, log=print, procs=None) -> DataStats:
    """Tokenize one split (split_rows' groups): `sink(ids, labels, lengths)` gets its examples as
    consecutive chunks of flat arrays, in order. Returns the counts; raises when nothing usable is left."""
    import contextlib

    data_cfg = cfg.data
    first = main_process_first or contextlib.nullcontext
    stats = DataStats()
    for rows, s in groups:
        renderer = source_renderer(cfg, tokenizer, s, rows[0], log)
        with first():  # rank discipline: the main process goes first
            for chunk in iter_encoded(rows, renderer, data_cfg, stats, s["path"], procs):
                sink(*chunk)
    if not stats.examples:
        fix = ""
        if stats.dropped_too_long:
            fix = (f"; every kept example was longer than data.max_seq_len={data_cfg.max_seq_len}: raise it, or set "
                   "data.too_long: truncate")
        elif stats.dropped_no_target:
            fix = (f"; no example kept a trained token within data.max_seq_len={data_cfg.max_seq_len}: raise it, or "
                   "check the completion field (data.train_on_prompt trains on prompts too)")
        raise DataError(f"{name}: no usable examples ({stats.line(name)}){fix}")
    log(stats.line(name))
    return stats


def build_datasets(cfg, tokenizer, main_process_first=None, log=print):
    """Return (train_records, eval_records_or_None, train_stats), records as lists of {input_ids, labels, id}
    (distlora.datacache writes the same examples into a mapped TokenStore instead)."""
    train_rows, eval_rows = split_rows(cfg)

    def encode(pairs, name):
        out: list[dict] = []

        def sink(ids, labels, lengths):
            ids, labels = ids.tolist(), labels.tolist()
            at = 0
            for n in lengths.tolist():
                out.append({"input_ids": ids[at : at + n], "labels": labels[at : at + n], "id": len(out)})
                at += n

        stats = encode_split(cfg, tokenizer, pairs, name, sink, main_process_first, log)
        return out, stats

    train, train_stats = encode(train_rows, "train data")
    evals = encode(eval_rows, "eval data")[0] if eval_rows else None
    return train, evals, train_stats


# ---------------------------------------------------------------------------------------------
# Batching


class Records:
    """Map-style dataset over tokenized records (a list, or a TokenStore read by index); index -1 is a
    padding example (no tokens)."""

    def __init__(self, records, pad_id: int):
        self.records = records
        self.pad = {"input_ids": [pad_id], "labels": [IGNORE], "id": -1}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        if isinstance(i, list):  # a packed row: several example indices
            return [self[j] for j in i]
        return self.pad if i < 0 else self.records[i]


def index_dtype(n: int):
    """int32 for indices below 2**31 (half the memory of int64), else int64."""
    import numpy as np

    return np.int32 if n < 2**31 else np.int64


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing). An epoch's order
    is worked out in transient arrays that glibc's rising mmap threshold puts on the heap, where, freed
    beneath the share a rank keeps, they stayed resident: 124 MB RssAnon for a 50 MB share at 10M
    examples (measured), the share alone after the trim."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class GlobalBatchSampler:
    """Yields micro batches of example indices in the global order described in the module doc.

    `position(epoch, start_step)` selects the epoch and skips its first `start_step` optimizer
    steps (exact resume without touching any RNG). The name is not `set_epoch` on purpose:
    accelerate's DataLoaderShard calls `set_epoch(iteration)` on the batch sampler at every
    `iter()`, which would reset the position.

    `rank` (accelerate's process index; None: every micro batch, as one process sees the order):
    accelerate's BatchSamplerShard keeps yield i for process i % (world * sp), so a process only ever
    uses its own micro batches (those with index % world == rank // sp). Given its rank, the sampler
    keeps only those, int32, from each epoch's order (a rank holds 1/world of it), and yields each
    world * sp times in a row: the copy at position rank of each group is the one accelerate hands this
    process, the others stand in for the other processes' batches, which this one never uses.
    """

    GROUP_SPAN = 32  # group_by_length sorts spans of this many global batches of the shuffled order

    def __init__(self, n: int, micro: int, accum: int, world: int, seed: int, shuffle: bool,
                 lengths=None, sp: int = 1, rank: int | None = None):
        import numpy as np

        self.n, self.micro, self.accum, self.world = n, micro, accum, world
        # each micro batch yielded `sp` times in a row: accelerate deals yield i to rank i % (world * sp),
        # so the sp consecutive ranks of a sequence-parallel group get the same micro batch
        self.sp = sp
        self.rank = rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro * accum * world
        self.epoch, self.start_step = 0, 0
        self.lengths = None if lengths is None else np.asarray(lengths)  # set: group by length

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.global_batch)

    def position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _perm(self):
        """The epoch's seeded permutation of the items (an int64 array)."""
        import numpy as np
        import torch

        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            return torch.randperm(self.n, generator=g).numpy()  # int64 already: no copy
        return np.arange(self.n, dtype=np.int64)

    def order_array(self):
        """The epoch's order as an int64 array, padded with -1 to whole global batches."""
        import numpy as np

        perm = self._perm()
        if self.lengths is not None:
            perm = self._grouped(perm)
        return np.concatenate([perm, np.full(self.steps_per_epoch * self.global_batch - self.n, -1, dtype=np.int64)])

    def order(self) -> list[int]:
        return self.order_array().tolist()

    def _grouped(self, perm):
        """Length grouping: sort each span of GROUP_SPAN global batches of the shuffled order by length
        (longest first, ties in shuffled order), cut into global batches, and shuffle the whole global
        batches (the last, partial one stays last). Still a permutation of the epoch: exactly once, and a
        function of (seed, epoch, global batch) only, so `position` resumes exactly."""
        import numpy as np
        import torch

        g, span = self.global_batch, self.global_batch * self.GROUP_SPAN
        span_of = np.arange(len(perm), dtype=np.int64) // span
        out = perm[np.lexsort((-self.lengths[perm], span_of))]  # lexsort is stable: ties keep shuffled order
        whole = len(out) // g
        if self.shuffle and whole:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 2_000_000_011)
            batches = out[: whole * g].reshape(whole, g)[torch.randperm(whole, generator=gen).numpy()]
            out = np.concatenate([batches.reshape(-1), out[whole * g :]])
        return out

    def _dealt(self) -> tuple[int, int, int]:
        """(which micro batches are this process's: index % stride == this, stride, times each is yielded)."""
        if self.rank is None:
            return 0, 1, self.sp
        return self.rank // self.sp, self.world, self.world * self.sp

    def _share(self, items):
        """This process's micro batches of an epoch's padded order (`items`, micro entries each, in
        order), as one int32 array: its 1/world of the epoch."""
        mine, stride, _ = self._dealt()
        return items.reshape(-1, self.micro)[mine::stride].reshape(-1).astype(index_dtype(max(self.n, 1) + 1))

    def _first(self) -> int:
        """Where `start_step` begins in this process's share."""
        return self.start_step * self.global_batch // self._dealt()[1]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._share(self.order_array())
        release_freed_memory()
        repeat = self._dealt()[2]
        for start in range(self._first(), len(order), self.micro):
            micro = order[start : start + self.micro].tolist()
            for _ in range(repeat):
                yield micro

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum * self.world * self.sp


PACK_DIR = "pack-{capacity}"  # a store's packing plan for rows of `capacity` tokens (distlora.store layout)


class PackPlan:
    """Best-fit decreasing over a lengths array, worked out once. Examples are taken longest first
    (ties in the given order); each goes into the row whose free space fits it most tightly (among rows
    with equally much free space, the lowest row index), else it opens a row. Which row the k-th example
    of that sorted sequence joins depends only on the sorted lengths, which every permutation of the
    same examples shares: `slot_row` holds it, and an epoch's rows are one stable argsort away
    (`rows_for`). Free space is kept in buckets per amount (a heap of row indices each) plus a sorted
    list of the amounts that have rows: no per-example Python objects are kept. `saved` gives the two
    arrays of a plan worked out before (`for_store`: mapped from the store's directory)."""

    def __init__(self, lengths, capacity: int, names=None, saved=None):
        import bisect
        import heapq

        import numpy as np

        self.lengths = np.asarray(lengths)
        self.capacity = capacity
        if saved is not None:
            self.slot_order, self.row_offsets = saved
            self.n_rows = len(self.row_offsets) - 1
            return
        if len(self.lengths) and int(self.lengths.max()) > capacity:  # the first one taken: longest, lowest index
            i = int(np.argmax(self.lengths))
            raise ValueError(f"example {int(names[i]) if names is not None else i} has {int(self.lengths[i])} tokens, "
                             f"more than the row capacity {capacity}")
        sorted_lengths = np.sort(self.lengths)[::-1]
        slot_row = np.empty(len(sorted_lengths), dtype=index_dtype(len(sorted_lengths)))
        buckets: dict[int, list[int]] = {}  # free tokens -> heap of row indices with that much free
        avail: list[int] = []  # sorted free amounts with a non-empty bucket
        n_rows = 0
        for k, n in enumerate(sorted_lengths.tolist()):
            j = bisect.bisect_left(avail, n)
            if j < len(avail):
                room = avail[j]
                heap = buckets[room]
                r = heapq.heappop(heap)
                if not heap:
                    avail.pop(j)
            else:
                r, room = n_rows, capacity
                n_rows += 1
            slot_row[k] = r
            rest = room - n
            if rest > 0:
                heap = buckets.setdefault(rest, [])
                if not heap:
                    bisect.insort(avail, rest)
                heapq.heappush(heap, r)
        del sorted_lengths
        self.n_rows = n_rows
        # slots grouped by row, in the order they were added: an epoch's rows are one gather
        self.slot_order = np.argsort(slot_row, kind="stable").astype(slot_row.dtype)
        self.row_offsets = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(slot_row, minlength=n_rows), out=self.row_offsets[1:])

    @classmethod
    def for_store(cls, store, capacity: int) -> PackPlan:
        """The plan of a TokenStore's examples, mapped from `<store>/pack-<capacity>/` (the store's
        directory never changes once written, so a plan saved there stays its plan; the capacity is in
        the name); worked out and saved there first when missing. Every rank maps the same pages; a
        read-only store gets a plan in memory."""
        import os
        import shutil
        import tempfile

        import numpy as np

        lengths = store.lengths
        d = store.path / PACK_DIR.format(capacity=capacity)
        saved = cls._load(d, len(lengths))
        if saved is not None:
            return cls(lengths, capacity, saved=saved)
        plan = cls(lengths, capacity)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}-", dir=store.path))
        except OSError:
            return plan
        try:
            np.save(tmp / "slot_order.npy", plan.slot_order)
            np.save(tmp / "row_offsets.npy", plan.row_offsets)
            os.replace(tmp, d)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process saved it first, or no room: either way fine
        saved = cls._load(d, len(lengths))
        return plan if saved is None else cls(lengths, capacity, saved=saved)

    @staticmethod
    def _load(d: Path, n: int):
        """(slot_order, row_offsets) mapped from a saved plan of n examples, or None."""
        import numpy as np

        try:
            slot_order = np.load(d / "slot_order.npy", mmap_mode="r")
            row_offsets = np.load(d / "row_offsets.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None
        if len(slot_order) != n or len(row_offsets) < 1 or int(row_offsets[-1]) != n:
            return None  # not a plan of these examples
        return slot_order, row_offsets

    def rows_for(self, order):
        """(flat example indices grouped by row, row offsets) for this order of the examples."""
        import numpy as np

        order = np.asarray(order)
        key = self.lengths[order]
        # longest first, ties in `order`: a stable sort of capacity - length; as uint16 numpy sorts it by
        # radix (linear time: ~10x faster than a merge sort at 10M examples)
        key = (self.capacity - key).astype(np.uint16) if self.capacity < 2**16 else -key.astype(np.int64)
        by_length = order[np.argsort(key, kind="stable")]
        del key
        return by_length[self.slot_order], self.row_offsets


def pack_rows(order, lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing (see PackPlan): take examples longest first (ties in `order`), put each into
    the row whose free space fits it most tightly, else open a row. The rows' length structure depends
    only on the multiset of lengths, so every epoch packs into the same number of rows; `order` decides
    which of several equally long examples goes where."""
    import numpy as np

    order = np.asarray(order, dtype=np.int64)
    sub = np.asarray(lengths, dtype=np.int64)[order]
    flat, offsets = PackPlan(sub, capacity, names=order).rows_for(np.arange(len(order)))
    flat = order[flat]
    return [flat[a:b].tolist() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


class PackedBatchSampler(GlobalBatchSampler):
    """Like GlobalBatchSampler, over packed rows: each epoch's seeded permutation of the examples is
    packed into rows of at most `capacity` tokens (`pack_rows`), the rows are shuffled with the same
    seed and epoch, padded with padding rows ([-1]) to whole global batches, and cut into micro
    batches of `micro` rows. Every example is in exactly one row per epoch; the order depends on
    (seed, epoch, global batch in rows, capacity) only, and `position` resumes exactly as for unpacked
    data. A token budget (train.micro_batch_tokens) is capacity = the budget with micro = 1: each micro
    batch is one row, and a micro batch never holds more than the budget's tokens. `plan`: the
    PackPlan of these lengths and capacity when already made (PackPlan.for_store); `rank` as for
    GlobalBatchSampler: a process keeps its own rows of each epoch only."""

    def __init__(self, lengths, capacity: int, micro: int, accum: int, world: int, seed: int, shuffle: bool,
                 sp: int = 1, plan: PackPlan | None = None, rank: int | None = None):
        import numpy as np

        lengths = np.asarray(lengths)
        self.plan = plan if plan is not None else PackPlan(lengths, capacity)  # once: every epoch's rows follow
        super().__init__(self.plan.n_rows, micro, accum, world, seed, shuffle, sp=sp, rank=rank)
        self.example_lengths, self.capacity, self.n_examples = lengths, capacity, len(lengths)

    def _rows_arrays(self):
        """(flat example indices by row, row offsets, the epoch's row order)."""
        import numpy as np
        import torch

        dtype = index_dtype(self.n_examples)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(self.n_examples, generator=g).numpy().astype(dtype)
        else:
            perm = np.arange(self.n_examples, dtype=dtype)
        flat, offsets = self.plan.rows_for(perm)
        del perm
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 1_000_000_007)
            row_order = torch.randperm(self.n, generator=g).numpy()
        else:
            row_order = np.arange(self.n)
        return flat, offsets, row_order

    def rows(self) -> list[list[int]]:
        flat, offsets, row_order = self._rows_arrays()
        return [flat[offsets[r] : offsets[r + 1]].tolist() for r in row_order.tolist()]

    def order(self) -> list[list[int]]:
        return self.rows() + [[-1]] * (self.steps_per_epoch * self.global_batch - self.n)

    def _own_rows(self):
        """(this process's rows in its order, -1 for padding rows; their examples back to back, int32;
        where each row's examples start in that array): the epoch's full arrays are dropped on return."""
        import numpy as np

        flat, offsets, row_order = self._rows_arrays()
        pad = np.full(self.steps_per_epoch * self.global_batch - self.n, -1, dtype=row_order.dtype)
        own = self._share(np.concatenate([row_order, pad]))
        del row_order
        real = own >= 0
        r = own[real].astype(np.int64)
        counts = np.zeros(len(own), dtype=np.int64)
        counts[real] = offsets[r + 1] - offsets[r]
        starts = np.zeros(len(own) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        at = np.repeat(np.asarray(offsets[r]) - starts[:-1][real], counts[real]) + np.arange(starts[-1])
        examples = flat[at].astype(index_dtype(self.n_examples))
        del flat, at, counts, r, real
        starts = starts.astype(index_dtype(self.n_examples + 1))
        release_freed_memory()
        return own, examples, starts

    def __iter__(self) -> Iterator[list[list[int]]]:
        own, examples, starts = self._own_rows()
        repeat = self._dealt()[2]
        for first in range(self._first(), len(own), self.micro):
            micro = [examples[starts[j] : starts[j + 1]].tolist() if own[j] >= 0 else [-1]
                     for j in range(first, min(first + self.micro, len(own)))]
            for _ in range(repeat):
                yield micro

    def summary(self) -> str:
        used = int(self.example_lengths.sum(dtype="int64"))
        return (
            f"packing: {self.n_examples} examples in {self.n} rows of <= {self.capacity} tokens "
            f"({self.n_examples / self.n:.2f} examples/row, {used / (self.n * self.capacity):.1%} of row tokens used); "
            f"a micro batch is {self.micro} row(s); a step is {self.global_batch} rows, "
            f"~{self.global_batch * self.n_examples / self.n:.1f} examples"
        )


def row_capacity(cfg) -> int:
    """Tokens per packed row: train.micro_batch_tokens (a micro batch is then one row) or data.max_seq_len;
    0 when data.packing is off."""
    if not cfg.data.packing:
        return 0
    return cfg.train.micro_batch_tokens or cfg.data.max_seq_len


class Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            input_ids[i, :k] = torch.tensor(e["input_ids"])
            labels[i, :k] = torch.tensor(e["labels"])
            mask[i, :k] = 1  # a padding example attends to its one token: no fully-masked row (NaN)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "ids": torch.tensor([e["id"] for e in examples], dtype=torch.long),
            "host": host_stats(labels, [len(e["input_ids"]) for e in examples if e["id"] >= 0]),
        }


class PackedCollator:
    """Rows of examples -> one packed batch: `position_ids` restart at 0 for each example (the model
    then keeps attention inside each example), each example's first label is IGNORE (never train on
    the previous example's last token), `example_index` gives each token's slot in `ids` (one entry per
    example, -1 for padding examples). Row padding: pad tokens, no labels, their own positions.
    `cu_seq_lens` (int32) and `max_length` (an int) give the segments of the B rows read as one
    flattened row (each example, each row's padding), for varlen attention (distlora.attention)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[list[dict]]) -> dict[str, Any]:
        import torch

        width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        example_index = torch.zeros((n, width), dtype=torch.long)
        ids: list[int] = []
        cu = [0]
        for r, row in enumerate(rows):
            at = 0
            for e in row:
                k = len(e["input_ids"])
                cu.append(r * width + at + k)
                input_ids[r, at : at + k] = torch.tensor(e["input_ids"])
                labels[r, at + 1 : at + k] = torch.tensor(e["labels"][1:])
                position_ids[r, at : at + k] = torch.arange(k)
                example_index[r, at : at + k] = len(ids)
                ids.append(e["id"])
                at += k
            position_ids[r, at:] = torch.arange(width - at)
            if at < width:
                cu.append((r + 1) * width)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "example_index": example_index,
            "ids": torch.tensor(ids, dtype=torch.long),
            "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
            "max_length": max(b - a for a, b in itertools.pairwise(cu)),
            "host": {**host_stats(labels, [len(e["input_ids"]) for row in rows for e in row if e["id"] >= 0]),
                     "cu_seq_lens": cu},  # the per-segment sdpa reads its segments here, not from the device
        }


def host_stats(labels, lengths: list[int]) -> dict:
    """What the loop counts of a micro batch, computed here on the host while the batch is still on the
    CPU, so the step never reads a device value for it: target tokens (labels[:, 1:] that are not
    IGNORE, padding examples included: they have none), input tokens and lengths of the real examples,
    and the padded size. accelerate moves tensors to the device and passes this dict through as is."""
    return {"targets": int((labels[:, 1:] != IGNORE).sum()), "tokens": sum(lengths), "lengths": lengths,
            "padded": labels.numel()}


class SequenceShard:
    """A collated micro batch cut into `n` sequence-parallel shards, shard `k` returned (distlora.sequence_parallel).

    The rows are padded on the right to a multiple of n tokens and cut along the sequence: shard k holds
    tokens [k*S, (k+1)*S) of each row (S = width / n) with their global `position_ids` (rotary needs
    them), and labels [k*S, (k+1)*S + 1): the one extra label is the next shard's first, so the shard's
    last token is trained on its true next token (the shift happens over the full row, before the cut);
    the loss reads target = labels[:, 1:] as always. Padded batches drop the attention mask: right
    padding under causal attention is exact without one. Packed batches are first flattened to one row
    (the collator's cu_seq_lens already read the B rows that way), the padding a segment of its own.
    The host dict gets `sp_bounds`, the FULL row's segment bounds the attention needs after its
    all-to-all, counts this shard's targets, and lists the examples' lengths on shard 0 only, so sums
    over the group count each example once."""

    def __init__(self, collate, n: int, k: int, pad_id: int):
        self.collate, self.n, self.k, self.pad_id = collate, n, k, pad_id

    def __call__(self, examples) -> dict[str, Any]:
        import torch

        b = self.collate(examples)
        packed = "example_index" in b
        rows = {key: b[key] for key in ("input_ids", "labels", *(("position_ids", "example_index") if packed else ()))}
        if packed:
            rows = {key: v.reshape(1, -1) for key, v in rows.items()}
        r, width = rows["input_ids"].shape
        full = -(-width // self.n) * self.n
        fill = {"input_ids": self.pad_id, "labels": IGNORE, "position_ids": 0, "example_index": 0}
        rows = {key: torch.cat([v, torch.full((r, full - width + 1), fill[key], dtype=v.dtype)], dim=1)
                for key, v in rows.items()}  # one column past the end: the last shard's extra label
        if packed:
            bounds = list(b["host"]["cu_seq_lens"])
            if full > width:  # the padding to a multiple of n: positions restart, a segment of its own
                rows["position_ids"][0, width:full] = torch.arange(full - width)
                bounds.append(full)
        else:
            rows["position_ids"] = torch.arange(full + 1).expand(r, -1)
            bounds = [i * full for i in range(r + 1)]
        s = full // self.n
        a = self.k * s
        shard = {key: v[:, a : a + s + (key in ("labels", "example_index"))].contiguous() for key, v in rows.items()}
        lengths = b["host"]["lengths"] if self.k == 0 else []
        host = {**host_stats(shard["labels"], lengths), "padded": shard["input_ids"].numel(), "sp_bounds": bounds}
        return {**shard, "ids": b["ids"], "host": host}


def make_loader(records, pad_id: int, micro: int, accum: int, world: int, seed: int, shuffle: bool,
                pack: int = 0, group_by_length: bool = False, sp: int = 1, sp_rank: int = 0, rank: int | None = None):
    """DataLoader + sampler over a list of records or a TokenStore (distlora.store: examples read by index
    from the mapped store, samplers work from its mapped lengths, a packing plan mapped from the store,
    PackPlan.for_store); `pack` > 0 packs examples into rows of at most `pack` tokens;
    `group_by_length` batches examples of similar length together (unpacked). `world` counts data-parallel
    ranks; with `sp` > 1 the sampler deals every micro batch to the `sp` ranks of a group, and this rank
    (`sp_rank` in its group) keeps its shard of each (SequenceShard). `rank`: this process's index for
    accelerate's sharding of the loader; given, the sampler holds only this process's share of each epoch
    (GlobalBatchSampler), so the loader must then go through accelerate's prepare with world * sp processes."""
    from torch.utils.data import DataLoader

    from distlora.store import TokenStore, lengths_of

    if pack:
        plan = PackPlan.for_store(records, pack) if isinstance(records, TokenStore) else None
        sampler = PackedBatchSampler(lengths_of(records), pack, micro, accum, world, seed, shuffle, sp, plan=plan,
                                     rank=rank)
        collate = PackedCollator(pad_id)
    else:
        lengths = lengths_of(records) if group_by_length else None
        sampler = GlobalBatchSampler(len(records), micro, accum, world, seed, shuffle, lengths, sp, rank=rank)
        collate = Collator(pad_id)
    if sp > 1:
        collate = SequenceShard(collate, sp, sp_rank, pad_id)
    loader = DataLoader(Records(records, pad_id), batch_sampler=sampler, collate_fn=collate, num_workers=0)
    return loader, sampler
