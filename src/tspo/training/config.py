"""Typed configuration of ``tspo train`` (TRL-style dataclasses whose help text drives the CLI).

A run is configured by a preset (``tiny``, ``quickstart``) or a YAML file, then dotted overrides:
``tspo train --config configs/search_r1_qwen2.5_3b_tspo.yaml algorithm.name=grpo trainer.steps=50``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from tspo.algorithms.advantages import DEFAULT_RECLAIM
from tspo.algorithms.table import ALGORITHMS, DEFAULT_DUAL_CLIP, ResolvedAlgorithm, resolve_algorithm
from tspo.configuration import ConfigError, apply_overrides, deep_merge, from_dict, read_yaml
from tspo.data.world import WorldConfig
from tspo.rollout import RolloutConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TinyModelConfig:
    """Size of the ``tiny`` policy: a Qwen2-architecture model built from a config."""

    hidden_size: int = field(default=128, metadata=_help("hidden size of the tiny Qwen2 model"))
    num_layers: int = field(default=2, metadata=_help("transformer layers"))
    num_heads: int = field(default=4, metadata=_help("attention heads"))
    intermediate_size: int = field(default=256, metadata=_help("MLP width"))


@dataclass
class LoraConfig:
    """Optional LoRA adapters (peft); the base model stays frozen and is the KL reference."""

    enabled: bool = field(default=False, metadata=_help("train LoRA adapters instead of all weights"))
    r: int = field(default=16, metadata=_help("LoRA rank"))
    alpha: int = field(default=32, metadata=_help("LoRA scaling alpha"))
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout"))
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        metadata=_help("module names that get adapters"),
    )


@dataclass
class ModelConfig:
    policy: str = field(
        default="smollm2",
        metadata=_help("'tiny', 'smollm2' (offline GGUF), a HF id, a local directory or a .gguf file"),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("weights dtype; auto = float32 on CPU, bfloat16 on a GPU that has it")
    )
    device: str = field(default="auto", metadata=_help("'auto', 'cpu', 'cuda', 'cuda:1', ..."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("trade compute for memory"))
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    source: Literal["world", "files"] = field(
        default="world",
        metadata=_help("'world': generate the synthetic search world; 'files': QA JSONL files"),
    )
    world: WorldConfig = field(default_factory=WorldConfig)
    train_file: str | None = field(default=None, metadata=_help("training QA JSONL (source=files)"))
    test_file: str | None = field(default=None, metadata=_help("held-out QA JSONL (source=files)"))
    corpus: str | None = field(default=None, metadata=_help("corpus JSONL for an in-process index"))
    eval_size: int = field(default=64, metadata=_help("held-out questions scored before/after training"))


@dataclass
class RetrieverConfig:
    kind: Literal["bm25", "dense", "http"] = field(default="bm25", metadata=_help("retrieval backend"))
    index: str | None = field(
        default=None, metadata=_help("saved index directory; None builds BM25 in-process from the corpus")
    )
    url: str | None = field(
        default=None, metadata=_help("server URL for kind=http, e.g. http://127.0.0.1:8000")
    )
    cache_size: int = field(default=100_000, metadata=_help("LRU entries of (query, k) results; 0 disables"))


@dataclass
class RewardConfig:
    metric: Literal["em", "sub_em", "f1"] = field(default="em", metadata=_help("outcome score o"))
    folr_alpha: float = field(
        default=0.3,
        metadata=_help("First-Occurrence Latent Reward for the first turn whose docs hold the answer"),
    )
    hit_mode: Literal["whole_word", "substring"] = field(
        default="whole_word",
        metadata=_help("how a gold alias must occur in retrieved text to count as a hit"),
    )
    length_penalty: float = field(
        default=0.0, metadata=_help("weight of the Kimi k1.5 length penalty shaping (0 disables)")
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.folr_alpha < 1.0:
            raise ValueError(f"reward.folr_alpha must be in [0, 1), got {self.folr_alpha}")


AlgorithmName = Literal["tspo", "tspo_turn", "tspo_traj", "tspo_legacy", "grpo", "drgrpo", "rloo", "dspo"]


@dataclass
class AlgorithmConfig:
    """What to train with. ``name`` picks a row of the algorithm table (:mod:`tspo.algorithms.table`),
    which fixes the estimator, whether FOLR is paid, the policy loss and the group filter; the
    ``default`` settings below keep the row's choice, any other value overrides it (and is logged)."""

    name: AlgorithmName = field(
        default="tspo",
        metadata=_help("algorithm from the table: " + ", ".join(get_args(AlgorithmName))),
    )
    tspo_mode: Literal["default", "adaptive", "turn", "traj", "legacy"] = field(
        default="default",
        metadata=_help("TSPO advantage mode (default: the algorithm's; tspo = adaptive)"),
    )
    reclaim: float = field(
        default=DEFAULT_RECLAIM,
        metadata=_help("TSPO beta: share of its FOLR credit a wrong answer's answer stage gives back"),
    )
    gamma: float = field(default=1.0, metadata=_help("TSPO legacy mode's turn-return discount"))
    pay_folr: Literal["default", "on", "off"] = field(
        default="default", metadata=_help("pay the FOLR reward (default: only the tspo algorithms do)")
    )
    filter: Literal["default", "none", "outcome", "reward"] = field(
        default="default", metadata=_help("group filter (default: the algorithm's; outcome for dspo)")
    )
    policy_loss: Literal["default", "token_clip", "seq_clip"] = field(
        default="default", metadata=_help("policy loss (default: the algorithm's; seq_clip for dspo)")
    )
    eps_low: float = field(default=0.2, metadata=_help("lower clip range of the importance ratio"))
    eps_high: float = field(default=0.28, metadata=_help("upper clip range (clip-higher)"))
    dual_clip: float | None = field(
        default=DEFAULT_DUAL_CLIP,
        metadata=_help("dual-clip constant c > 1, verl's clip_ratio_c default (null disables)"),
    )
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = field(
        default="token-mean", metadata=_help("how token losses are aggregated")
    )
    loss_scale_factor: int | None = field(
        default=None,
        metadata=_help(
            "constant divisor of seq-mean-token-sum-norm (verl's actor.loss_scale_factor); null: the "
            "most tokens a trajectory can generate, min((rollout.max_turns + 1) x rollout.max_new_tokens, "
            "rollout.max_context_tokens)"
        ),
    )
    kl_coef: float = field(
        default=0.001, metadata=_help("KL-to-reference coefficient in the loss (0 disables)")
    )
    kl_kind: Literal["low_var_kl", "kl", "abs", "mse"] = field(
        default="low_var_kl", metadata=_help("KL estimator")
    )
    entropy_coef: float = field(default=0.0, metadata=_help("entropy bonus coefficient"))
    max_filter_rounds: int = field(
        default=3, metadata=_help("dynamic filtering: extra prompt draws allowed to fill a step's groups")
    )

    def __post_init__(self) -> None:
        if not self.reclaim >= 0:
            raise ValueError(f"algorithm.reclaim must be >= 0, got {self.reclaim}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"algorithm.gamma must be in (0, 1], got {self.gamma}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"algorithm.dual_clip must be > 1 (or null to disable), got {self.dual_clip}")
        if self.loss_scale_factor is not None and not self.loss_scale_factor > 0:
            raise ValueError(
                f"algorithm.loss_scale_factor must be > 0 (or null for the default), got {self.loss_scale_factor}"
            )
        self.resolved()  # an option the algorithm's estimator does not take fails here, at load time

    def resolved(self) -> ResolvedAlgorithm:
        """The table row with this config's explicit overrides applied."""
        options: dict[str, object] = {}
        if self.tspo_mode != "default":
            options["mode"] = self.tspo_mode
        spec = ALGORITHMS.get(self.name)
        if spec.estimator != "tspo" and self.tspo_mode != "default":
            raise ValueError(
                f"algorithm.tspo_mode={self.tspo_mode} applies only to the tspo algorithms, not {self.name}"
            )
        mode = options.get("mode", spec.estimator_options.get("mode"))
        if self.gamma != 1.0 and mode != "legacy":
            raise ValueError(
                f"algorithm.gamma={self.gamma} applies only to tspo mode legacy (the algorithm uses {mode})"
            )
        if spec.estimator == "tspo":  # pass only what departs from the estimator's defaults
            if self.reclaim != DEFAULT_RECLAIM:
                options["reclaim"] = self.reclaim
            if self.gamma != 1.0:
                options["gamma"] = self.gamma
        pay = None if self.pay_folr == "default" else self.pay_folr == "on"
        return resolve_algorithm(
            self.name,
            estimator_options=options,
            pay_folr=pay,
            policy_loss=None if self.policy_loss == "default" else self.policy_loss,
            group_filter=None if self.filter == "default" else self.filter,
        )

    @property
    def resolved_filter(self) -> str:
        return self.resolved().group_filter

    @property
    def resolved_policy_loss(self) -> str:
        return self.resolved().policy_loss

    @property
    def uses_folr(self) -> bool:
        """Whether R includes FOLR: the tspo algorithms pay it, the baselines learn from the raw outcome."""
        return self.resolved().pays_folr


@dataclass
class TrainerConfig:
    steps: int = field(default=20, metadata=_help("RL steps"))
    prompts_per_step: int = field(default=8, metadata=_help("questions (groups) per step"))
    group_size: int = field(default=5, metadata=_help("rollouts per question (n)"))
    learning_rate: float = field(default=1e-6, metadata=_help("AdamW learning rate"))
    warmup_steps: int = field(default=0, metadata=_help("linear LR warmup steps"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    micro_batch_size: int = field(default=8, metadata=_help("trajectories per forward/backward pass"))
    ppo_epochs: int = field(default=1, metadata=_help("passes over each step's rollouts"))
    grad_clip: float = field(default=1.0, metadata=_help("max gradient norm"))
    seed: int = field(default=0, metadata=_help("seed of data order, sampling and init"))
    output_dir: str = field(default="runs/tspo", metadata=_help("run directory"))
    save_every: int = field(default=10, metadata=_help("checkpoint every N steps (0: only at the end)"))
    keep_last: int = field(default=2, metadata=_help("checkpoints kept"))
    eval_every: int = field(
        default=0, metadata=_help("held-out evaluation every N steps (0: before/after only)")
    )
    eval_before: bool = field(default=True, metadata=_help("score held-out EM before training"))
    val_every: int = field(
        default=0,
        metadata=_help(
            "validate every N steps on val_size held-out questions per dataset; logs val/<dataset>/*"
        ),
    )
    val_size: int = field(
        default=32, metadata=_help("held-out questions per dataset for validation (seeded, same each time)")
    )
    bf16: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata=_help(
            "bf16 autocast for forward passes (auto: on a GPU that supports it, or a CPU with avx512_bf16 / amx_bf16)"
        ),
    )
    tensorboard: bool = field(default=False, metadata=_help("also log to TensorBoard"))
    wandb_project: str | None = field(default=None, metadata=_help("also log to this W&B project"))
    max_bad_updates: int = field(
        default=3, metadata=_help("consecutive non-finite updates before rolling back to the last checkpoint")
    )
    eval_sampled: bool = field(
        default=True,
        metadata=_help(
            "held-out evaluation also samples at rollout.temperature (fixed seed) besides greedy decoding"
        ),
    )
    no_signal_steps: int = field(
        default=3,
        metadata=_help(
            "warn once after this many consecutive steps whose groups all have zero advantage (0: never)"
        ),
    )
    progress: bool = field(
        default=True,
        metadata=_help("progress bars with ETA on a terminal, one log line per step otherwise"),
    )
    plots: bool = field(default=True, metadata=_help("write PNG plots at the end"))

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "group_size", "micro_batch_size", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "steps",
            "warmup_steps",
            "save_every",
            "keep_last",  # 0 keeps every checkpoint
            "eval_every",
            "val_every",
            "val_size",
            "max_bad_updates",
            "no_signal_steps",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"trainer.learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0 or not self.grad_clip > 0:
            raise ValueError(
                f"trainer.weight_decay must be >= 0 and trainer.grad_clip > 0, got {self.weight_decay} "
                f"and {self.grad_clip}"
            )


@dataclass
class WarmStartConfig:
    """Supervised warm start on demonstrations (used by the tiny preset, whose model starts random)."""

    steps: int = field(default=0, metadata=_help("SFT steps before RL (0 disables)"))
    learning_rate: float = field(default=3e-3, metadata=_help("SFT learning rate"))
    warmup_steps: int = field(
        default=0, metadata=_help("SFT steps over which the learning rate rises linearly to its value")
    )
    batch_size: int = field(default=32, metadata=_help("demonstrations per SFT step"))
    demos: int = field(default=512, metadata=_help("training questions turned into demonstrations"))
    rename_entities: bool = field(
        default=False,
        metadata=_help(
            "replace every entity name of a demonstration consistently by random names of the world, so "
            "that answers come from copying retrieved text, not from memorised facts (data.source=world)"
        ),
    )
    copies: int = field(
        default=1, metadata=_help("demonstrations per question (each renamed differently when renaming)")
    )
    early_answer_fraction: float = field(
        default=0.0,
        metadata=_help(
            "0..1: share of multi-hop demonstrations that stop after the first search and answer the entity "
            "it found (a weaker teacher that under-searches, leaving RL a habit to correct)"
        ),
    )
    rl_prompts: Literal["auto", "rest", "all"] = field(
        default="auto",
        metadata=_help(
            "questions RL draws from: 'rest' = training questions not used as demonstrations (a warm start "
            "on the originals memorises those), 'all'; auto = rest after a warm start without renaming"
        ),
    )

    @property
    def excludes_demos(self) -> bool:
        """Whether RL skips the demonstration questions."""
        if self.rl_prompts == "auto":
            return self.steps > 0 and not self.rename_entities
        return self.rl_prompts == "rest"

    def __post_init__(self) -> None:
        if self.copies < 1:
            raise ValueError(f"warmstart.copies must be >= 1, got {self.copies}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmstart.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.early_answer_fraction <= 1.0:
            raise ValueError(
                f"warmstart.early_answer_fraction must be in [0, 1], got {self.early_answer_fraction}"
            )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)

    @property
    def loss_scale_factor(self) -> int:
        """The constant divisor of ``seq-mean-token-sum-norm``: ``algorithm.loss_scale_factor`` when set,
        else the most tokens one trajectory can generate (the sum it divides can never exceed it).

        A trajectory has at most ``max_turns + 1`` generations (``max_turns`` rounds, then the final
        answer-only one) of at most ``max_new_tokens`` each, and never more than ``max_context_tokens``
        in all. Observation tokens are not counted: they are not in the loss (verl's default, its padded
        response width, counts them, so set the value explicitly to match a verl run).
        """
        if self.algorithm.loss_scale_factor is not None:
            return self.algorithm.loss_scale_factor
        rollout = self.rollout
        return min((rollout.max_turns + 1) * rollout.max_new_tokens, rollout.max_context_tokens)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_train_config(
    preset: str | None = None, config_path: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Preset (default ``quickstart`` when no file is given), then the YAML file, then dotted overrides."""
    data: dict[str, Any] = {}
    if preset is None and config_path is None:
        preset = "quickstart"
    if preset is not None:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(preset_names())}")
        data = read_yaml(path)
    if config_path is not None:
        data = deep_merge(data, read_yaml(config_path))
        try:  # an unknown key in the file is reported with the file's name
            from_dict(TrainConfig, data)
        except ConfigError as err:
            if str(err).startswith("unknown config key"):
                raise ConfigError(f"{config_path}: {err}") from None
        except ValueError:  # other checks wait for the overrides, which may fix them
            pass
    apply_overrides(data, overrides or [])
    return from_dict(TrainConfig, data)
