"""The token store: tokenized examples as flat arrays on disk that every rank maps read-only.

Layout of one split (a directory):
- `input_ids.bin`, `labels.bin`: every example's tokens and labels back to back, raw little-endian int32
  (Llama-3 and Qwen vocabularies do not fit in uint16);
- `offsets.npy`: int64, n + 1 entries; example i is [offsets[i], offsets[i + 1]);
- `lengths.npy`: int32, n entries, np.diff(offsets): the index samplers and the packer read, mapped
  (a store written without it gets it from `ensure_lengths`, derived once from offsets.npy);
- `pack-<capacity>/`: a packing plan for rows of that many tokens (distlora.data.PackPlan.for_store),
  worked out once and mapped by every rank.

Flat numpy files rather than Arrow through `datasets`: a rank reads them with `np.memmap`/`np.load(mmap_mode="r")`
(no `datasets` import at train time, no per-row Arrow objects), the lengths array is `np.diff(offsets)`
without touching the tokens, and an example is one slice of each file. The pages are the OS page cache's,
shared by every process on the node that maps the same files: a rank's anonymous memory does not grow with
the data. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IDS, LABELS, OFFSETS, LENGTHS = "input_ids.bin", "labels.bin", "offsets.npy", "lengths.npy"


def save_atomic(path: Path, array) -> None:
    """np.save through a temporary file renamed into place: a reader (another rank) sees the whole file
    or none."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lengths_from_offsets(offsets) -> np.ndarray:
    """The int32 lengths index (an example never nears 2**31 tokens; max_seq_len bounds it)."""
    return np.diff(offsets).astype(np.int32)


def ensure_lengths(path: Path) -> bool:
    """Write `lengths.npy` for a store that lacks it (written before it existed); False when the
    directory is read-only (TokenStore then derives the lengths in memory)."""
    path = Path(path)
    if (path / LENGTHS).is_file():
        return True
    try:
        save_atomic(path / LENGTHS, lengths_from_offsets(np.load(path / OFFSETS, mmap_mode="r")))
    except OSError:
        return False
    return True


class StoreWriter:
    """Appends examples chunk by chunk (numpy arrays), so the writer never holds the whole split."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._ids = open(self.path / IDS, "wb")
        self._labels = open(self.path / LABELS, "wb")
        self._lengths: list[np.ndarray] = []

    def add(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> None:
        self._ids.write(np.ascontiguousarray(ids, dtype="<i4").tobytes())
        self._labels.write(np.ascontiguousarray(labels, dtype="<i4").tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int64))

    def add_records(self, records) -> None:
        if len(records):
            self.add(*records_to_arrays(records))

    def close(self) -> int:
        self._ids.close()
        self._labels.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.path / OFFSETS, offsets)
        np.save(self.path / LENGTHS, lengths_from_offsets(offsets))
        return len(lengths)


def records_to_arrays(records) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(r["input_ids"]) for r in records), dtype=np.int64, count=len(records))
    ids = np.fromiter((t for r in records for t in r["input_ids"]), dtype=np.int32, count=int(lengths.sum()))
    labels = np.fromiter((t for r in records for t in r["labels"]), dtype=np.int32, count=int(lengths.sum()))
    return ids, labels, lengths


class TokenStore:
    """A read-only sequence of tokenized examples mapped from a store directory. `store[i]` is the record
    {input_ids, labels, id} as Python lists (read for one batch at a time); `lengths` is the int32 array
    of example lengths that samplers and the packer work from, mapped from lengths.npy (derived from
    the offsets in memory where a read-only store lacks it). Equal to a list of the same records."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offsets = np.load(self.path / OFFSETS, mmap_mode="r")
        n_tokens = int(self.offsets[-1]) if len(self.offsets) else 0
        # np.memmap refuses an empty file: an empty split maps nothing
        self.input_ids = np.memmap(self.path / IDS, dtype="<i4", mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, "<i4")
        self.labels = np.memmap(self.path / LABELS, dtype="<i4", mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, "<i4")

    @property
    def lengths(self) -> np.ndarray:
        if getattr(self, "_lengths", None) is None:
            f = self.path / LENGTHS
            self._lengths = np.load(f, mmap_mode="r") if f.is_file() else lengths_from_offsets(self.offsets)
        return self._lengths

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i = int(i) % n
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.input_ids[a:b].tolist(), "labels": self.labels[a:b].tolist(), "id": i}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        if isinstance(other, TokenStore):
            return (np.array_equal(self.offsets, other.offsets) and np.array_equal(self.input_ids, other.input_ids)
                    and np.array_equal(self.labels, other.labels))
        if isinstance(other, list):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"TokenStore({self.path}, {len(self)} examples, {self.n_tokens} tokens)"


def lengths_of(records) -> np.ndarray:
    """Example lengths as an int32 array: the store's mapped index, or counted from a list of records."""
    if isinstance(records, TokenStore):
        return records.lengths
    return np.fromiter((len(r["input_ids"]) for r in records), dtype=np.int32, count=len(records))
