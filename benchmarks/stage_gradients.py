"""Gradient norm by stage (issue 16, item 5): where each algorithm's learning signal goes on one batch.

The SmolLM2 learning benchmark's setting (``learning_smollm2.py``: its preset, settings and trainer),
per seed: the trainer at the shared start (pretrained weights) draws step 1's rollouts exactly as a run
would (same weights and seed, so the same rollouts for every algorithm) and scores them. Then, for each
algorithm, on that same batch: its own scores (FOLR paid or not) and advantages (the algorithm table's
estimator and options, as the trainer computes them), split by TSPO's stages (``stage_masks``: the
retrieval stage is every turn up to and including the first hit, the answer stage every later turn; the
stages describe the trajectory, not the algorithm), and the gradient at the start weights of the
algorithm's policy loss restricted to each stage's tokens: ``||g_ret||``, ``||g_ans||``, ``||g_all||``
and ``cos(g_ret, g_ans)``, for all trajectories and for near misses only (answer retrieved, final answer
wrong).

A restriction zeroes the advantages outside its tokens and keeps everything else, the normaliser
included (the whole batch's generated tokens for ``token-mean``), so the parts add up to the whole
gradient. The gradient is the trainer's own update (:func:`tspo.training.update.policy_update`, one
on-policy pass) with an optimizer that does not step, no KL and no entropy term (the policy loss alone;
the preset has ``kl_coef`` 0 anyway) and no gradient clipping. At the start weights every ratio is 1, so
the clipped loss is linear in the advantages there, for ``token_clip`` and ``seq_clip`` alike. Once per
invocation (``--check``) the whole gradient is also computed in one pass and compared with the sum of the
parts. A part whose advantages are all 0 is not run (its gradient is 0), and an algorithm whose advantages
and loss settings equal an earlier one's on the batch takes its gradients (``gradients_as`` in the JSON).

Also per algorithm: the advantage mass (sum of |A| over tokens) per stage, and the share of trajectories
whose group got stage-level (turn-level) advantages (TSPO's estimators only).

DSPO is measured on the same batch as the others; in its own run, its group filter would have replaced
groups without outcome spread by newly drawn ones (their advantages are 0 here, but they count in the
normaliser).

    nice -n 5 python benchmarks/stage_gradients.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from learning_smollm2 import BASELINE, PRESET, SETTINGS, _config, _new_trainer
from tspo.algorithms import AdvantageInputs, broadcast_turn_advantages, compute_advantages, stage_masks
from tspo.rewards import TrajectoryCategory
from tspo.scoring import TrajectoryScore, advantage_inputs
from tspo.training.update import UpdateSettings, policy_update
from tspo.trajectory import TrajectoryBatch, collate_trajectories

DEFAULT_ALGORITHMS = ["tspo", "tspo_turn", "tspo_legacy", "grpo", "dspo"]
STAGES = ("retrieval", "answer")
SUBSETS = ("all", "near_miss")
#: Elements per chunk of the float64 reductions over a flattened gradient (8 MB per chunk).
_CHUNK = 1 << 20

Progress = Callable[[str], None]


# ------------------------------------------------------------------------------------- stages and masks


def token_stage_masks(inputs: AdvantageInputs) -> dict[str, torch.Tensor]:
    """TSPO's two stages at token level.

    The turn masks of :func:`tspo.algorithms.stage_masks` (first hit: ``inputs.first_hit_turn``) given to
    each generated token of their turn by :func:`tspo.algorithms.broadcast_turn_advantages`.

    Returns:
        ``{"retrieval": (B, L), "answer": (B, L)}``, float 0/1, disjoint; their sum is the loss mask.
    """
    if inputs.first_hit_turn is None:
        raise ValueError("the stages need AdvantageInputs.first_hit_turn (tspo.scoring.advantage_inputs)")
    turn_masks = stage_masks(inputs, inputs.first_hit_turn)
    return {
        stage: broadcast_turn_advantages(
            mask.to(torch.float32), inputs.turn_mask, inputs.token_turn_index, inputs.loss_mask.float()
        )
        for stage, mask in zip(STAGES, turn_masks, strict=True)
    }


def near_miss_rows(scores: Sequence[TrajectoryScore]) -> torch.Tensor:
    """(B,) bool: the trajectories scored as near misses (answer retrieved, final answer wrong)."""
    return torch.tensor([s.category == TrajectoryCategory.NEAR_MISS.value for s in scores], dtype=torch.bool)


def restrict(
    advantages: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Advantages kept on some tokens, 0 elsewhere.

    Args:
        advantages: (B, L) float.
        tokens: (B, L) 0/1 (float or bool), the tokens to keep.
        rows: (B,) bool, the trajectories to keep; None keeps every row.

    Returns:
        (B, L), the dtype of ``advantages``.
    """
    keep = tokens.bool()
    if rows is not None:
        keep = keep & rows[:, None]
    return torch.where(keep, advantages, torch.zeros_like(advantages))


def advantage_mass(
    advantages: torch.Tensor, stages: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None
) -> dict[str, float]:
    """Sum of |A| over the tokens of each stage (of ``rows`` only, when given).

    Args:
        advantages: (B, L) float.
        stages: stage name -> (B, L) 0/1 token mask.
        rows: (B,) bool or None.
    """
    return {stage: float(restrict(advantages, mask, rows).abs().sum()) for stage, mask in stages.items()}


def rows_with_signal(
    advantages: torch.Tensor, stages: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None
) -> dict[str, int]:
    """Number of trajectories with a non-zero advantage on some token of each stage (of ``rows``).

    Args:
        advantages: (B, L) float.
        stages: stage name -> (B, L) 0/1 token mask.
        rows: (B,) bool or None.
    """
    return {
        stage: int(restrict(advantages, mask, rows).ne(0).any(dim=1).sum()) for stage, mask in stages.items()
    }


# ------------------------------------------------------------------------------------------- gradients


class _NoStep(torch.optim.SGD):
    """An optimizer that never moves the weights: :func:`policy_update` leaves its gradients to be read."""

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


def gradient_settings(settings: UpdateSettings) -> UpdateSettings:
    """The update's settings for the gradient of the policy loss alone: one on-policy pass, no KL, no
    entropy term and no clipping of the gradient norm (everything else, the loss and its aggregation
    included, as the run has it)."""
    return dataclasses.replace(settings, kl_coef=0.0, entropy_coef=0.0, epochs=1, grad_clip=math.inf)


def policy_gradient(
    model: torch.nn.Module, batch: TrajectoryBatch, advantages: torch.Tensor, settings: UpdateSettings
) -> torch.Tensor:
    """Gradient of the policy loss at the current weights, from the trainer's own update.

    Args:
        batch: B trajectories, response length L.
        advantages: (B, L) token advantages, 0 off the loss mask.
        settings: the run's update settings (see :func:`gradient_settings` for what is changed).

    Returns:
        (P,) float32: the gradient flattened over the trainable parameters, in ``model.parameters()``
        order. The weights are unchanged and their ``.grad`` cleared.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    policy_update(model, _NoStep(params, lr=0.0), batch, None, advantages, gradient_settings(settings))
    # Copied parameter by parameter, each .grad freed once copied: the model's gradients and the flat
    # copy are not both held in full (a P-sized vector is 0.5 GB for SmolLM2-135M).
    flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32)
    offset = 0
    for p in params:
        part = flat[offset : offset + p.numel()]
        if p.grad is None:
            part.zero_()
        else:
            part.copy_(p.grad.detach().flatten())
        offset += p.numel()
        p.grad = None
    return flat


def stage_gradients(
    model: torch.nn.Module,
    batch: TrajectoryBatch,
    advantages: torch.Tensor,
    stages: Mapping[str, torch.Tensor],
    near_miss: torch.Tensor,
    settings: UpdateSettings,
    progress: Progress = print,
) -> dict[str, dict[str, torch.Tensor | None]]:
    """The policy-loss gradient restricted to each stage's tokens, over all rows and over near misses.

    A part whose advantages are all 0 is not run (its gradient is exactly 0: None), and a part whose
    advantages equal an earlier part's (near misses that are the only rows with signal) reuses its
    gradient. A pass runs only the rows with a non-zero advantage (:func:`tspo.training.update.rows_to_update`).

    Args:
        advantages: (B, L) token advantages.
        stages: stage name -> (B, L) 0/1 token mask.
        near_miss: (B,) bool.

    Returns:
        ``{"all": {stage: (P,) or None}, "near_miss": {stage: (P,) or None}}``.
    """
    computed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def gradient(part: torch.Tensor, label: str) -> torch.Tensor | None:
        if not bool(part.ne(0).any()):
            return None
        for seen, vector in computed:
            if torch.equal(seen, part):
                return vector
        progress(f"{label} ({int(part.ne(0).any(dim=1).sum())} rows)")
        vector = policy_gradient(model, batch, part, settings)
        computed.append((part, vector))
        return vector

    result: dict[str, dict[str, torch.Tensor | None]] = {subset: {} for subset in SUBSETS}
    for stage, tokens in stages.items():
        result["all"][stage] = gradient(restrict(advantages, tokens), f"{stage} stage, all trajectories")
        result["near_miss"][stage] = gradient(
            restrict(advantages, tokens, near_miss), f"{stage} stage, near misses"
        )
    return result


def _chunked_sum(
    function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor
) -> float:
    """``sum(function(a, b))`` over two (P,) vectors in float64, chunk by chunk (no P-sized float64 copy)."""
    total = 0.0
    for start in range(0, a.numel(), _CHUNK):
        total += float(function(a[start : start + _CHUNK].double(), b[start : start + _CHUNK].double()).sum())
    return total


def dot(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Dot product of two (P,) vectors, accumulated in float64; None is the zero vector."""
    return 0.0 if a is None or b is None else _chunked_sum(torch.mul, a, b)


def distance_to_sum(vector: torch.Tensor, parts: Sequence[torch.Tensor]) -> float:
    """L2 distance of a (P,) vector to the sum of (P,) ``parts`` (none: the zero vector), accumulated in
    float64 chunk by chunk (the sum is never held in full)."""
    total = 0.0
    for start in range(0, vector.numel(), _CHUNK):
        chunk = vector[start : start + _CHUNK].double()
        for part in parts:
            chunk = chunk - part[start : start + _CHUNK].double()
        total += float(chunk.square().sum())
    return math.sqrt(total)


def split_statistics(retrieval: torch.Tensor | None, answer: torch.Tensor | None) -> dict[str, float | None]:
    """Norms of two stage gradients (P,) (None: zero), of their sum, and their cosine (None when either
    is 0)."""
    ret_sq, ans_sq = dot(retrieval, retrieval), dot(answer, answer)
    cross = dot(retrieval, answer)
    ret, ans = math.sqrt(ret_sq), math.sqrt(ans_sq)
    return {
        "grad_retrieval": ret,
        "grad_answer": ans,
        "grad_all": math.sqrt(max(0.0, ret_sq + ans_sq + 2 * cross)),
        "cos": cross / (ret * ans) if ret > 0 and ans > 0 else None,
    }


def gradient_statistics(
    model: torch.nn.Module,
    batch: TrajectoryBatch,
    advantages: torch.Tensor,
    stages: Mapping[str, torch.Tensor],
    near_miss: torch.Tensor,
    settings: UpdateSettings,
    check: bool,
    progress: Progress = print,
) -> dict[str, Any]:
    """Stage-gradient statistics of one algorithm's advantages on ``batch``, all rows and near misses.

    Args:
        advantages: (B, L) token advantages.
        stages: stage name -> (B, L) 0/1 token mask.
        near_miss: (B,) bool.
        check: also compute the whole gradient in one pass and report its distance to the sum of the
            stage parts, relative to its norm (``sum_check``).

    Returns:
        ``{"all": {...}, "near_miss": {...}}`` of :func:`split_statistics`, plus ``sum_check`` when asked.
    """
    gradients = stage_gradients(model, batch, advantages, stages, near_miss, settings, progress)
    result: dict[str, Any] = {
        subset: split_statistics(gradients[subset]["retrieval"], gradients[subset]["answer"])
        for subset in SUBSETS
    }
    parts = [g for g in gradients["all"].values() if g is not None]
    del gradients  # the near-miss parts are not needed any more (memory)
    if check:
        rows = int(advantages.ne(0).any(dim=1).sum())
        progress(f"whole gradient in one pass, to check the sum ({rows} rows)")
        whole = policy_gradient(model, batch, advantages, settings)
        norm = math.sqrt(dot(whole, whole))
        error = distance_to_sum(whole, parts)
        result["sum_check"] = {"grad_all_direct": norm, "relative_error": error / norm if norm > 0 else error}
    return result


def algorithm_report(
    model: torch.nn.Module,
    batch: TrajectoryBatch,
    inputs: AdvantageInputs,
    advantages: torch.Tensor,
    turn_level: torch.Tensor | None,
    near_miss: torch.Tensor,
    settings: UpdateSettings,
    check: bool = False,
    progress: Progress = print,
    gradients: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Advantage mass, rows with signal and stage-gradient statistics of one algorithm on ``batch``.

    Args:
        inputs: the estimator's inputs (their first-hit turns give the stages).
        advantages: (B, L) the algorithm's token advantages.
        turn_level: (B,) bool or None, which trajectories got stage-level advantages.
        near_miss: (B,) bool.
        check: see :func:`gradient_statistics`.
        gradients: :func:`gradient_statistics` already computed for the same advantages and settings
            (another algorithm's); None computes them.
    """
    stages = token_stage_masks(inputs)
    if gradients is None:
        gradients = gradient_statistics(
            model, batch, advantages, stages, near_miss, settings, check, progress
        )
    report: dict[str, Any] = {
        "stage_level": float(turn_level.float().mean()) if turn_level is not None else None,
    }
    for subset, rows in (("all", None), ("near_miss", near_miss)):
        report[subset] = {
            "trajectories": int(near_miss.numel() if rows is None else rows.sum()),
            "advantage_mass": advantage_mass(advantages, stages, rows),
            "rows_with_signal": rows_with_signal(advantages, stages, rows),
            **gradients[subset],
        }
    if "sum_check" in gradients:
        report["sum_check"] = gradients["sum_check"]
    return report


# ------------------------------------------------------------------------------- the benchmark's batch


@contextmanager
def heartbeat(label: str, every: float = 30.0) -> Iterator[None]:
    """Print a line every ``every`` seconds while the block runs (so a minute never passes silently)."""
    started = time.perf_counter()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            print(f"    {label}: still running ({time.perf_counter() - started:.0f} s)", flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def as_algorithm(trainer: Any, algorithm_config: Any) -> Iterator[None]:
    """The trainer as a run of another algorithm: its config's ``algorithm`` section and table row, so
    that the trainer's own scoring (FOLR paid or not) and update settings (policy loss) are that run's."""
    config, algorithm = trainer.config, trainer.algorithm
    trainer.config = dataclasses.replace(config, algorithm=algorithm_config)
    trainer.algorithm = algorithm_config.resolved()
    try:
        yield
    finally:
        trainer.config, trainer.algorithm = config, algorithm


def describe_batch(scores: Sequence[TrajectoryScore], group_ids: Sequence[int]) -> dict[str, Any]:
    """Size, outcome and categories of the drawn batch, and how many of its groups are all wrong/right."""
    groups: dict[int, list[float]] = {}
    for score, group in zip(scores, group_ids, strict=True):
        groups.setdefault(group, []).append(score.outcome)
    categories = {c.value: sum(s.category == c.value for s in scores) for c in TrajectoryCategory}
    return {
        "trajectories": len(scores),
        "groups": len(groups),
        "outcome_mean": statistics.fmean(s.outcome for s in scores) if scores else 0.0,
        "categories": categories,
        "groups_all_wrong": sum(all(o <= 0.0 for o in v) for v in groups.values()),
        "groups_all_right": sum(all(o >= 1.0 for o in v) for v in groups.values()),
        "near_misses_per_group": [
            sum(
                s.category == TrajectoryCategory.NEAR_MISS.value
                for s, g in zip(scores, group_ids, strict=True)
                if g == group
            )
            for group in sorted(groups)
        ],
    }


#: (token advantages (B, L), gradient settings, algorithm, its gradient statistics) of a measured algorithm.
Measured = tuple[torch.Tensor, UpdateSettings, str, dict[str, Any]]


def same_gradients(
    measured: Sequence[Measured], advantages: torch.Tensor, settings: UpdateSettings
) -> tuple[str, dict[str, Any]] | None:
    """The first measured algorithm whose advantages (B, L) and gradient settings equal these (on the
    same batch, its gradients are these): (its name, its gradient statistics), or None."""
    wanted = gradient_settings(settings)
    for seen, seen_settings, name, stats in measured:
        if seen_settings == wanted and seen.shape == advantages.shape and torch.equal(seen, advantages):
            return name, stats
    return None


def _progress(label: str, started: float) -> Progress:
    def progress(what: str) -> None:
        print(f"  {label}: {what} ({time.perf_counter() - started:.0f} s)", flush=True)

    return progress


def measure_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One seed: step 1's batch at the shared start, and every algorithm's report on it."""
    run_dir = args.work / f"seed{seed}"
    overrides = [f"trainer.prompts_per_step={args.prompts}", f"trainer.group_size={args.group_size}"]
    started = time.perf_counter()
    print(
        f"seed {seed}: building the trainer ({PRESET} preset, the SmolLM2 benchmark's settings)", flush=True
    )
    with heartbeat(f"seed {seed} setup"):
        trainer = _new_trainer(_config(seed, BASELINE, run_dir, 1, overrides), run_dir)
    print(f"seed {seed}: drawing step 1's rollouts ({args.prompts} x {args.group_size})", flush=True)
    with heartbeat(f"seed {seed} rollouts"):
        collected = trainer.collect()
    trajectories = collected.trajectories
    batch = collate_trajectories(trajectories, trainer.resources.pad_token_id)
    group_ids = [t.group_id for t in trajectories]
    description = describe_batch(collected.scores, group_ids)
    print(
        f"seed {seed}: {description['trajectories']} trajectories, outcome mean "
        f"{description['outcome_mean']:.3f}, near misses {description['categories']['near_miss']}, "
        f"all-wrong groups {description['groups_all_wrong']}/{description['groups']} "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    reports: dict[str, Any] = {}
    measured: list[Measured] = []
    for name in args.algorithms:
        with as_algorithm(trainer, _config(seed, name, run_dir, 1, overrides).algorithm):
            scores = trainer.score(trajectories)
            inputs = advantage_inputs(scores, batch, group_ids)
            algorithm = trainer.algorithm
            output = compute_advantages(algorithm.estimator, inputs, **algorithm.estimator_options)
            settings = trainer.update_settings
        advantages = output.token_advantages
        algorithm_started = time.perf_counter()
        same = same_gradients(measured, advantages, settings)
        check = args.check == "all" or (args.check == "once" and not args.checked and bool(advantages.any()))
        with heartbeat(f"seed {seed} {name}"):
            if same is None:
                stats = gradient_statistics(
                    trainer.model,
                    batch,
                    advantages,
                    token_stage_masks(inputs),
                    near_miss_rows(scores),
                    settings,
                    check,
                    _progress(f"seed {seed} {name}", algorithm_started),
                )
                args.checked = args.checked or check
            else:
                stats = same[1]
            report = algorithm_report(
                trainer.model,
                batch,
                inputs,
                advantages,
                output.turn_level,
                near_miss_rows(scores),
                settings,
                gradients=stats,
            )
        measured.append((advantages, gradient_settings(settings), name, stats))
        report["gradients_as"] = same[0] if same is not None else None
        report["policy_loss"], report["loss_agg"] = settings.policy_loss, settings.loss_agg
        report["seconds"] = time.perf_counter() - algorithm_started
        reports[name] = report
        reused = f" (the same advantages and loss as {same[0]}: its gradients)" if same is not None else ""
        print(f"  seed {seed} {name}{reused}: {_line(report)}", flush=True)
    result = {"batch": description, "algorithms": reports, "seconds": time.perf_counter() - started}
    del trainer, collected, batch
    gc.collect()
    return result


# -------------------------------------------------------------------------------------------- the table

#: (column title, path into an algorithm's report) of the printed table.
COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("stage-lvl", ("stage_level",)),
    ("|A| ret", ("all", "advantage_mass", "retrieval")),
    ("|A| ans", ("all", "advantage_mass", "answer")),
    ("‖g_ret‖", ("all", "grad_retrieval")),
    ("‖g_ans‖", ("all", "grad_answer")),
    ("‖g_all‖", ("all", "grad_all")),
    ("cos", ("all", "cos")),
    ("NM |A| ret", ("near_miss", "advantage_mass", "retrieval")),
    ("NM |A| ans", ("near_miss", "advantage_mass", "answer")),
    ("NM ‖g_ret‖", ("near_miss", "grad_retrieval")),
    ("NM ‖g_ans‖", ("near_miss", "grad_answer")),
    ("NM ‖g_all‖", ("near_miss", "grad_all")),
    ("NM cos", ("near_miss", "cos")),
)


LEGEND = (
    "stage-lvl: share of trajectories whose group got stage-level advantages; |A| ret / ans: sum of |A| over "
    "retrieval- / answer-stage tokens; ‖g_ret‖, ‖g_ans‖, ‖g_all‖: L2 norms of the policy-loss gradient at the "
    "start weights restricted to retrieval-stage, answer-stage and all tokens (one normaliser: the whole "
    "batch's); cos: cos(g_ret, g_ans), '-' where either is 0; NM: the same over near misses only (answer "
    "retrieved, final answer wrong). mean: over seeds, a '-' left out."
)


def _get(report: Mapping[str, Any], path: Sequence[str]) -> Any:
    value: Any = report
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _line(report: Mapping[str, Any]) -> str:
    return ", ".join(f"{title} {_fmt(_get(report, path))}" for title, path in COLUMNS)


def mean_over_seeds(
    seeds: Mapping[int, Mapping[str, Any]], algorithms: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per algorithm, the mean over seeds of each table column (None where no seed has a value)."""
    means: dict[str, dict[str, Any]] = {}
    for name in algorithms:
        row: dict[str, Any] = {}
        for title, path in COLUMNS:
            values = [
                _get(seed["algorithms"][name], path) for seed in seeds.values() if name in seed["algorithms"]
            ]
            present = [float(v) for v in values if v is not None]
            row[title] = statistics.fmean(present) if present else None
        means[name] = row
    return means


def table(seeds: Mapping[int, Mapping[str, Any]], algorithms: Sequence[str]) -> str:
    """Markdown table: one row per seed and algorithm, then the mean over seeds."""
    titles = [title for title, _ in COLUMNS]
    lines = [
        "| seed | algorithm | " + " | ".join(titles) + " |",
        "|---|---|" + "---|" * len(titles),
    ]
    for seed, result in seeds.items():
        for name in algorithms:
            report = result["algorithms"][name]
            cells = [_fmt(_get(report, path)) for _, path in COLUMNS]
            lines.append(f"| {seed} | {name} | " + " | ".join(cells) + " |")
    for name, row in mean_over_seeds(seeds, algorithms).items():
        lines.append(f"| mean | {name} | " + " | ".join(_fmt(row[title]) for title in titles) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--algorithms", nargs="+", default=DEFAULT_ALGORITHMS)
    parser.add_argument("--prompts", type=int, default=4, help="prompts of the step (the benchmark's 4)")
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (the benchmark's 8)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stage_gradients.json"))
    parser.add_argument(
        "--work", type=Path, default=Path("benchmarks/results/stage_gradients_runs"), help="run directories"
    )
    parser.add_argument(
        "--check",
        choices=["none", "once", "all"],
        default="once",
        help="also compute the whole gradient in one pass and compare it with the sum of the stage parts: "
        "once (the first algorithm with a non-zero advantage), for every algorithm, or never",
    )
    args = parser.parse_args(argv)
    args.checked = False
    started = time.perf_counter()
    seeds = {seed: measure_seed(seed, args) for seed in args.seeds}
    text = table(seeds, args.algorithms)
    checks = {
        f"seed {seed} {name}": report["sum_check"]["relative_error"]
        for seed, result in seeds.items()
        for name, report in result["algorithms"].items()
        if "sum_check" in report and report["gradients_as"] is None
    }
    summary = {
        "preset": PRESET,
        "settings": SETTINGS,
        "prompts": args.prompts,
        "group_size": args.group_size,
        "algorithms": args.algorithms,
        "seeds": seeds,
        "mean": mean_over_seeds(seeds, args.algorithms),
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print()
    print(text)
    print(LEGEND)
    print()
    for label, error in checks.items():
        print(f"{label}: ||g_all - (g_ret + g_ans)|| / ||g_all|| = {error:.2e}")
    print(f"wrote {args.out} ({summary['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
