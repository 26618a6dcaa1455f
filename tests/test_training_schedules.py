"""Learning-rate multipliers: warmup from the first step, decay to zero at the end."""

from __future__ import annotations

import pytest

from tspo.training.schedules import linear_warmup, warmup_then_linear_decay


def test_linear_warmup_rises_to_one_and_stays():
    assert [linear_warmup(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert linear_warmup(0, 0) == 1.0


def test_warmup_then_linear_decay():
    assert warmup_then_linear_decay(0, 10, 100) == pytest.approx(0.1)
    assert warmup_then_linear_decay(9, 10, 100) == pytest.approx(0.91)
    assert warmup_then_linear_decay(50, 10, 100) == pytest.approx(0.5)
    assert warmup_then_linear_decay(99, 10, 100) == pytest.approx(0.01)
    assert warmup_then_linear_decay(0, 0, 100) == 1.0
