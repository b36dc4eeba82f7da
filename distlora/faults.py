"""Fault injection for tests: DISTLORA_FAULT="rank1:step5:raise[,rank0:save.before_marker:kill]".

Each rule is `rank<R|*>:<point>:<action>`. Points are `step<N>` (before optimizer step N+1's
forward, i.e. after N steps are done) or named points in the checkpoint writer (`save.*`) and
rotation. Actions: raise (an exception), kill (SIGKILL this process), exit (os._exit(1)),
nan (make this rank's loss non-finite for that step). Nothing happens when the variable is unset.
"""

from __future__ import annotations

import os
import signal

_RULES: list[tuple[str, str, str]] | None = None


class InjectedFault(RuntimeError):
    pass


def _rules() -> list[tuple[str, str, str]]:
    global _RULES
    if _RULES is None:
        _RULES = []
        for item in filter(None, os.environ.get("DISTLORA_FAULT", "").split(",")):
            rank, point, action = item.strip().split(":")
            _RULES.append((rank, point, action))
    return _RULES


def _rank() -> str:
    return os.environ.get("RANK", "0")


def active(point: str, action: str) -> bool:
    return any(r in ("rank*", f"rank{_rank()}") and p == point and a == action for r, p, a in _rules())


def hit(point: str) -> None:
    """Run the kill/exit/raise rules registered for `point` on this rank."""
    for rank, p, action in _rules():
        if p != point or rank not in ("rank*", f"rank{_rank()}"):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "exit":
            os._exit(1)
        if action == "raise":
            raise InjectedFault(f"injected fault at {point} on rank {_rank()}")
