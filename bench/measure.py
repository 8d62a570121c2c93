"""What the benchmark reads from the kernel, and small statistics helpers.

Everything comes from ``/proc`` so no agent runs inside the measured server and
every peer is measured the same way, whatever it is written in:

* resident memory: ``VmRSS`` of ``/proc/PID/status``, summed over the server's
  process tree (nginx master + worker, a uvicorn process, ...);
* CPU: time on CPU of every thread (``/proc/PID/task/*/schedstat``, in ns;
  the same quantity as ``utime + stime`` of ``/proc/PID/stat`` without its
  10 ms tick granularity), summed over the tree;
* kernel memory: ``Slab`` of ``/proc/meminfo``. It is machine-wide and includes
  both ends of every loopback connection, which is why it is reported apart
  from the server's own RSS.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (by scanning ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def rss_kib(pids: Sequence[int]) -> int:
    """Sum of VmRSS (KiB) over ``pids``; vanished processes count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def pss_kib(pids: Sequence[int]) -> int:
    """Sum of proportional set size (KiB) over ``pids``.

    Processes forked from one parent (``tidings serve --workers``) share their
    parent's pages until they write them, and each one's RSS counts those pages
    in full, so a sum of RSS overstates the tree; PSS splits shared pages among
    their sharers and sums to what the tree really occupies.
    """
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def open_files(pid: int) -> int:
    """Open file descriptors of ``pid`` (0 if it is gone): its connections, plus a few."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def accepted_connections(pids: Sequence[int], port: int) -> list[int]:
    """Per pid, its established TCP connections whose local port is ``port``.

    Open files alone overcount: a worker also holds its Redis connections,
    whose number grows with concurrent requests. So: the inodes of established
    sockets on ``port`` (``/proc/net/tcp``), matched against each pid's fds.
    """
    inodes: set[bytes] = set()
    with open("/proc/net/tcp", "rb") as f:
        next(f)
        for line in f:
            fields = line.split(None, 10)
            if fields[3] == b"01" and int(fields[1].rsplit(b":", 1)[1], 16) == port:
                inodes.add(fields[9])
    counts = []
    for pid in pids:
        n = 0
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1].encode() in inodes:
                n += 1
        counts.append(n)
    return counts


def listening_sockets(port: int) -> int:
    """IPv4 sockets in LISTEN on ``port``: one per ``SO_REUSEPORT`` worker that is up."""
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)  # header
        for line in f:
            fields = line.split(None, 4)
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) consumed so far by ``pids``, all their threads.

    Read from ``/proc/PID/task/TID/schedstat`` (nanoseconds on CPU) because
    ``utime + stime`` in ``/proc/PID/stat`` count whole clock ticks (10 ms), too
    coarse for a quick run whose fan-out costs about 100 ms. Falls back to
    ``/proc/PID/stat`` where schedstat is missing.
    """
    total = 0.0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        if os.path.exists(f"/proc/{pid}/task/{pid}/schedstat"):
            ns = 0
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                        ns += int(f.read().split()[0])
                except OSError:
                    continue  # the thread ended meanwhile
            total += ns / 1e9
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def slab_kib() -> int:
    """Kernel slab memory (KiB), machine-wide."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    return 0


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (``nan`` if empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])
