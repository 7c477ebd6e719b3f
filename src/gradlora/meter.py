"""Wall time and peak memory of a phase: CUDA's max_memory_allocated, or the process's RSS peak.

Phases nest (``initialize`` measures its capture and SVD inside a caller's measurement): both
metrics are high-water marks that a phase resets when it begins, so before each reset the
peak so far is handed to every enclosing phase, whose own peak therefore covers its inner ones.
"""

from __future__ import annotations

import re
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class PhaseCost:
    seconds: float = 0.0  # wall time of the phase
    peak_bytes: int = 0  # peak memory during the phase (see `metric`)
    start_bytes: int = 0  # memory in use when the phase began, same metric
    metric: str = ""  # "cuda_max_allocated" or "rss_peak" (process RSS high-water mark)

    @property
    def increase_bytes(self) -> int:
        """How much the phase added on top of what was in use when it began."""
        return max(self.peak_bytes - self.start_bytes, 0)


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    kb = _read_status_kb("VmHWM")
    if kb is None:  # no /proc: ru_maxrss is the whole process's peak (kB on Linux)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


_open: list[tuple[PhaseCost, str]] = []  # phases being measured, outermost first, and _kind


def _kind(device: torch.device) -> str:
    """What a high-water mark belongs to: one CUDA device, or the host process."""
    return f"cuda:{device.index or 0}" if device.type == "cuda" else "host"


def _peak_now(device: torch.device) -> int:
    """The high-water mark since the last reset: CUDA's max allocated, or the RSS peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _rss_peak_bytes()


def _hand_peak_outward(device: torch.device) -> None:
    """Before a reset: raise each enclosing phase's peak (same kind of device) to the mark so
    far, which the reset is about to forget."""
    outer = [cost for cost, kind in _open if kind == _kind(device)]
    if outer:
        peak = _peak_now(device)
        for cost in outer:
            cost.peak_bytes = max(cost.peak_bytes, peak)


@contextmanager
def measure(device: torch.device):
    """Measure the enclosed block; yields a PhaseCost filled in when the block ends.

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` after a reset; elsewhere it is the
    process's resident-set high-water mark, reset first where Linux allows it (otherwise the
    peak since process start, an upper bound). Measurements nest: an enclosing phase's peak
    includes the peaks of the phases measured inside it (module docstring).
    """
    cost = PhaseCost()
    _hand_peak_outward(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cost.metric = "cuda_max_allocated"
        cost.start_bytes = torch.cuda.memory_allocated(device)
    else:
        cost.metric = "rss_peak" if _reset_rss_peak() else "rss_peak_since_start"
        cost.start_bytes = (_read_status_kb("VmRSS") or 0) * 1024
    start = time.perf_counter()
    _open.append((cost, _kind(device)))
    try:
        yield cost
    finally:
        del _open[next(i for i, (c, _) in enumerate(_open) if c is cost)]
        cost.peak_bytes = max(cost.peak_bytes, _peak_now(device))
        cost.seconds = time.perf_counter() - start
