"""``tspo verl``: scale out on verl (``tspo verl launch --preset NAME [KEY=VALUE ...] [--run]``)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verl",
        help="scale out on verl: write (and run) the verl command for a preset",
        description="Train on verl (Ray + FSDP/Megatron + vLLM/SGLang) with the tspo plugin. See docs/verl.md.",
    )
    actions = parser.add_subparsers(dest="verl_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: _missing_action(parser))

    launch = actions.add_parser(
        "launch",
        help="write run.sh / agent_loop.yaml for a preset, print the command, and run it with --run",
        description=(
            "Resolve a preset (configs/verl/<name>.yaml or a YAML path) plus KEY=VALUE overrides into the "
            "verl command line. KEY is a tspo option of the preset (model_path, data_dir, retriever_url, "
            "adv_estimator, mode, folr_alpha, max_turns, nnodes, n_gpus_per_node, output_dir, ...) or any "
            "dotted verl Hydra key (actor_rollout_ref.actor.optim.lr=5e-7, ++trainer.new_key=1)."
        ),
    )
    launch.add_argument("--preset", required=True, help="preset name (configs/verl/<name>.yaml) or YAML path")
    launch.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="tspo options or verl Hydra overrides"
    )
    launch.add_argument(
        "--python", default="python3", help="interpreter that has verl installed (default python3)"
    )
    launch.add_argument("--run", action="store_true", help="check data + retriever, then run the command")
    launch.set_defaults(handler=run_launch_command)


def _missing_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_launch_command(args: argparse.Namespace) -> int:
    from tspo.errors import CLIError
    from tspo.integrations.verl.launch import (
        LaunchError,
        check_ready,
        plan_launch,
        render_script,
        run_launch,
        write_launch,
    )

    try:
        plan = plan_launch(args.preset, args.overrides, python=args.python)
        written = write_launch(plan)
    except LaunchError as err:
        raise CLIError(str(err)) from None
    print(render_script(plan), end="")
    algorithm = plan.options.algorithm
    print(
        f"# algorithm {plan.options.adv_estimator}: verl adv_estimator={algorithm.verl_estimator}, "
        f"FOLR alpha {algorithm.folr_alpha:g}",
        file=sys.stderr,
    )
    for note in plan.notes:
        print(f"# note: {note}", file=sys.stderr)
    for path in written:
        print(f"# wrote {path}", file=sys.stderr)
    if not args.run:
        print(f"# run it with: bash {plan.script_path}   (or add --run)", file=sys.stderr)
        return 0
    try:
        check_ready(plan)
    except LaunchError as err:
        raise CLIError(str(err)) from None
    return run_launch(plan)
