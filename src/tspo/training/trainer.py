"""The local trainer (DESIGN section 8): rollouts -> rewards -> filter -> advantages -> update.

One process, CPU or one GPU. Each step draws ``prompts_per_step`` questions, rolls out
``group_size`` trajectories per question, scores them (outcome + FOLR + shaping), filters groups,
computes advantages with the configured estimator and runs a clipped policy-gradient update.
Checkpoints are atomic and resumable; a non-finite update is skipped, and repeated failures roll the
policy back to the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tspo.algorithms import compute_advantages, group_filter_mask
from tspo.configuration import to_dict
from tspo.data.qa import QAExample
from tspo.evaluation.heldout import DECODINGS, behaviour_change, heldout_metrics
from tspo.evaluation.validation import validate, validation_sets
from tspo.files import atomic_write_text
from tspo.rollout import RolloutTask, run_rollouts
from tspo.runs import RunDir, checkpoint_dir_name
from tspo.scoring import (
    TrajectoryScore,
    advantage_inputs,
    group_diagnostics,
    reward_tensors,
    score_trajectories,
    stage_diagnostics,
    zero_advantage_fraction,
)
from tspo.training.checkpoint import load_checkpoint, save_checkpoint
from tspo.training.config import TrainConfig
from tspo.training.metrics import MetricsLogger
from tspo.training.policy import autocast_context, batched_logprobs
from tspo.training.progress import NoSignalMonitor, Progress, step_line
from tspo.training.prompts import PromptSampler, choose_worked_examples, worked_examples_to_json
from tspo.training.schedules import linear_warmup
from tspo.training.setup import (
    RunResources,
    build_resources,
    check_run_inputs,
    split_demonstrations,
    world_renamer,
)
from tspo.training.update import NonFiniteUpdate, UpdateSettings, policy_update
from tspo.trajectory import Trajectory, collate_trajectories

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainSummary:
    run_dir: Path
    steps: int
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    plots: list[Path] = field(default_factory=list)
    skipped_updates: int = 0
    rollbacks: int = 0
    seconds: float = 0.0
    behaviour: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resumed_from: int = 0
    heldout_files: list[Path] = field(default_factory=list)


@dataclass
class StepBatch:
    """The rollouts of one step that survived the group filter, plus what all rollouts looked like."""

    trajectories: list[Trajectory]
    scores: list[TrajectoryScore]
    all_scores: list[TrajectoryScore]
    all_group_ids: list[int]
    prompts_drawn: int
    rounds: int
    timings: dict[str, float]
    counters: dict[str, float]
    all_trajectories: list[Trajectory]


class Trainer:
    """Owns the run: resources, optimizer, data order, checkpoints and metrics."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        """``resume``: continue the directory's latest checkpoint (an error when it has none).
        ``overwrite``: delete the run the directory holds and start again. Neither: a directory that
        holds another run is refused (:class:`tspo.runs.RunDirError`) rather than mixed with it."""
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run or delete it")
        self.config = config
        self.run_dir = Path(run_dir or config.trainer.output_dir)
        self.run = RunDir(self.run_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.run_id: str | None = None
        self.step = 0
        self.bad_updates = 0
        self.skipped_updates = 0
        self.rollbacks = 0
        self.algorithm = config.algorithm.resolved()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.config
        # Everything that can be checked cheaply is checked before the directory is touched and before
        # any long step (world, model, warm start).
        check_run_inputs(cfg)
        mode = "resume" if self.resume else "overwrite" if self.overwrite else "fresh"
        # --overwrite moves the previous run aside; it is deleted only once this run is set up, and a
        # setup that fails (a bad index, a malformed file found while loading) puts it back.
        self.run_id = self.run.start(mode)
        try:
            self._set_up_run()
        except BaseException:
            if mode != "resume":
                self.run.abandon()
            raise
        if mode == "overwrite":
            self.run.drop_previous()

    def _set_up_run(self) -> None:
        cfg = self.config
        atomic_write_text(self.run.config, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        seed_everything(cfg.trainer.seed)
        algorithm = self.algorithm
        logger.info(
            "algorithm %s: %s estimator %s %s, FOLR %s, %s loss, %s filter",
            algorithm.name,
            algorithm.spec.summary,
            algorithm.estimator,
            dict(algorithm.estimator_options),
            f"alpha {cfg.reward.folr_alpha:g}" if algorithm.pays_folr else "off",
            algorithm.policy_loss,
            algorithm.group_filter,
        )
        for note in algorithm.overrides:
            logger.warning("algorithm %s overridden by the config: %s", algorithm.name, note)
        checkpoint = self.run.latest_checkpoint() if self.resume else None
        # The warm start runs here rather than inside build_resources: after the few-shot examples are
        # attached (its demonstrations get the prompt RL will see) and with a progress bar and its loss
        # logged. A resumed run's checkpoint already holds it.
        build_config = dataclasses.replace(cfg, warmstart=dataclasses.replace(cfg.warmstart, steps=0))
        self.resources: RunResources = build_resources(build_config, self.run_dir, checkpoint=checkpoint)
        res = self.resources
        demo_pool, res.rl_examples = split_demonstrations(cfg, res.train_examples)
        self._attach_examples()
        warm_losses = self._warm_start(demo_pool) if checkpoint is None and cfg.warmstart.steps > 0 else []
        self.model = res.model
        # Before any checkpoint is loaded: the model is still the initial policy (or, after a warm start,
        # the saved one can be read back), which is what the KL must anchor to for the whole run.
        self.ref_model = self._reference_model(checkpoint, warm_started=bool(warm_losses))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=cfg.trainer.learning_rate, weight_decay=cfg.trainer.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(linear_warmup, warmup_steps=cfg.trainer.warmup_steps)
        )
        self.sampler: PromptSampler[QAExample] = PromptSampler(res.rl_examples, seed=cfg.trainer.seed)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)
            self.step = int(state["step"])
            self.sampler.load_state_dict(state["sampler"])
            self.bad_updates = int(state.get("bad_updates", 0))
            self.skipped_updates = int(state.get("skipped_updates", 0))
            self.rollbacks = int(state.get("rollbacks", 0))
            logger.info("resumed from %s at step %d", checkpoint, self.step)
        if self.ref_model is None and cfg.algorithm.kl_coef > 0:
            self.ref_model = _frozen_copy(self.model)
        self.logger = MetricsLogger(
            self.run_dir,
            tensorboard=cfg.trainer.tensorboard,
            wandb_project=cfg.trainer.wandb_project,
            config=to_dict(cfg),
            resume_from_step=self.step if checkpoint is not None else None,
        )
        for index, loss in enumerate(warm_losses, start=1):
            self.logger.log(0, {"warmstart/step": index, "warmstart/loss": loss})

    def _reference_model(self, checkpoint: Path | None, warm_started: bool) -> torch.nn.Module | None:
        """The frozen KL reference: the initial policy of the run, whether it starts or resumes.

        Called before ``checkpoint`` is loaded, so ``self.model`` still holds the initial weights, except
        after a warm start, which a resumed run does not repeat: a fresh run saves the warm-started
        weights in ``RUN_DIR/reference`` and a resumed one reads them back. ``None`` when
        ``algorithm.kl_coef`` is 0.
        """
        cfg = self.config
        reference_dir = self.run.reference
        if warm_started:
            # Saved even with KL off (one copy of the model): a resume may turn the KL on.
            save_checkpoint(
                reference_dir, 0, self.model, None, None, None, {}, keep_last=1, run_id=self.run_id
            )
        if cfg.algorithm.kl_coef <= 0:
            return None
        reference = _frozen_copy(self.model)
        if checkpoint is not None and cfg.warmstart.steps > 0:
            saved = RunDir(reference_dir).latest_checkpoint()
            if saved is None:
                logger.warning(
                    "%s holds no saved reference (a run started before it was saved, or with no warm start): "
                    "the KL reference is the resumed policy, not the run's initial one",
                    self.run_dir,
                )
                return None  # setup() then copies the resumed policy, as runs did before
            load_checkpoint(saved, reference, restore_rng=False)
            logger.info("KL reference: the warm-started initial policy saved in %s", saved)
        return reference

    def _attach_examples(self) -> None:
        """Choose ``rollout.protocol.examples`` worked examples from the training split and put them in
        every prompt of the run (rollouts, evaluations, demonstrations); saved for ``tspo eval``."""
        cfg, res = self.config, self.resources
        count = cfg.rollout.protocol.examples
        if count <= 0:
            return
        from tspo.protocol import build_prompt_text
        from tspo.rollout.loop import build_prompt_ids

        try:
            shots = choose_worked_examples(
                res.train_examples, res.retriever, res.tokenizer, cfg.rollout, count, cfg.trainer.seed
            )
        except ValueError as err:
            from tspo.training.setup import ResourceError

            raise ResourceError(str(err)) from None
        cfg.rollout.protocol = cfg.rollout.protocol.with_worked_examples(shots)
        sample = res.eval_examples[0].question if res.eval_examples else "?"
        atomic_write_text(
            self.run.few_shot,
            json.dumps(
                {
                    "examples": worked_examples_to_json(shots),
                    "prompt_text_example": build_prompt_text(sample, cfg.rollout.protocol),
                },
                indent=2,
            )
            + "\n",
        )
        length = len(build_prompt_ids(sample, res.tokenizer, cfg.rollout.protocol))
        logger.info(
            "few-shot prompt: %d worked example(s) from the training split (%s searches), %d prompt tokens; "
            "see %s",
            len(shots),
            "/".join(str(len(shot.searches)) for shot in shots),
            length,
            self.run.few_shot,
        )

    def _warm_start(self, pool: list[QAExample]) -> list[float]:
        """The supervised warm start (``warmstart.*``) with a progress bar; returns the loss per step."""
        from tspo.training.warmstart import build_demonstrations, warm_start

        cfg, res = self.config, self.resources
        ws = cfg.warmstart
        world_dir = res.corpus_path.parent if res.corpus_path is not None else None
        demos = build_demonstrations(
            pool,
            res.tokenizer,
            res.retriever,
            cfg.rollout,
            copies=ws.copies,
            renamer=world_renamer(cfg, world_dir) if ws.rename_entities else None,
            early_answer_fraction=ws.early_answer_fraction,
            seed=cfg.trainer.seed,
        )
        if not demos:
            from tspo.training.setup import ResourceError

            raise ResourceError(
                "warmstart.steps > 0 but no training example has a metadata.chain to demonstrate"
            )
        with Progress(ws.steps, "warm start", "step", self._interactive, enabled=cfg.trainer.progress) as bar:
            return warm_start(
                res.model,
                res.tokenizer,
                demos,
                steps=ws.steps,
                learning_rate=ws.learning_rate,
                warmup_steps=ws.warmup_steps,
                batch_size=ws.batch_size,
                seed=cfg.trainer.seed,
                pad_token_id=res.pad_token_id,
                on_step=lambda step, loss: bar.advance(
                    1, postfix=f"loss {loss:.3f}", line=f"warm start step {step}/{ws.steps}: loss {loss:.3f}"
                ),
            )

    @property
    def update_settings(self) -> UpdateSettings:
        alg, tr = self.config.algorithm, self.config.trainer
        return UpdateSettings(
            policy_loss=self.algorithm.policy_loss,
            eps_low=alg.eps_low,
            eps_high=alg.eps_high,
            dual_clip=alg.dual_clip,
            loss_agg=alg.loss_agg,
            loss_scale_factor=self.config.loss_scale_factor,
            kl_coef=alg.kl_coef,
            kl_kind=alg.kl_kind,
            entropy_coef=alg.entropy_coef,
            micro_batch_size=tr.micro_batch_size,
            epochs=tr.ppo_epochs,
            grad_clip=tr.grad_clip,
            temperature=max(self.config.rollout.temperature, 1e-6),
            bf16=self.resources.bf16,
        )

    # ------------------------------------------------------------------ rollouts
    def score(self, trajectories: Sequence[Trajectory]) -> list[TrajectoryScore]:
        """Outcome, FOLR and shaping of ``trajectories`` as this run scores them for training (the reward
        config, the algorithm's FOLR weight, the rollout protocol)."""
        rc = self.config.reward
        return score_trajectories(
            trajectories,
            metric=rc.metric,
            folr_alpha=self.algorithm.folr_alpha(rc.folr_alpha),
            hit_mode=rc.hit_mode,
            length_penalty=rc.length_penalty,
            protocol=self.config.rollout.protocol,
        )

    def collect(self) -> StepBatch:
        """Roll out groups until ``prompts_per_step`` groups pass the filter (bounded extra rounds)."""
        cfg = self.config
        want = cfg.trainer.prompts_per_step
        kind = self.algorithm.group_filter
        kept_trajs: list[Trajectory] = []
        kept_scores: list[TrajectoryScore] = []
        all_trajs: list[Trajectory] = []
        all_scores: list[TrajectoryScore] = []
        timings: dict[str, float] = {"generate": 0.0, "retrieve": 0.0, "other": 0.0, "score": 0.0}
        counters: dict[str, float] = {}
        drawn = rounds = kept_groups = 0
        next_group = 0
        while True:
            examples = self.sampler.draw(want - kept_groups)
            drawn += len(examples)
            tasks = [
                RolloutTask(
                    question=ex.question,
                    golds=tuple(ex.golds),
                    group_id=next_group + g,
                    sample_id=f"{ex.id}#{j}",
                )
                for g, ex in enumerate(examples)
                for j in range(cfg.trainer.group_size)
            ]
            next_group += len(examples)
            with self._generation_precision():
                result = run_rollouts(
                    self.resources.engine,
                    self.resources.tokenizer,
                    self.resources.retriever,
                    tasks,
                    cfg.rollout,
                    seed=cfg.trainer.seed * 100_003 + self.step * 101 + rounds,
                )
            for key, value in result.timings.items():
                timings[key] = timings.get(key, 0.0) + value
            for key, value in result.counters.items():
                counters[key] = counters.get(key, 0.0) + value
            start = time.perf_counter()
            scores = self.score(result.trajectories)
            timings["score"] += time.perf_counter() - start
            all_trajs.extend(result.trajectories)
            all_scores.extend(scores)
            group_index = torch.tensor([t.group_id for t in result.trajectories])
            outcome, turn_rewards = reward_tensors(
                scores, max(1, max(t.num_turns for t in result.trajectories))
            )
            keep = group_filter_mask(kind, outcome, turn_rewards.sum(dim=1), group_index)
            for row, flag in enumerate(keep.tolist()):
                if flag:
                    kept_trajs.append(result.trajectories[row])
                    kept_scores.append(scores[row])
            kept_groups = len({t.group_id for t in kept_trajs})
            if kind == "none" or kept_groups >= want or rounds >= cfg.algorithm.max_filter_rounds:
                break
            rounds += 1
        return StepBatch(
            trajectories=kept_trajs,
            scores=kept_scores,
            all_scores=all_scores,
            all_group_ids=[t.group_id for t in all_trajs],
            prompts_drawn=drawn,
            rounds=rounds,
            timings=timings,
            counters=counters,
            all_trajectories=all_trajs,
        )

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        cfg = self.config
        step_start = time.perf_counter()
        collected = self.collect()
        metrics: dict[str, Any] = {
            "data/prompts_drawn": collected.prompts_drawn,
            "data/filter_rounds": collected.rounds,
            "groups/kept": len({t.group_id for t in collected.trajectories}),
            "groups/filtered": collected.prompts_drawn - len({t.group_id for t in collected.trajectories}),
        }
        metrics.update(_rollout_metrics(collected.all_trajectories, collected.all_scores))
        # Rollout totals; where a per-trajectory mean of the same name exists, the mean is what is logged.
        for name, total in collected.counters.items():
            metrics.setdefault(f"rollout/{name}", total)
        metrics["rollout/truncations"] = sum(
            collected.counters.get(name, 0)
            for name in ("generation_truncated", "observation_truncated", "context_truncated")
        )
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        update_time = 0.0
        advantages = None
        if collected.trajectories:
            start = time.perf_counter()
            batch = collate_trajectories(collected.trajectories, self.resources.pad_token_id)
            inputs = advantage_inputs(collected.scores, batch, [t.group_id for t in collected.trajectories])
            advantages = compute_advantages(
                self.algorithm.estimator, inputs, **self.algorithm.estimator_options
            )
            settings = self.update_settings
            # One on-policy pass: the old log-probs are the update's own (no second forward pass).
            old_logprobs = (
                None
                if settings.epochs == 1
                else batched_logprobs(
                    self.model, batch, settings.micro_batch_size, settings.temperature, settings.bf16
                )
            )
            ref_logprobs = (
                batched_logprobs(
                    self.ref_model, batch, settings.micro_batch_size, settings.temperature, settings.bf16
                )
                if self.ref_model is not None
                else None
            )
            try:
                metrics.update(
                    policy_update(
                        self.model,
                        self.optimizer,
                        batch,
                        old_logprobs,
                        advantages.token_advantages,
                        settings,
                        ref_logprobs=ref_logprobs,
                    )
                )
                self.bad_updates = 0
                metrics["actor/skipped_update"] = 0
            except NonFiniteUpdate as err:
                self.bad_updates += 1
                self.skipped_updates += 1
                metrics["actor/skipped_update"] = 1
                logger.warning(
                    "step %d: %s; update skipped (%d in a row)", self.step + 1, err, self.bad_updates
                )
                if self.bad_updates > cfg.trainer.max_bad_updates:
                    self._roll_back()
            self.scheduler.step()
            update_time = time.perf_counter() - start
            metrics["advantage/abs_mean"] = float(
                advantages.token_advantages.abs().sum() / batch.loss_mask.sum().clamp(min=1)
            )
            metrics.update(stage_diagnostics(inputs, advantages))
        metrics.update(group_diagnostics(collected.all_scores, collected.all_group_ids))
        metrics["groups/zero_advantage"] = zero_advantage_fraction(
            advantages.token_advantages if advantages is not None else None,
            [t.group_id for t in collected.trajectories],
            collected.prompts_drawn,
        )
        total = time.perf_counter() - step_start
        t = collected.timings
        metrics.update(
            {
                "time/generate": t.get("generate", 0.0),
                "time/retrieve": t.get("retrieve", 0.0),
                "time/score": t.get("score", 0.0),
                "time/update": update_time,
                "time/step": total,
            }
        )
        metrics["time/other"] = max(
            0.0, total - sum(metrics[f"time/{k}"] for k in ("generate", "retrieve", "score", "update"))
        )
        generated = sum(tr.num_generated_tokens for tr in collected.all_trajectories)
        metrics["perf/tokens_per_second"] = generated / total if total > 0 else 0.0
        metrics["trainer/skipped_updates"] = self.skipped_updates
        metrics["trainer/rollbacks"] = self.rollbacks
        return metrics

    def _roll_back(self) -> None:
        checkpoint = self.run.latest_checkpoint()
        if checkpoint is None:
            logger.error("repeated non-finite updates and no checkpoint to roll back to; continuing")
            return
        state = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler, restore_rng=False)
        self.rollbacks += 1
        self.bad_updates = 0
        logger.warning("rolled back to %s (step %s)", checkpoint, state.get("step"))

    # ------------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self, tag: str) -> dict[str, float]:
        """Greedy and sampled held-out metrics (:func:`~tspo.evaluation.heldout.heldout_metrics`).

        Every answer is kept: ``heldout/<tag>-<decoding>.jsonl`` in the run directory (``tag`` is
        ``before``, ``after`` or the step's checkpoint name), one scored record per question.
        """
        res, cfg = self.resources, self.config
        file_tag = tag if tag in ("before", "after") else checkpoint_dir_name(self.step)

        def keep(decoding: str, records: list[dict[str, Any]]) -> None:
            path = self.run.heldout_file(file_tag, decoding)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))

        sampled = cfg.trainer.eval_sampled and cfg.rollout.temperature > 0
        total = len(res.eval_examples) * (2 if sampled else 1)
        with (
            Progress(
                total, f"eval {tag}", "question", self._interactive, enabled=cfg.trainer.progress
            ) as bar,
            self._generation_precision(),
        ):
            metrics = heldout_metrics(
                res.engine,
                res.tokenizer,
                res.retriever,
                res.eval_examples,
                cfg.rollout,
                metric=cfg.reward.metric,
                hit_mode=cfg.reward.hit_mode,
                seed=cfg.trainer.seed,
                sampled=sampled,
                progress=bar.update,
                on_records=keep,
            )
        text = f"greedy EM {metrics.get('greedy/em', 0.0):.3f}"
        if "sampled/em" in metrics:
            text += f", sampled EM {metrics['sampled/em']:.3f} (temperature {cfg.rollout.temperature:g})"
        logger.info("eval (%s): %s on %d questions", tag, text, len(res.eval_examples))
        return metrics

    def validate(self) -> dict[str, float]:
        """Per-dataset validation on a fixed seeded subsample of the held-out set (``val/<dataset>/*``)."""
        res, cfg = self.resources, self.config
        sets = validation_sets(res.eval_examples, cfg.trainer.val_size, cfg.trainer.seed)
        return validate(
            res.engine,
            res.tokenizer,
            res.retriever,
            sets,
            cfg.rollout,
            metric=cfg.reward.metric,
            hit_mode=cfg.reward.hit_mode,
            seed=cfg.trainer.seed,
        )

    def save(self) -> Path:
        state = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "bad_updates": self.bad_updates,
            "skipped_updates": self.skipped_updates,
            "rollbacks": self.rollbacks,
        }
        return save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.resources.tokenizer,
            self.optimizer,
            self.scheduler,
            state,
            keep_last=self.config.trainer.keep_last,
            run_id=self.run_id,
        )

    # ------------------------------------------------------------------ the run
    def _generation_precision(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for rollouts and evaluations when the run uses it for updates (trainer.bf16):
        on a CPU with bf16 instructions generation is the other half of a step's time."""
        return autocast_context(self.resources.device, self.resources.bf16)

    @property
    def _interactive(self) -> bool:
        """A live progress bar only on a terminal; otherwise progress is reported as log lines."""
        return sys.stderr.isatty()

    def train(self) -> TrainSummary:
        from tqdm.contrib.logging import logging_redirect_tqdm

        start = time.perf_counter()
        if not self._interactive:
            # transformers' own bars (loading weights, converting the GGUF) are carriage-return streams
            # in a log file; progress there is the trainer's log lines.
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        # Log records go through tqdm.write while a bar is shown, so no line glues onto the bar.
        with logging_redirect_tqdm():
            summary = self._train()
        summary.seconds = time.perf_counter() - start
        return summary

    def _train(self) -> TrainSummary:
        self.setup()
        cfg = self.config.trainer
        summary = TrainSummary(run_dir=self.run_dir, steps=self.step, resumed_from=self.step)
        resumed = self.step > 0
        if cfg.eval_before and not resumed:
            summary.eval_before = self.evaluate("before")
            self.logger.log(0, {f"eval/{k}": v for k, v in summary.eval_before.items()})
        monitor = NoSignalMonitor(cfg.no_signal_steps)
        first_step, loop_start = self.step, time.perf_counter()
        with Progress(
            cfg.steps,
            "train",
            "step",
            self._interactive,
            initial=self.step,
            enabled=cfg.progress,
            log_every=1,
        ) as progress:
            while self.step < cfg.steps:
                metrics = self.train_step()
                self.step += 1
                if cfg.val_every and self.step % cfg.val_every == 0:
                    metrics.update(self.validate())
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    metrics.update({f"eval/{k}": v for k, v in self.evaluate(f"step {self.step}").items()})
                self.logger.log(self.step, metrics)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    summary.checkpoint = self.save()
                warning = monitor.observe(metrics, self.config)
                if warning is not None:
                    logger.warning(warning)
                    summary.warnings.append(warning)
                per_step = (time.perf_counter() - loop_start) / (self.step - first_step)
                line = step_line(
                    self.step, cfg.steps, metrics, eta_seconds=per_step * (cfg.steps - self.step)
                )
                progress.advance(1, postfix=line if self._interactive else None, line=line)
        summary.steps = self.step
        summary.eval_after = self.evaluate("after")
        summary.heldout_files = [
            path
            for tag in ("before", "after")
            for decoding in DECODINGS
            if (path := self.run.heldout_file(tag, decoding)).is_file()
        ]
        if summary.eval_before:
            summary.behaviour = behaviour_change(summary.eval_before, summary.eval_after)
        self.logger.log(self.step, {f"eval/{k}": v for k, v in summary.eval_after.items()})
        if summary.checkpoint is None or not summary.checkpoint.name.endswith(f"{self.step:08d}"):
            summary.checkpoint = self.save()
        self.logger.close()
        summary.skipped_updates = self.skipped_updates
        summary.rollbacks = self.rollbacks
        if cfg.plots:
            from tspo.analysis.plots import plot_run

            try:
                summary.plots = plot_run(self.run_dir)
            except Exception as err:  # plots are a convenience; never fail a finished run on them
                logger.warning("plotting failed: %s", err)
        return summary


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in eval mode with no parameter requiring grad (the KL reference)."""
    reference = copy.deepcopy(model).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


def _rollout_metrics(
    trajectories: Sequence[Trajectory], scores: Sequence[TrajectoryScore]
) -> dict[str, float]:
    n = max(1, len(trajectories))

    def mean(values: Sequence[float]) -> float:
        return float(sum(values) / n) if values else 0.0

    totals = [s.total_reward for s in scores]
    return {
        "reward/mean": mean(totals),
        "reward/max": max(totals) if totals else 0.0,
        "outcome/mean": mean([s.outcome for s in scores]),
        "rollout/trajectories": len(trajectories),
        "rollout/searches_per_traj": mean([t.num_searches for t in trajectories]),
        "rollout/turns_per_traj": mean([t.num_turns for t in trajectories]),
        "rollout/invalid_actions": mean([t.num_invalid for t in trajectories]),
        "rollout/response_length": mean([t.num_generated_tokens for t in trajectories]),
        "rollout/observation_length": mean([t.num_observation_tokens for t in trajectories]),
        "rollout/truncated": mean([float(t.truncated) for t in trajectories]),
        "rollout/errors": mean([float(t.error is not None) for t in trajectories]),
        "rollout/answered": mean([float(s.answer is not None) for s in scores]),
        "rollout/first_hit_rate": mean([float(s.first_hit_turn is not None) for s in scores]),
    }
