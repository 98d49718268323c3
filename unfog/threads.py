"""CPU threads for a generation, chosen so that unfog degrades gracefully on a busy machine.

torch runs its operators on an OpenMP team of one thread per core, and OpenMP threads spin at
every barrier. When another process keeps a core busy, one of unfog's threads keeps losing that
core and the others spin waiting for it at each of the thousands of barriers of an image:
measured on a 2-core machine, the bundled model's image took 0.86 s alone and 5.1 s beside one
busy process. With one thread fewer than the cores taken by others, the team never waits for a
descheduled member.

`fit_threads()` is called at the start of each generation on a CPU. It reads how much CPU time
other processes used since the last call (from /proc/stat, minus this process's own time from
/proc/self/stat: nothing is slept or sampled, so it costs microseconds) and sets torch's thread
count to the cores left (at least 1, at most the cores this process may use). It leaves the
count alone when the user chose one: OMP_NUM_THREADS in the environment, UNFOG_THREADS=fixed,
or a torch.set_num_threads call of their own (a count other than the one set here last).
"""

from __future__ import annotations

import os
import time

import torch

_state: dict = {"last_set": None, "sample": None, "initial": torch.get_num_threads()}  # torch's own choice, at import


def _cpu_times() -> tuple[float, float, float] | None:
    """(busy seconds of all CPUs, this process's CPU seconds, wall seconds), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / tick  # user … steal, not guest (already in user)
    mine = (int(own[11]) + int(own[12])) / tick  # utime + stime (fields 14, 15 of proc(5))
    return busy, mine, time.monotonic()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def other_load() -> float | None:
    """Cores' worth of CPU time other processes used since the previous call (None the first time)."""
    now = _cpu_times()
    before, _state["sample"] = _state["sample"], now
    if now is None or before is None or now[2] - before[2] < 0.05:
        return None
    return max(0.0, ((now[0] - before[0]) - (now[1] - before[1])) / (now[2] - before[2]))


def fit_threads() -> int:
    """Set torch's CPU thread count for the next generation (see the module docstring); returns it."""
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("UNFOG_THREADS") == "fixed":
        return torch.get_num_threads()
    current = torch.get_num_threads()
    if current != (_state["last_set"] or _state["initial"]):
        return current  # the user set their own count
    load = other_load()
    if load is None:
        return current
    threads = max(1, min(_state["initial"], available_cores() - int(load + 0.5)))
    if threads != current:
        torch.set_num_threads(threads)
    _state["last_set"] = threads
    return threads


_state["sample"] = _cpu_times()  # the first sample, at import: the first generation already sees what else runs
