"""A process's resident memory, read from Linux's /proc: what the assembly's memory bound is measured with."""

from __future__ import annotations


def rss(field: str = "VmRSS") -> int:
    """This process's resident memory in KiB: `VmRSS` now, or `VmHWM`, its peak since the last `reset_peak()`."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def reset_peak() -> None:
    """Start `VmHWM` again from the current resident memory (/proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
