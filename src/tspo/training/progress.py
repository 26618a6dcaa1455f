"""What a run tells its user while it works: progress with ETA, one line per step, and a warning when
training cannot learn anything.

On a terminal a tqdm bar shows progress and ETA (log records are routed through ``tqdm.write`` by the
trainer, so none glues onto the bar). Elsewhere (a log file, CI) a bar would be a stream of carriage
returns, so progress becomes plain log lines instead: every step for RL, every tenth of the way for
the warm start and evaluations.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)


class Progress:
    """A tqdm bar on a terminal, periodic log lines otherwise.

    Args:
        total: units of work.
        desc: what is being done ("train", "warm start", "eval before").
        unit: name of a unit ("step", "question").
        interactive: draw a bar (a terminal) instead of log lines.
        initial: units already done (a resumed run).
        enabled: ``False`` reports nothing (``trainer.progress=false``).
        log_every: without a bar, log a line every this many units (default: a tenth of the total).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        interactive: bool,
        *,
        initial: int = 0,
        enabled: bool = True,
        log_every: int | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = initial
        self.enabled = enabled
        self.log_every = max(1, log_every if log_every is not None else total // 10)
        self._start = time.perf_counter()
        self._initial = initial
        self._bar: Any = None
        if enabled and interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def eta_seconds(self) -> float | None:
        """Seconds left at the mean rate so far; None before the first unit."""
        done = self.done - self._initial
        if done <= 0:
            return None
        return (time.perf_counter() - self._start) / done * (self.total - self.done)

    def update(self, count: int = 1) -> None:
        self.advance(count)

    def advance(self, count: int = 1, *, postfix: str | None = None, line: str | None = None) -> None:
        """Count ``count`` units; ``postfix`` is shown on the bar, ``line`` logged (without a bar)."""
        self.done += count
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(count)
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            return
        # Log each time a multiple of log_every is crossed (updates may come in batches of any size).
        crossed = self.done // self.log_every > (self.done - count) // self.log_every
        if crossed or self.done >= self.total:
            eta = self.eta_seconds()
            text = line or f"{self.desc}: {self.done}/{self.total} {self.unit}s"
            if eta is not None and self.done < self.total and "ETA" not in text:
                text += f" (ETA {format_duration(eta)})"
            logger.info(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def step_line(step: int, total: int, metrics: dict[str, Any], eta_seconds: float | None = None) -> str:
    """One line per RL step: the numbers a user watches (reward, train EM, searches, groups without a
    learning signal, step time) and the ETA."""
    parts = [
        f"step {step}/{total}",
        f"reward {metrics.get('reward/mean', 0.0):.2f}",
        f"EM {metrics.get('outcome/mean', 0.0):.2f}",
        f"searches {metrics.get('rollout/searches_per_traj', 0.0):.2f}",
        f"answered {metrics.get('rollout/answered', 0.0):.0%}",
        f"zero-adv groups {metrics.get('groups/zero_advantage', 0.0):.0%}",
        f"{metrics.get('time/step', 0.0):.0f} s",
    ]
    if eta_seconds is not None and step < total:
        parts.append(f"ETA {format_duration(eta_seconds)}")
    return " | ".join(parts)


class NoSignalMonitor:
    """Warns once when ``steps`` consecutive steps had no learning signal.

    A step has none when every group drawn has zero advantage (all its rollouts got the same reward, or
    it was filtered out) or the gradient norm is exactly 0: the update then cannot change the policy.
    The warning names the likely cause, read from the step's metrics, and the setting to change.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.run = 0
        self.warned = False

    def observe(self, metrics: dict[str, Any], config: Any) -> str | None:
        """Feed one step's metrics; returns the warning text the first time the condition holds."""
        no_signal = metrics.get("groups/zero_advantage", 0.0) >= 1.0 or metrics.get("actor/grad_norm") == 0
        self.run = self.run + 1 if no_signal else 0
        if self.warned or self.steps <= 0 or self.run < self.steps:
            return None
        self.warned = True
        return no_signal_warning(self.run, metrics, config)


def no_signal_warning(steps: int, metrics: dict[str, Any], config: Any) -> str:
    """The warning text: what was seen, the likely cause and what to change."""
    answered = metrics.get("rollout/answered", 0.0)
    searches = metrics.get("rollout/searches_per_traj", 0.0)
    outcome = metrics.get("outcome/mean", 0.0)
    head = (
        f"no learning signal for {steps} steps in a row: in every group all rollouts got the same reward, "
        "so every advantage is 0 and the updates cannot change the model."
    )
    if answered == 0.0 and searches == 0.0:
        cause = (
            "The model never writes the protocol's tags (<search> ... </search> or <answer> ... </answer>): "
            "show it worked examples with rollout.protocol.examples=2 (and "
            "rollout.protocol.use_chat_template=false for a small model), or warm-start it on "
            "demonstrations with warmstart.steps=N."
        )
    elif outcome == 0.0:
        cause = (
            f"No rollout answers correctly ({answered:.0%} answer at all, {searches:.2f} searches each): "
            "make the task easier (data.world.hops=1:1, rollout.topk), sample more "
            "(trainer.group_size, rollout.temperature) or add worked examples (rollout.protocol.examples)."
        )
    elif outcome >= 1.0:
        cause = "Every rollout is already right: use harder questions (data.world.hops) or stop training."
    else:
        cause = (
            "Rollouts of one question all agree: raise rollout.temperature or trainer.group_size, "
            f"or check reward.metric={getattr(getattr(config, 'reward', None), 'metric', '?')}."
        )
    return f"{head} {cause}"
