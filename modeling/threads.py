"""How many CPU threads this process should use by default.

`os.cpu_count()` is the host's core count; a process may be allowed fewer:
its CPU affinity (taskset, cpuset) and, in a container, the cgroup CPU quota
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`). More
intra-op threads than usable CPUs make every parallel region wait for a
thread that is not running (a quota-throttled or descheduled one), which is
much slower than fewer threads. The quota rounds down (1.5 CPUs: 1 thread), as
Go's automaxprocs does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CPUBudget:
    affinity: int  # CPUs in the affinity mask
    quota: float | None  # cgroup CPU quota in CPUs (None: no quota)

    @property
    def threads(self) -> int:
        n = self.affinity if self.quota is None else min(self.affinity, math.floor(self.quota))
        return max(1, n)

    def describe(self) -> str:
        q = "no cgroup CPU quota" if self.quota is None else f"cgroup quota {self.quota:g} CPUs"
        return f"{self.affinity} CPUs in the affinity mask, {q}"


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller ("" for cgroup v2) -> the process's cgroup path."""
    out: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for ctrl in (parts[1].split(",") if parts[1] else [""]):
            out[ctrl] = parts[2]
    return out


def _walk_up(root: Path, rel: str):
    """root/rel, then each parent up to root (a limit anywhere above applies too)."""
    p = root / rel.lstrip("/")
    while True:
        yield p
        if p == root or root not in p.parents:
            return
        p = p.parent


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The tightest CPU quota (in CPUs) of this process's cgroup and its parents;
    None when there is none (or no cgroup file system)."""
    root, paths = Path(root), _cgroup_paths(Path(proc_cgroup))
    limits: list[float] = []
    if "" in paths:  # cgroup v2: "max 100000" or "150000 100000"
        for d in _walk_up(root, paths[""]):
            try:
                quota, period = (d / "cpu.max").read_text().split()[:2]
            except (OSError, ValueError):
                continue
            if quota != "max" and float(period) > 0:
                limits.append(float(quota) / float(period))
    rel = paths.get("cpu")  # cgroup v1: cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us
    if rel is not None:
        for base in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
            for d in _walk_up(base, rel):
                try:
                    quota = int((d / "cpu.cfs_quota_us").read_text())
                    period = int((d / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                if quota > 0 and period > 0:
                    limits.append(quota / period)
    return min(limits) if limits else None


def cpu_budget() -> CPUBudget:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    return CPUBudget(affinity, cgroup_cpu_quota())
