"""The phase meter: peaks of nested phases reach the enclosing phase."""

from __future__ import annotations

import pytest
import torch

from gradlora import meter


def test_nested_phase_peak_reaches_the_outer_phase():
    """An inner phase resets the high-water mark when it begins; the outer phase's peak must
    still include a peak reached before that reset (here: a 256 MiB tensor touched and freed)."""
    if not meter._reset_rss_peak():
        pytest.skip("this kernel cannot reset the RSS high-water mark")
    cpu = torch.device("cpu")
    size = 256 * 2**20
    with meter.measure(cpu) as outer:
        big = torch.ones(size // 4)  # touched: resident
        del big
        with meter.measure(cpu) as inner:
            pass
    assert outer.peak_bytes - outer.start_bytes >= 0.9 * size
    assert inner.peak_bytes - inner.start_bytes < 0.5 * size
    assert meter._open == []


def test_a_phase_that_raises_is_closed():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError), meter.measure(cpu) as cost:
        raise ValueError("boom")
    assert meter._open == [] and cost.peak_bytes > 0 and cost.seconds >= 0
