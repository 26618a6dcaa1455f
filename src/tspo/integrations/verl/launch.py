"""``tspo verl launch``: turn a preset into the full verl command line, write it down, and run it if asked.

A preset (``configs/verl/<name>.yaml``) has two sections:

- ``tspo``: the knobs a tspo user thinks in (model, data directory, retriever URL, estimator and its
  mode, FOLR alpha, turns, cluster size), typed by :class:`VerlLaunchOptions`;
- ``verl``: Hydra overrides of ``verl.trainer.main_ppo`` (keys exactly as in verl's ``ppo_trainer.yaml``).

The launcher derives the overrides that wire tspo in (estimator, agent loop, reward function, the
``VERL_USE_EXTERNAL_MODULES`` variable for every Ray worker), applies the command-line overrides last,
and writes ``run.sh`` (the command), ``agent_loop.yaml`` (the agent loop's options) and ``launch.json``
(everything resolved) into the output directory. Nothing here imports verl.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tspo.algorithms.advantages import DEFAULT_RECLAIM
from tspo.algorithms.table import ALGORITHMS, DEFAULT_DUAL_CLIP, resolve_algorithm
from tspo.configuration import ConfigError, from_dict, read_yaml
from tspo.files import atomic_path

PLUGIN_MODULE = "tspo.integrations.verl"
AGENT_LOOP_NAME = "tspo_search_r1"
AGENT_LOOP_TARGET = "tspo.integrations.verl.agent_loop.SearchR1AgentLoop"
REWARD_FUNCTION_PATH = "pkg://tspo.integrations.verl.reward"
REWARD_FUNCTION_NAME = "compute_score"
ENTRY_MODULE = "verl.trainer.main_ppo"
#: Presets shipped with the source tree (``configs/verl``).
PRESET_DIR = Path(__file__).resolve().parents[4] / "configs" / "verl"


class LaunchError(ConfigError):
    """A preset, an override or a launch precondition is wrong; the message names it."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class VerlLaunchOptions:
    """The ``tspo`` section of a verl preset (every field can be overridden as ``name=value``)."""

    model_path: str = field(default="Qwen/Qwen2.5-3B", metadata=_help("actor model: local path or hub id"))
    data_dir: str = field(default="data/search_r1", metadata=_help("`tspo data prepare --out` directory"))
    train_file: str = field(default="train.parquet", metadata=_help("training parquet, relative to data_dir"))
    val_file: str = field(default="test.parquet", metadata=_help("validation parquet, relative to data_dir"))
    retriever_url: str = field(default="http://127.0.0.1:8000", metadata=_help("`tspo serve` base URL"))
    adv_estimator: str = field(
        default="tspo",
        metadata=_help(
            "algorithm from tspo's table (tspo, tspo_turn, tspo_traj, tspo_legacy, grpo, drgrpo, rloo, "
            "dspo), or any other registered verl estimator (trained without FOLR)"
        ),
    )
    mode: Literal["default", "adaptive", "turn", "traj", "legacy"] = field(
        default="default",
        metadata=_help("tspo mode: default (the algorithm's) | adaptive | turn | traj | legacy"),
    )
    reclaim: float = field(default=1.0, metadata=_help("tspo beta: search credit a wrong answer gives back"))
    gamma: float = field(default=1.0, metadata=_help("tspo legacy mode's turn discount"))
    pay_folr: Literal["default", "on", "off"] = field(
        default="default", metadata=_help("pay FOLR: default (only the tspo algorithms) | on | off")
    )
    length_penalty: float = field(default=0.0, metadata=_help("Kimi length-shaping weight (0: off)"))
    folr_alpha: float = field(default=0.3, metadata=_help("FOLR partial reward of the first-hit turn"))
    hit_mode: Literal["whole_word", "substring"] = field(
        default="whole_word", metadata=_help("FOLR hit test: whole_word | substring")
    )
    metric: Literal["em", "sub_em", "f1"] = field(
        default="em", metadata=_help("outcome metric: em | sub_em | f1")
    )
    topk: int = field(default=3, metadata=_help("passages per search"))
    max_turns: int = field(default=4, metadata=_help("searches before the last, search-less generation"))
    max_tokens_per_turn: int = field(default=500, metadata=_help("tokens per generation"))
    max_observation_tokens: int = field(default=500, metadata=_help("tokens per <information> block"))
    nnodes: int = field(default=1, metadata=_help("number of nodes"))
    n_gpus_per_node: int = field(default=8, metadata=_help("GPUs per node"))
    experiment_name: str = field(
        default="tspo_{adv_estimator}",
        metadata=_help("verl trainer.experiment_name ({adv_estimator} is replaced by the algorithm)"),
    )
    output_dir: str = field(
        default="runs/verl/{adv_estimator}",
        metadata=_help("where run.sh and agent_loop.yaml go ({adv_estimator} is replaced by the algorithm)"),
    )

    def __post_init__(self) -> None:
        # A preset names its runs per algorithm, so a GRPO baseline launched from the TSPO preset is
        # neither logged under TSPO's name nor written over TSPO's run.sh.
        for name in ("experiment_name", "output_dir"):
            template = getattr(self, name)
            try:
                setattr(self, name, template.format(adv_estimator=self.adv_estimator))
            except (KeyError, IndexError, ValueError):
                raise LaunchError(
                    f"tspo.{name}: {template!r} may use only the placeholder {{adv_estimator}}"
                ) from None
        for name in ("topk", "max_tokens_per_turn", "max_observation_tokens", "nnodes", "n_gpus_per_node"):
            if getattr(self, name) < 1:
                raise LaunchError(f"tspo.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_turns < 0:
            raise LaunchError(f"tspo.max_turns must be >= 0, got {self.max_turns}")
        if not 0.0 <= self.folr_alpha < 1.0:
            raise LaunchError(f"tspo.folr_alpha must be in [0, 1), got {self.folr_alpha}")
        if not self.reclaim >= 0.0:
            raise LaunchError(f"tspo.reclaim must be >= 0, got {self.reclaim}")
        self.algorithm  # noqa: B018 - resolve now, so a bad combination fails before anything is written

    @property
    def algorithm(self) -> VerlAlgorithm:
        """The algorithm-table row behind ``adv_estimator``, with this preset's overrides applied."""
        return resolve_verl_algorithm(self)

    @property
    def train_path(self) -> Path:
        return (Path(self.data_dir) / self.train_file).absolute()

    @property
    def val_path(self) -> Path:
        return (Path(self.data_dir) / self.val_file).absolute()


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch needs, resolved.

    Attributes:
        preset: the preset's name or path.
        options: the ``tspo`` section after overrides.
        overrides: Hydra overrides of ``verl.trainer.main_ppo``, in order (``key=value``).
        agent_loop: the agent-loop YAML content (a list with one entry).
        env: environment variables the command needs.
        python: interpreter that runs verl.
    """

    preset: str
    options: VerlLaunchOptions
    overrides: tuple[str, ...]
    agent_loop: tuple[dict[str, Any], ...]
    env: Mapping[str, str]
    python: str
    notes: tuple[str, ...] = ()

    @property
    def output_dir(self) -> Path:
        return Path(self.options.output_dir).absolute()

    @property
    def agent_loop_path(self) -> Path:
        return self.output_dir / "agent_loop.yaml"

    @property
    def script_path(self) -> Path:
        return self.output_dir / "run.sh"

    @property
    def argv(self) -> list[str]:
        return [self.python, "-m", ENTRY_MODULE, *self.overrides]


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []


def load_preset(name_or_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (``tspo``, ``verl``) sections of a preset given by name (``configs/verl/<name>.yaml``) or path."""
    path = Path(name_or_path)
    if not path.is_file():
        candidates = [Path("configs/verl") / f"{name_or_path}.yaml", PRESET_DIR / f"{name_or_path}.yaml"]
        path = next((c for c in candidates if c.is_file()), path)
    if not path.is_file():
        available = ", ".join(preset_names()) or "none found"
        raise LaunchError(f"unknown verl preset {name_or_path!r} (no such file); available: {available}")
    try:
        content = read_yaml(path)
    except ConfigError as err:
        raise LaunchError(f"{err} (a preset is a mapping with 'tspo' and 'verl' sections)") from None
    unknown = sorted(set(content) - {"description", "tspo", "verl"})
    if unknown:
        raise LaunchError(f"{path}: unknown top-level key(s) {unknown}; valid: description, tspo, verl")
    tspo_section, verl_section = content.get("tspo") or {}, content.get("verl") or {}
    if not isinstance(tspo_section, dict) or not isinstance(verl_section, dict):
        raise LaunchError(f"{path}: 'tspo' and 'verl' must be mappings")
    return tspo_section, verl_section


_OPTION_FIELDS = {f.name: f for f in dataclasses.fields(VerlLaunchOptions)}


def build_options(section: Mapping[str, Any]) -> VerlLaunchOptions:
    """The ``tspo`` section as options, typed and checked by :func:`tspo.configuration.from_dict` (as
    ``tspo train``'s config is: YAML's on / off mean the words, ints are accepted as floats)."""
    try:
        return from_dict(VerlLaunchOptions, section, prefix="tspo.")
    except ConfigError as err:
        raise LaunchError(str(err)) from None


def hydra_value(value: Any) -> str:
    """A YAML value as Hydra override text (strings are passed through: they may hold Hydra syntax)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    raise LaunchError(f"cannot pass {value!r} as a Hydra override value")


def override_key(override: str) -> str:
    """The config key of a Hydra override (``++a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def split_overrides(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Command-line ``KEY=VALUE`` pairs -> (tspo options, verl Hydra overrides)."""
    tspo_options: dict[str, Any] = {}
    verl_overrides: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise LaunchError(f"override {item!r} must look like KEY=VALUE")
        key, raw = item.split("=", 1)
        bare = key.removeprefix("tspo.")
        if bare in _OPTION_FIELDS:
            if _OPTION_FIELDS[bare].type == "str":  # text as typed (an experiment name may be digits)
                tspo_options[bare] = raw
                continue
            try:
                tspo_options[bare] = yaml.safe_load(raw) if raw else ""
            except yaml.YAMLError:
                tspo_options[bare] = raw
        elif "." in key.lstrip("+~"):
            verl_overrides.append(item)
        else:
            raise LaunchError(
                f"unknown key {key!r}: not a tspo option ({', '.join(_OPTION_FIELDS)}) and not a dotted verl "
                "key such as actor_rollout_ref.actor.optim.lr"
            )
    return tspo_options, verl_overrides


@dataclass(frozen=True)
class VerlAlgorithm:
    """What a launch trains with on verl, from the algorithm table (:mod:`tspo.algorithms.table`).

    Attributes:
        verl_estimator: verl's ``algorithm.adv_estimator``.
        folr_alpha: the FOLR alpha the agent loop pays (0 for every baseline).
        tspo_options: ``algorithm.tspo`` options for the tspo estimator (empty for others).
        verl_overrides: further Hydra overrides the row needs (e.g. dspo's sequence-level loss).
        notes: settings that depart from the table row, to be reported.
    """

    verl_estimator: str
    folr_alpha: float
    tspo_options: Mapping[str, Any]
    verl_overrides: tuple[str, ...]
    notes: tuple[str, ...]


def resolve_verl_algorithm(options: VerlLaunchOptions) -> VerlAlgorithm:
    """Map ``options.adv_estimator`` through the algorithm table; a name outside it is passed to verl
    as is, without FOLR (unless ``pay_folr=on``)."""
    pay = None if options.pay_folr == "default" else options.pay_folr == "on"
    name = options.adv_estimator
    if name not in ALGORITHMS:
        notes = (f"{name} is not in tspo's algorithm table: passed to verl as is",)
        if options.mode != "default":
            raise LaunchError(f"tspo.mode={options.mode} applies only to the tspo algorithms, not {name}")
        return VerlAlgorithm(
            name, options.folr_alpha if pay else 0.0, {}, (), notes + (("FOLR paid",) if pay else ())
        )
    spec = ALGORITHMS.get(name)
    estimator_options: dict[str, Any] = {}
    if spec.estimator == "tspo":
        if options.mode != "default":
            estimator_options["mode"] = options.mode
        if options.reclaim != DEFAULT_RECLAIM:
            estimator_options["reclaim"] = options.reclaim
        if options.gamma != 1.0:
            estimator_options["gamma"] = options.gamma
    elif options.mode != "default":
        raise LaunchError(f"tspo.mode={options.mode} applies only to the tspo algorithms, not {name}")
    try:
        resolved = resolve_algorithm(name, estimator_options=estimator_options, pay_folr=pay)
    except ValueError as err:
        raise LaunchError(str(err)) from None
    tspo_options: dict[str, Any] = {}
    if spec.verl_estimator == "tspo":
        mode = resolved.estimator_options["mode"]
        if options.gamma != 1.0 and mode != "legacy":
            raise LaunchError(f"tspo.gamma applies only to mode legacy, not {mode}")
        tspo_options = {"mode": mode, "length_penalty": options.length_penalty}
        tspo_options.update({"gamma": options.gamma} if mode == "legacy" else {"reclaim": options.reclaim})
    notes = resolved.overrides
    return VerlAlgorithm(
        verl_estimator=spec.verl_estimator,
        folr_alpha=resolved.folr_alpha(options.folr_alpha),
        tspo_options=tspo_options,
        verl_overrides=spec.verl_overrides,
        notes=notes,
    )


def derived_overrides(options: VerlLaunchOptions, agent_loop_path: Path) -> list[str]:
    """The overrides that plug tspo into verl, from the ``tspo`` options."""
    algorithm = options.algorithm
    overrides = [
        f"data.train_files={options.train_path}",
        f"data.val_files={options.val_path}",
        f"actor_rollout_ref.model.path={options.model_path}",
        f"algorithm.adv_estimator={algorithm.verl_estimator}",
        # the tspo estimator reads o from the last generated token: KL goes into the actor loss instead
        "algorithm.use_kl_in_reward=false",
        # one dual-clip default on both paths (the local trainer's algorithm.dual_clip)
        f"actor_rollout_ref.actor.clip_ratio_c={DEFAULT_DUAL_CLIP}",
        *algorithm.verl_overrides,
    ]
    overrides += [f"++algorithm.tspo.{key}={value}" for key, value in algorithm.tspo_options.items()]
    overrides += [
        # the agent loop stops each turn at </search> / </answer>: stop strings need the server's tokenizer
        # (verl's vLLM server always loads it; SGLang skips it by default)
        "actor_rollout_ref.rollout.skip_tokenizer_init=false",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT_LOOP_NAME}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={agent_loop_path}",
        f"reward.custom_reward_function.path={REWARD_FUNCTION_PATH}",
        f"reward.custom_reward_function.name={REWARD_FUNCTION_NAME}",
        f"++reward.custom_reward_function.reward_kwargs.metric={options.metric}",
        f"trainer.nnodes={options.nnodes}",
        f"trainer.n_gpus_per_node={options.n_gpus_per_node}",
        f"trainer.experiment_name={options.experiment_name}",
        # the reward placement needs the V1 trainer (AgentLoopOutput.as_dict builds the batch rows)
        "trainer.use_v1=true",
        # every Ray worker on every node must import the plugin
        f"++ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES={PLUGIN_MODULE}",
    ]
    return overrides


def agent_loop_config(options: VerlLaunchOptions) -> list[dict[str, Any]]:
    """The ``agent_loop_config_path`` content (verl instantiates the loop with these keyword arguments)."""
    return [
        {
            "name": AGENT_LOOP_NAME,
            "_target_": AGENT_LOOP_TARGET,
            "retriever_url": options.retriever_url,
            "topk": options.topk,
            "max_turns": options.max_turns,
            "folr_alpha": options.algorithm.folr_alpha,
            "hit_mode": options.hit_mode,
            "max_tokens_per_turn": options.max_tokens_per_turn,
            "max_observation_tokens": options.max_observation_tokens,
        }
    ]


def plan_launch(preset: str, overrides: Sequence[str] = (), python: str = "python3") -> LaunchPlan:
    """Resolve ``preset`` plus command-line ``overrides`` into a :class:`LaunchPlan`.

    Order of the verl overrides: the preset's ``verl`` section, then the derived ones, then the
    command line; a later override of the same key replaces the earlier one in place.
    """
    tspo_section, verl_section = load_preset(preset)
    cli_options, cli_verl = split_overrides(overrides)
    options = build_options({**tspo_section, **cli_options})
    agent_loop_path = Path(options.output_dir).absolute() / "agent_loop.yaml"
    ordered: dict[str, str] = {}
    preset_overrides = [f"{key}={hydra_value(value)}" for key, value in verl_section.items()]
    for override in [*preset_overrides, *derived_overrides(options, agent_loop_path), *cli_verl]:
        key = override_key(override)
        if not key:
            raise LaunchError(f"override {override!r} has no key")
        ordered.pop(key, None)
        ordered[key] = override
    return LaunchPlan(
        preset=preset,
        options=options,
        overrides=tuple(ordered.values()),
        agent_loop=tuple(agent_loop_config(options)),
        env={"VERL_USE_EXTERNAL_MODULES": PLUGIN_MODULE},
        python=python,
        notes=options.algorithm.notes,
    )


def render_script(plan: LaunchPlan) -> str:
    """``run.sh``: the command, one override per line; extra arguments are appended as more overrides."""
    lines = [
        "#!/usr/bin/env bash",
        f"# Written by `tspo verl launch --preset {plan.preset}`. Run it on the Ray head node; for several",
        "# nodes start Ray first (docs/verl.md). Extra arguments are passed to verl as more overrides.",
        "set -euo pipefail",
        *(f"export {name}={shlex.quote(value)}" for name, value in plan.env.items()),
        f"exec {shlex.quote(plan.python)} -m {ENTRY_MODULE} \\",
        *(f"    {shlex.quote(override)} \\" for override in plan.overrides),
        '    "$@"',
    ]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
        temporary.chmod(mode)


def write_launch(plan: LaunchPlan) -> list[Path]:
    """Write ``agent_loop.yaml``, ``run.sh`` and ``launch.json`` atomically; return their paths."""
    record = {
        "preset": plan.preset,
        "options": dataclasses.asdict(plan.options),
        # What verl trains with, after the algorithm table (the options above are as written).
        "algorithm": dataclasses.asdict(plan.options.algorithm),
        "env": dict(plan.env),
        "argv": plan.argv,
    }
    _write_atomic(plan.agent_loop_path, yaml.safe_dump(list(plan.agent_loop), sort_keys=False))
    _write_atomic(plan.script_path, render_script(plan), mode=0o755)
    launch_json = plan.output_dir / "launch.json"
    _write_atomic(launch_json, json.dumps(record, indent=2) + "\n")
    return [plan.agent_loop_path, plan.script_path, launch_json]


def check_ready(plan: LaunchPlan, timeout: float = 5.0) -> None:
    """Preconditions of ``--run``: verl importable by the interpreter, data present, retriever healthy."""
    probe = subprocess.run(
        [plan.python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('verl') is None)"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        raise LaunchError(
            f"verl is not importable by {plan.python}; install it with pip install 'tspo[verl]' or "
            "scripts/verl_venv.sh, or pass --python"
        )
    for path in (plan.options.train_path, plan.options.val_path):
        if not path.is_file():
            raise LaunchError(f"data file not found: {path} (write it with `tspo data prepare --out ...`)")
    import httpx

    url = plan.options.retriever_url.rstrip("/") + "/health"
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as err:
        raise LaunchError(f"retriever not reachable at {url}: {err} (start it with `tspo serve`)") from None
    if response.status_code != 200:
        raise LaunchError(f"retriever at {url} is not ready: HTTP {response.status_code}")


def run_launch(plan: LaunchPlan) -> int:
    """Run the written ``run.sh`` in the foreground; returns its exit code."""
    return subprocess.run(
        ["bash", str(plan.script_path)], env={**os.environ, **plan.env}, check=False
    ).returncode
