"""Learning-rate multipliers shared by the RL trainer and the supervised warm start."""

from __future__ import annotations


def linear_warmup(step: int, warmup_steps: int) -> float:
    """Multiplier rising linearly to 1 over ``warmup_steps`` (step 0 already gets 1/warmup_steps)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def warmup_then_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """:func:`linear_warmup`, times a linear decay that reaches 0 after ``total_steps``."""
    return linear_warmup(step, warmup_steps) * (1.0 - step / max(1, total_steps))
