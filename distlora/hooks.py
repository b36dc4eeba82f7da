"""Named points where tests (or a user's own tooling) attach code, without the production path
knowing what is attached. With nothing attached, each call is a dictionary lookup.

    hooks.add("step", fn)                      # fn(**ctx) at each `hooks.point("step", ...)`
    hooks.add("loss", fn)                      # value = fn(value, **ctx) at `hooks.transform("loss", value, ...)`

Points the trainer calls (ctx keyword arguments in brackets):
- "step" (step): before the step after `step` finished steps fetches its window;
- "fetched" (step, window): the window fetched, before its first collective and forward;
- "loss" (step, host, n_target; transform of the micro batch's summed NLL; `host` its collator counts,
  `n_target` the window's target tokens over all ranks);
- "backward_done" (backend, step, out): the window's gradients reduced (DDP, FSDP2), before clipping;
- "sp_bounds" (transform of the segment bounds sequence-parallel attention uses after its all-to-all);
- "before_model" (backend): before the base model loads;
- "prepared" (backend): after the backend wrapped model and optimizer;
- "memory" (backend, where, memory): after the model-state bytes are recorded at `where`
  (after_prepare, after_train, after_eval, after_save); `memory` goes to summary.json per rank;
- "window_done" (backend, step, window): after an optimizer step (applied or skipped) and its log row;
- "adapter_state_dict" (backend; transform of the gathered adapter tensors before they are saved);
- "save.before_marker", "save.before_rename", "save.after_optimizer", "save.after_adapter",
  "save.after_scheduler", "rotate.before_delete": inside the checkpoint writer;
- "run_end" (backend, out): after the final save, before the summary.

Tests install theirs in-process with `add`, or in launched workers through a `sitecustomize` module
on PYTHONPATH (tests/hooks/). distlora itself reads no environment variable for any of this.
"""

from __future__ import annotations

from collections.abc import Callable

_HOOKS: dict[str, list[Callable]] = {}


def add(name: str, fn: Callable) -> Callable:
    _HOOKS.setdefault(name, []).append(fn)
    return fn


def remove(name: str, fn: Callable) -> None:
    if fn in _HOOKS.get(name, []):
        _HOOKS[name].remove(fn)


def clear() -> None:
    _HOOKS.clear()


def point(name: str, **ctx) -> None:
    for fn in _HOOKS.get(name, ()):
        fn(**ctx)


def transform(name: str, value, **ctx):
    for fn in _HOOKS.get(name, ()):
        value = fn(value, **ctx)
    return value
