"""How many intra-op threads torch uses when ``model.num_threads`` is not set.

torch's own default is one thread per physical core of the machine, for every process: the
ranks torchrun starts on one node each take every core, and data-loader worker processes
compete with them, so a node is oversubscribed by the number of processes. Spinning OpenMP
threads that wait for a core are far slower than fewer threads: ``examples/tiny.yaml`` ran at
262 tokens/s with torch's default on a 2-core machine whose other core was busy, and at 8,654
with one thread (issue 13). The default here keeps one core for everything that is not
the model's arithmetic (the checkpoint writer and staging threads, the data pipeline, the
OS: ``bench/bench_threads.py`` measured 1 thread at 2-5x the tokens/s of 2 on this 2-core
machine under load), divides the rest of the cores this process may use (its CPU affinity,
within a cgroup CPU quota) among the node's processes, and leaves one per data-loader
worker. It depends on the machine, never on the moment's load: the same machine
and launch give the same count, so the same summation order, on every restart (bit-exact
resume needs that). ``OMP_NUM_THREADS`` set by the user wins, as do ``model.num_threads``
and ``torch.set_num_threads`` in the user's own code.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def _cgroup_cpus() -> float | None:
    # cgroup v2: "max 100000" (no limit) or "<quota> <period>" in microseconds
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def physical_cores() -> int:
    """Cores this process may run on: distinct physical cores among its CPU affinity
    (hyperthread siblings counted once, from ``/sys/devices/system/cpu``), at most the cgroup
    CPU quota rounded up; ``os.cpu_count()`` where Linux's files are missing. At least 1."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo / "physical_package_id").read_text().strip()
                      + ":" + (topo / "core_id").read_text().strip())  # fmt: skip
        except OSError:
            cores.add(f"cpu{cpu}")
    count = len(cores) or len(cpus)
    quota = _cgroup_cpus()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def default_threads(processes_per_node: int = 1, loader_workers: int = 0) -> int:
    """``(physical_cores() - 1) // processes_per_node - loader_workers``, at least 1 (one
    core stays free for evertrain's other threads and the OS)."""
    usable = max(1, physical_cores() - 1)
    return max(1, usable // max(1, processes_per_node) - max(0, loader_workers))


def apply_threads(num_threads: int | None, loader_workers: int = 0) -> int:
    """Set torch's intra-op threads: ``num_threads`` if given, else torch's count when the
    user set ``OMP_NUM_THREADS``, else :func:`default_threads` for the node's processes
    (``LOCAL_WORLD_SIZE``, set by torchrun) and ``loader_workers``. Returns the count used."""
    if num_threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()  # torch read it at import
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        num_threads = default_threads(local, loader_workers)
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads
