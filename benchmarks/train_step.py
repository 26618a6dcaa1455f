"""Step-time breakdown of the local trainer: generate / retrieve / score / update / other, tokens per second.

Runs a few RL steps of each preset (no evaluation, no checkpoints) and reports, per step, the mean
seconds of each phase and its share of the step. "other" is everything but model compute and retrieval
(data drawing, collation, bookkeeping); the target is under 10 % of the step.

Each preset runs once per ``--bf16`` setting (default ``off`` then ``on``: float32 and bf16 autocast,
forced even where the processor has no hardware bf16, so both splits are measured in one run). The
table says whether this CPU has hardware bf16 (``avx512_bf16`` / ``amx_bf16``), which is what
``trainer.bf16=auto`` decides on.

    python benchmarks/train_step.py --presets tiny quickstart --steps 4
    python benchmarks/train_step.py --presets quickstart --steps 3 --bf16 off on
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PHASES = ("generate", "retrieve", "score", "update", "other")


def measure(preset: str, steps: int, out: Path, overrides: list[str], bf16: str) -> dict:
    from tspo.training.config import load_train_config
    from tspo.training.metrics import read_metrics
    from tspo.training.trainer import Trainer

    run_dir = out / f"{preset}-bf16-{bf16}"
    config = load_train_config(
        preset,
        None,
        [
            f"trainer.steps={steps}",
            f"trainer.output_dir={run_dir}",
            "trainer.eval_before=false",
            "data.eval_size=0",
            "trainer.save_every=0",
            "trainer.plots=false",
            "trainer.progress=false",
            "warmstart.steps=0",
            # Quoted: YAML reads a bare on / off as a boolean, which the config refuses.
            f"trainer.bf16='{bf16}'",
            *overrides,
        ],
    )
    Trainer(config).train()
    # The first step pays one-off costs (lazy imports, allocator warm-up): report the rest.
    lines = [line for line in read_metrics(run_dir) if "time/step" in line][1:]
    row: dict = {"preset": preset, "bf16": bf16, "steps": len(lines)}
    step_time = statistics.fmean(line["time/step"] for line in lines)
    row["step_s"] = step_time
    for phase in PHASES:
        seconds = statistics.fmean(line[f"time/{phase}"] for line in lines)
        row[f"{phase}_s"] = seconds
        row[f"{phase}_share"] = seconds / step_time
    row["tokens_per_s"] = statistics.fmean(line["perf/tokens_per_second"] for line in lines)
    return row


def main() -> None:
    from tspo.training.policy import cpu_bf16_features

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "quickstart"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--bf16",
        nargs="+",
        choices=["off", "on", "auto"],
        default=["off", "on"],
        help="trainer.bf16 settings",
    )
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step"))
    args = parser.parse_args()
    features = cpu_bf16_features()
    print(f"CPU hardware bf16: {', '.join(features) if features else 'none (bf16 autocast is emulated)'}")
    rows = [
        measure(preset, args.steps, args.out, args.override, bf16)
        for preset in args.presets
        for bf16 in args.bf16
    ]
    print(
        f"{'preset':12s} {'bf16':>4s} {'step s':>8s} "
        + " ".join(f"{p:>14s}" for p in PHASES)
        + f" {'tok/s':>8s}"
    )
    for row in rows:
        phases = " ".join(f"{row[f'{p}_s']:7.2f} ({row[f'{p}_share']:4.0%})" for p in PHASES)
        print(
            f"{row['preset']:12s} {row['bf16']:>4s} {row['step_s']:8.2f} {phases} {row['tokens_per_s']:8.1f}"
        )
    for preset in args.presets:
        by_setting = {row["bf16"]: row for row in rows if row["preset"] == preset}
        if "off" in by_setting and "on" in by_setting:
            off, on = by_setting["off"], by_setting["on"]
            print(
                f"{preset}: bf16 on / off: step {on['step_s'] / off['step_s']:.2f}x, "
                f"update {on['update_s'] / off['update_s']:.2f}x, generate {on['generate_s'] / off['generate_s']:.2f}x"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"cpu_bf16_features": list(features), "rows": rows}
    (args.out / "train_step.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out / 'train_step.json'}")


if __name__ == "__main__":
    main()
