"""How many threads torch uses while maptools drives PPQ: the cores this process can really get.

PPQ runs the model in torch eager, one small operator after another; with more intra-op threads
than free cores every operator waits at its barrier for a thread the scheduler parked behind
another job, and a quantization that takes seconds takes minutes. So the count is

* the cores this process may run on: its CPU affinity and, in a container, its cgroup quota;
* of those, the ones idle right now (``/proc/stat`` sampled over :data:`SAMPLE_SECONDS`): one
  other CPU-bound job on a 2-core machine leaves one;
* unless the caller set a count (``threads=``, ``--threads``), which is used as given.

:func:`torch_threads` sets torch's count for the duration of a block in the calling thread (torch's
OpenMP backend keeps the count per thread) and puts it back after.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from maptools.errors import SettingsError

__all__ = ["available_cores", "idle_cores", "IdleSample", "choose_threads", "torch_threads", "SAMPLE_SECONDS",
           "cgroup_quota"]

#: how long the idle cores are sampled before choosing
SAMPLE_SECONDS = 0.1


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup may use (``cpu.max`` v2, or v1's quota / period), or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _cpus() -> set[int]:
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def available_cores() -> int:
    """Cores this process may run on: its affinity, capped by a cgroup CPU quota."""
    cores = len(_cpus())
    quota = cgroup_quota()
    return max(1, min(cores, math.floor(quota) if quota is not None else cores))


def _busy_and_total(cpus: set[int]) -> dict[int, tuple[int, int]]:
    stats = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]  # idle + iowait
            stats[int(name[3:])] = (sum(values) - idle, sum(values))
    return stats


class IdleSample:
    """A sample of ``/proc/stat`` begun now: :meth:`idle_cores` later gives the cores idle since, counting this
    process's own use as idle (``count_own``: those cores are the run's anyway), so the run's start-up can
    fill the window."""

    def __init__(self, count_own: bool = True) -> None:
        self.count_own = count_own
        self.cpus = _cpus()
        self.started, self.own = time.monotonic(), time.process_time()
        try:
            self.before: dict[int, tuple[int, int]] | None = _busy_and_total(self.cpus)
        except (OSError, ValueError):
            self.before = None

    def idle_cores(self, seconds: float = SAMPLE_SECONDS) -> float | None:
        """Idle cores over at least ``seconds`` since the sample began (sleeping the rest); None where
        /proc/stat is missing."""
        time.sleep(max(0.0, seconds - (time.monotonic() - self.started)))
        try:
            after = _busy_and_total(self.cpus)
        except (OSError, ValueError):
            return None
        if self.before is None or not after:
            return None
        idle = (time.process_time() - self.own) / max(time.monotonic() - self.started, 1e-9) if self.count_own else 0.0
        for cpu, (busy, total) in after.items():
            if cpu in self.before and total > self.before[cpu][1]:
                idle += 1 - (busy - self.before[cpu][0]) / (total - self.before[cpu][1])
        return min(idle, float(len(after)))


def idle_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Idle cores among those this process may run on, over ``seconds``; None where /proc/stat is missing."""
    return IdleSample(count_own=False).idle_cores(seconds)


def choose_threads(requested: int | None = None, sample: IdleSample | None = None) -> int:
    """Threads for torch: ``requested`` as given, else the available cores idle now (at least 1); ``sample``: one
    begun earlier (:class:`IdleSample`), so that no time is spent waiting for it."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise SettingsError(f"threads={requested!r} is not a thread count.", "pass a positive integer, or None "
                                "to use the cores that are free.")
        return requested
    cores = available_cores()
    idle = (sample or IdleSample()).idle_cores()
    return cores if idle is None else min(cores, max(1, round(idle)))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[int]:
    """torch's intra-op threads set to ``count`` in the calling thread for the block, then put back.

    With torch's OpenMP backend the count is per thread (a thread created meanwhile starts from the
    last count set anywhere), so quantizations in different threads each keep their own.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)
