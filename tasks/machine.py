"""What else used the machine while a run timed itself: a speed metric is only worth comparing
when the run had its cores to itself.

`CoreShare` reads the machine's CPU counters (`/proc/stat`: every process's time, and the time
the hypervisor gave other guests, `steal`) and this process's own CPU time around a timed step;
what the machine spent beyond this process, over the step's wall time, is how many cores were
busy elsewhere. 0.0 is a run alone on its machine; 1.0 means one core's worth of other work
ran beside it. Where the counters cannot be read (not Linux), nothing is reported.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

SHARED_ABOVE = 0.25
"""Cores busy elsewhere above which a run's timings are not comparable with another's."""

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_seconds() -> float | None:
    """CPU seconds the machine has spent busy (every process, and stolen by other guests)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    values = [int(v) for v in fields[1:9]]
    busy = sum(values) - values[3] - values[4]
    return busy / _TICKS


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class CoreShare:
    """A timed step's view of the machine: `with CoreShare() as share: ...`, then
    `share.elsewhere` (cores busy with other work, on average) or None where unknown."""

    elsewhere: float | None = None
    wall_seconds: float = 0.0
    _start: tuple[float, float | None, float] = field(default=(0.0, None, 0.0), repr=False)

    def __enter__(self) -> CoreShare:
        self._start = (time.perf_counter(), _machine_busy_seconds(), _own_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0 = self._start
        busy1 = _machine_busy_seconds()
        self.wall_seconds = time.perf_counter() - wall0
        if busy0 is None or busy1 is None or self.wall_seconds <= 0:
            return
        others = (busy1 - busy0) - (_own_seconds() - own0)
        # Both counters advance in ticks (100 a second): up to two ticks of what they show can
        # be rounding, which a short step must not mistake for work elsewhere.
        self.elsewhere = round(max(0.0, others - 2 / _TICKS) / self.wall_seconds, 2)


def shared(elsewhere: float | None) -> bool:
    """Whether a step that saw `elsewhere` cores busy beside it shared its cores."""
    return elsewhere is not None and elsewhere > SHARED_ABOVE
