"""Process trees from /proc: a process and its descendants (the gateway's workers, its engine), with CPU times."""

from __future__ import annotations

import os
from pathlib import Path


def _stats() -> dict[int, list[str]]:
    """Each live process's /proc/PID/stat fields after the command name (which may hold spaces)."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it ended meanwhile
            found[int(entry.name)] = stat[stat.rindex(")") + 2 :].split()
    return found


def family(pid: int) -> set[int]:
    """`pid` and every process below it, as /proc shows them now."""
    parents = {member: int(fields[1]) for member, fields in _stats().items()}
    members, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, of in parents.items() if of == parent and child not in members]
        members.update(children)
        frontier.extend(children)
    return members


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and all its descendants."""
    stats = _stats()
    tick = os.sysconf("SC_CLK_TCK")
    return sum((int(stats[member][11]) + int(stats[member][12])) / tick for member in family(pid) if member in stats)
