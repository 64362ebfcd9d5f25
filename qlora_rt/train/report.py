"""Small shared pieces for what users read at the end of a job: a two-column table, peak memory."""

from __future__ import annotations

import resource
import sys

import torch


def table(title: str, rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 20)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def peak_rss_mib() -> float:
    """Peak resident memory of this process. On Linux its VmHWM: getrusage's ru_maxrss carries the parent's
    peak across fork and exec, so a bench's child that its parent outgrew would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB, macOS bytes
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB GPU, {peak_rss_mib():,.0f} MiB RSS"
    return f"{peak_rss_mib():,.0f} MiB RSS"
