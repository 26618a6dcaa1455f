"""``tspo algo-demo``: the per-turn rewards and advantages of each algorithm on hand-built groups, so a
reader sees what TSPO does differently from GRPO and RLOO. Each series is a row of the algorithm table
(:mod:`tspo.algorithms.table`), run exactly as the trainer runs it (its estimator, options and FOLR)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tspo.algorithms import AdvantageInputs


@dataclass(frozen=True)
class DemoTrajectory:
    """A hand-built trajectory: how many turns, the first turn whose retrieved text held the answer
    (0-based, None for none) and the outcome o."""

    num_turns: int
    first_hit: int | None
    outcome: float


@dataclass(frozen=True)
class DemoGroup:
    title: str
    trajectories: tuple[DemoTrajectory, ...]


DEMO_GROUPS = (
    DemoGroup(
        "all wrong: a near miss among complete failures",
        (
            DemoTrajectory(num_turns=3, first_hit=1, outcome=0.0),
            DemoTrajectory(num_turns=3, first_hit=None, outcome=0.0),
            DemoTrajectory(num_turns=3, first_hit=None, outcome=0.0),
            DemoTrajectory(num_turns=3, first_hit=None, outcome=0.0),
        ),
    ),
    DemoGroup(
        "mixed: every category once",
        (
            DemoTrajectory(num_turns=2, first_hit=0, outcome=1.0),
            DemoTrajectory(num_turns=1, first_hit=None, outcome=1.0),
            DemoTrajectory(num_turns=3, first_hit=1, outcome=0.0),
            DemoTrajectory(num_turns=3, first_hit=None, outcome=0.0),
        ),
    ),
    DemoGroup(
        "all right: answers backed by retrieval and lucky guesses",
        (
            DemoTrajectory(num_turns=3, first_hit=1, outcome=1.0),
            DemoTrajectory(num_turns=2, first_hit=0, outcome=1.0),
            DemoTrajectory(num_turns=2, first_hit=None, outcome=1.0),
            DemoTrajectory(num_turns=1, first_hit=None, outcome=1.0),
        ),
    ),
)

# (label, algorithm-table name). The baselines run as the trainer runs them: no FOLR, so R = o.
SERIES: tuple[tuple[str, str], ...] = (
    ("grpo (R = o)", "grpo"),
    ("rloo (R = o)", "rloo"),
    ("tspo traj", "tspo_traj"),
    ("tspo legacy", "tspo_legacy"),
    ("tspo turn", "tspo_turn"),
    ("tspo adaptive", "tspo"),
)

_GENERATED_PER_TURN = 4
_OBSERVED_PER_TURN = 3

NOTES = """\
What to look at (tspo = TSPO v2, our reconstruction of the paper's stage-aware advantage; legacy = v1):
- All wrong: GRPO and RLOO see four equal outcomes, so every advantage is 0 and the near miss's good
  search is thrown away. FOLR pays the near miss alpha on the turn whose retrieved text held the answer;
  the group is outcome-homogeneous, so adaptive TSPO gives stage advantages: the near miss's turns up to
  the hit (the retrieval stage) are credited, its answer turn (which had the answer in view and still
  missed) gives that credit back, and a complete failure is blamed for its searches while its answer
  turn gets exactly 0. Legacy blamed every failure's answer turn merely because another rollout had a hit.
- Mixed: outcomes differ, so adaptive TSPO uses trajectory-level advantages on R (GRPO + FOLR); the
  ranking is complete success > success without retrieval > near miss > complete failure.
- All right: GRPO and RLOO again see no difference. TSPO credits the searches that found the answer
  and never pushes a correct answer down (answer-stage advantage 0). Legacy pushed every answer turn
  down (G = o lacks alpha while mean R holds it): that is why v1 was replaced."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "algo-demo",
        help="show per-turn rewards and advantages of GRPO, RLOO and TSPO on hand-built groups",
        description=(
            "Print, for three hand-built groups (all wrong with a near miss, mixed, all right), each "
            "trajectory's per-turn FOLR rewards and the per-turn advantages under grpo, rloo and tspo "
            "(traj, legacy v1, turn, adaptive)."
        ),
    )
    parser.add_argument("--alpha", type=float, default=0.3, help="FOLR reward alpha in [0, 1) (default 0.3)")
    parser.add_argument(
        "--gamma", type=float, default=1.0, help="TSPO legacy turn discount in (0, 1] (default 1.0)"
    )
    parser.add_argument(
        "--reclaim", type=float, default=1.0, help="TSPO beta: credit a wrong answer gives back (default 1)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tspo.errors import CLIError

    if not 0.0 <= args.alpha < 1.0:
        raise CLIError(f"--alpha must be in [0, 1) so a near miss ranks below a success, got {args.alpha}")
    if not 0.0 < args.gamma <= 1.0:
        raise CLIError(f"--gamma must be in (0, 1], got {args.gamma}")
    if not args.reclaim >= 0.0:
        raise CLIError(f"--reclaim must be >= 0, got {args.reclaim}")
    print(demo_report(DEMO_GROUPS, alpha=args.alpha, gamma=args.gamma, reclaim=args.reclaim))
    return 0


def demo_inputs(groups: tuple[DemoGroup, ...], alpha: float) -> AdvantageInputs:
    """All groups in one batch (group ids 0, 1, ...), with a token layout of generated and observed tokens
    per turn, so the demo runs the estimators exactly as the trainer does."""
    import torch

    from tspo.algorithms import AdvantageInputs
    from tspo.rewards import turn_rewards

    trajectories = [traj for group in groups for traj in group.trajectories]
    max_turns = max(traj.num_turns for traj in trajectories)
    per_turn = _GENERATED_PER_TURN + _OBSERVED_PER_TURN
    length = max_turns * per_turn
    rewards = torch.zeros(len(trajectories), max_turns, dtype=torch.float64)
    token_turn_index = torch.full((len(trajectories), length), -1, dtype=torch.long)
    loss_mask = torch.zeros(len(trajectories), length)
    for row, traj in enumerate(trajectories):
        rewards[row, : traj.num_turns] = torch.tensor(
            turn_rewards(traj.num_turns, traj.first_hit, traj.outcome, alpha), dtype=torch.float64
        )
        for turn in range(traj.num_turns):
            start = turn * per_turn
            observed = 0 if turn == traj.num_turns - 1 else _OBSERVED_PER_TURN  # the answer turn has none
            token_turn_index[row, start : start + _GENERATED_PER_TURN + observed] = turn
            loss_mask[row, start : start + _GENERATED_PER_TURN] = 1.0
    return AdvantageInputs(
        first_hit_turn=torch.tensor([-1 if t.first_hit is None else t.first_hit for t in trajectories]),
        folr=torch.tensor(
            [alpha if t.first_hit is not None else 0.0 for t in trajectories], dtype=torch.float64
        ),
        outcome=torch.tensor([traj.outcome for traj in trajectories], dtype=torch.float64),
        turn_rewards=rewards,
        turn_mask=torch.arange(max_turns)[None, :]
        < torch.tensor([t.num_turns for t in trajectories])[:, None],
        token_turn_index=token_turn_index,
        loss_mask=loss_mask,
        group_index=torch.tensor([g for g, group in enumerate(groups) for _ in group.trajectories]),
    )


def demo_report(
    groups: tuple[DemoGroup, ...], alpha: float = 0.3, gamma: float = 1.0, reclaim: float = 1.0
) -> str:
    """The demo's text: one aligned table per group, then notes."""
    from tspo.algorithms import compute_advantages, resolve_algorithm
    from tspo.rewards import trajectory_category

    with_folr = demo_inputs(groups, alpha)
    outcome_only = demo_inputs(groups, 0.0)
    series = []
    adaptive_turn_level = None
    for label, name in SERIES:
        algorithm = resolve_algorithm(name)
        options = dict(algorithm.estimator_options)
        if algorithm.estimator == "tspo":
            options.update({"gamma": gamma} if options["mode"] == "legacy" else {"reclaim": reclaim})
        output = compute_advantages(
            algorithm.estimator, with_folr if algorithm.pays_folr else outcome_only, **options
        )
        series.append((label, output.turn_advantages))
        if name == "tspo":
            adaptive_turn_level = output.turn_level
    assert adaptive_turn_level is not None

    max_turns = with_folr.turn_mask.shape[1]
    name_width, series_width, cell = 36, 15, 8
    header = f"{'trajectory':<{name_width}}{'':<{series_width}}" + "".join(
        f"{f'turn {k + 1}':>{cell}}" for k in range(max_turns)
    )
    rule = "-" * len(header)
    lines = [
        "Per-turn rewards r_k and advantages A_k of each algorithm "
        f"(FOLR alpha = {alpha:g}, TSPO reclaim = {reclaim:g}, legacy gamma = {gamma:g}, eps = 1e-6).",
        "R = sum of r_k = o + alpha if the answer appeared in a retrieved observation (FOLR).",
    ]
    row = 0
    for number, group in enumerate(groups, start=1):
        mode = "stage" if bool(adaptive_turn_level[row]) else "trajectory-level"
        reason = "all outcomes equal" if mode == "stage" else "outcomes differ"
        lines += ["", f"Group {number}: {group.title}", f"adaptive TSPO uses {mode} advantages ({reason})"]
        lines += [rule, header, rule]
        for member, traj in enumerate(group.trajectories, start=1):
            turns = traj.num_turns
            category = trajectory_category(traj.first_hit is not None, traj.outcome).replace("_", " ")
            hit = "no hit" if traj.first_hit is None else f"hit turn {traj.first_hit + 1}"
            total = float(with_folr.turn_rewards[row].sum())
            names = [f"{member}. {category}", f"   {hit}, o = {traj.outcome:g}, R = {total:.2f}"]
            values = [("reward r_k", with_folr.turn_rewards[row], False)]
            values += [(label, advantages[row], True) for label, advantages in series]
            for line_number, (label, vector, signed) in enumerate(values):
                name = names[line_number] if line_number < len(names) else ""
                cells = "".join(
                    f"{float(vector[k]):>+{cell}.2f}" if signed else f"{float(vector[k]):>{cell}.2f}"
                    for k in range(turns)
                )
                lines.append(f"{name:<{name_width}}{label:<{series_width}}{cells}".rstrip())
            lines.append("")
            row += 1
        lines.pop()
        lines.append(rule)
    lines += ["", NOTES]
    return "\n".join(lines)
