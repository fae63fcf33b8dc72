"""OS errors injected at one file-system write of the code under test, by an audit hook.

Python raises an audit event before every ``open``/``os.open`` (with its flags), ``os.mkdir``,
``os.rename``/``os.replace``, ``os.link`` and ``os.symlink``; the hook installed here, inert until
:func:`inject_at` or :func:`record_writes` arms it, counts those that write under one folder and
makes the n-th fail with the chosen errno, as the kernel would (the exception is raised where the
call is made). The hook cannot be removed (audit hooks never can), so it does nothing while unarmed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = {"os.mkdir": 0, "os.rename": 1, "os.link": 1, "os.symlink": 1}  # event -> index of the path written


@dataclass
class _Plan:
    root: str
    fail_at: int | None
    errno: int
    seen: list[str] = field(default_factory=list)


_lock = threading.Lock()
_plan: _Plan | None = None


def _written(event: str, args: tuple) -> str | None:
    if event == "open":
        path, _, flags = args
        return None if isinstance(path, int) or not (flags or 0) & _WRITE_FLAGS else os.fsdecode(path)
    if event in _EVENTS:
        path = args[_EVENTS[event]]
        return None if isinstance(path, int) else os.fsdecode(path)
    return None


def _hook(event: str, args: tuple) -> None:
    plan = _plan
    if plan is None:
        return
    path = _written(event, args)
    if path is None or not os.path.abspath(path).startswith(plan.root):
        return
    with _lock:
        plan.seen.append(f"{event} {os.path.relpath(path, plan.root)}")
        hit = len(plan.seen) - 1 == plan.fail_at
    if hit:
        raise OSError(plan.errno, os.strerror(plan.errno), path)


sys.addaudithook(_hook)


@contextlib.contextmanager
def inject_at(root: Path, index: int | None, errno: int = 0) -> Iterator[list[str]]:
    """Within the block, the ``index``-th write under ``root`` (0-based; None: none) fails with ``errno``;
    yields the list of writes seen (``"<event> <relative path>"``)."""
    global _plan
    plan = _Plan(os.path.abspath(root) + os.sep, index, errno)
    _plan = plan
    try:
        yield plan.seen
    finally:
        _plan = None


def record_writes(root: Path) -> contextlib.AbstractContextManager[list[str]]:
    """The writes under ``root`` within the block, none failing."""
    return inject_at(root, None)
