"""Fault injection for tests: DISTLORA_FAULT="rank1:step5:raise[,rank0:save.before_marker@1:kill]".

Each rule is `rank<R|*>:<point>[@<skip>]:<action>`. `point` is a glob over the names the trainer
passes: `step<N>` (before the forward of the step after N finished steps) and named points in the
checkpoint writer (`save.*`, `rotate.before_delete`). `@<skip>` lets the first <skip> hits pass.
Actions: raise (an exception), kill (SIGKILL this process), exit (os._exit(1)), slow (sleep 0.5 s),
nan (this rank's loss and gradients become NaN for that step), inf (this rank's loss becomes +inf
while its gradient stays finite: only a decision on the loss catches it). Nothing happens when the
variable is unset.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import time


class InjectedFault(RuntimeError):
    pass


_RULES: list[dict] | None = None


def _rules() -> list[dict]:
    global _RULES
    if _RULES is None:
        _RULES = []
        for item in filter(None, os.environ.get("DISTLORA_FAULT", "").split(",")):
            rank, point, action = item.strip().split(":")
            point, _, skip = point.partition("@")
            _RULES.append({"rank": rank, "point": point, "skip": int(skip or 0), "action": action})
    return _RULES


def reset() -> None:
    """Re-read DISTLORA_FAULT (for in-process tests)."""
    global _RULES
    _RULES = None


def _matching(point: str, action: str | None = None):
    me = f"rank{os.environ.get('RANK', '0')}"
    for rule in _rules():
        if rule["rank"] in ("rank*", me) and fnmatch.fnmatchcase(point, rule["point"]):
            if action is None or rule["action"] == action:
                yield rule


def active(point: str, action: str) -> bool:
    return any(True for _ in _matching(point, action))


def hit(point: str) -> None:
    """Run the kill/exit/raise/slow rules registered for `point` on this rank."""
    for rule in _matching(point):
        if rule["action"] in ("nan", "inf"):
            continue
        if rule["skip"] > 0:
            rule["skip"] -= 1
            continue
        if rule["action"] == "slow":
            time.sleep(0.5)
        elif rule["action"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif rule["action"] == "exit":
            os._exit(1)
        elif rule["action"] == "raise":
            raise InjectedFault(f"injected fault at {point} on rank {os.environ.get('RANK', '0')}")


def corrupt_loss(point: str, loss):
    """The loss as the nan/inf rules for `point` on this rank make it."""
    if active(point, "nan"):
        loss = loss * float("nan")
    if active(point, "inf"):
        loss = loss + float("inf")
    return loss
