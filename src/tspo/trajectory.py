"""The turn-first trajectory data model (DESIGN section 2).

A trajectory is ``prompt, g_1, o_1, g_2, o_2, ..., g_K``: ``g_k`` are the tokens the policy generated
in call k and ``o_k`` the observation tokens the environment appended. Turn k is ``g_k`` plus ``o_k``.
Token ids are kept exactly as generated (token-in / token-out); observations are tokenized once and
appended, and text is never decoded and re-tokenized to rebuild the sequence.

Every per-token field has one entry per response token:
``loss_mask`` is 1 only on generated tokens, ``turn_index`` names the turn of each token and
``sample_logprobs`` holds the sampler's log-probability of generated tokens (0.0 on observations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from tspo.doc import Doc
from tspo.protocol import (
    DEFAULT_PROTOCOL,
    ProtocolConfig,
    extract_answer,
    retrieved_passages,
    retrieved_text,
)


class TurnAction(str, Enum):
    """What a turn did."""

    SEARCH = "search"
    ANSWER = "answer"
    INVALID = "invalid"
    # The generation hit a token or context limit before closing an action tag.
    TRUNCATED = "truncated"


class StopReason(str, Enum):
    """Why a trajectory ended (``Trajectory.metadata["stop_reason"]``); one vocabulary for every loop."""

    ANSWER = "answer"
    # The generation reached its own token limit without closing an action tag.
    GENERATION_TRUNCATED = "generation_truncated"
    # The final, search-less generation searched anyway; the search is not run.
    SEARCH_AFTER_LIMIT = "search_after_limit"
    # The final generation was an invalid action.
    INVALID_FINAL = "invalid_final"
    # The token budget (prompt + response, or response alone under verl) is spent.
    CONTEXT_LIMIT = "context_limit"
    # The prompt alone fills the context: nothing was generated.
    PROMPT_TOO_LONG = "prompt_too_long"
    # The retriever failed for this trajectory's query (``Trajectory.error`` says how).
    RETRIEVAL_ERROR = "retrieval_error"
    # The generation server aborted the request (verl) and returned nothing.
    ABORTED = "aborted"


@dataclass
class Turn:
    """One call of the policy plus what the environment appended after it.

    Spans are ``[start, end)`` offsets into the trajectory's response tokens.
    """

    index: int
    action: TurnAction
    generated_text: str
    generated_span: tuple[int, int]
    content: str = ""
    invalid_reason: str | None = None
    observation_text: str = ""
    observation_span: tuple[int, int] | None = None
    docs: tuple[Doc, ...] = ()
    generation_truncated: bool = False
    observation_truncated: bool = False
    error: str | None = None

    @property
    def query(self) -> str | None:
        return self.content if self.action is TurnAction.SEARCH else None

    @property
    def end(self) -> int:
        """Response offset just past this turn (its observation included)."""
        return self.observation_span[1] if self.observation_span else self.generated_span[1]


@dataclass
class Trajectory:
    """A complete multi-turn rollout of one prompt.

    Attributes:
        prompt_ids: prompt token ids (chat template applied).
        response_ids: every token after the prompt, generated and observed, in order.
        loss_mask: 1 for generated tokens, 0 for observation tokens; same length as ``response_ids``.
        turn_index: turn of each response token (0-based).
        sample_logprobs: the sampler's log-probability of each generated token; 0.0 on observations.
        turns: per-turn records (action, query, docs, observation text, spans).
        question / golds: the task, kept for scoring and dumps.
        group_id: rollouts of the same prompt share it.
        context_truncated: the total-context limit ended the rollout.
        error: an environment error (e.g. the retriever failed) that ended this trajectory.
    """

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turn_index: list[int] = field(default_factory=list)
    sample_logprobs: list[float] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    question: str = ""
    golds: tuple[str, ...] = ()
    group_id: int = 0
    sample_id: str = ""
    context_truncated: bool = False
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the per-token fields agree with each other and with the turn spans.

        Raises ``ValueError`` naming the first mismatch (field, turn and offset).
        """
        n = len(self.response_ids)
        for name in ("loss_mask", "turn_index", "sample_logprobs"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"trajectory field {name} has {len(getattr(self, name))} entries, response_ids has {n}"
                )
        if not self.turns:
            if n:
                raise ValueError(f"trajectory has {n} response tokens but no turns")
            return
        offset = 0
        for turn in self.turns:
            spans = [(turn.generated_span, 1)]
            if turn.observation_span is not None:
                spans.append((turn.observation_span, 0))
            for (start, end), generated in spans:
                if start != offset or end < start:
                    raise ValueError(
                        f"turn {turn.index}: span ({start}, {end}) does not start at offset {offset}"
                    )
                self._check_span(turn.index, start, end, generated)
                offset = end
        if offset != n:
            raise ValueError(f"turn spans cover {offset} of the {n} response tokens")

    def _check_span(self, turn: int, start: int, end: int, generated: int) -> None:
        kind = "generated" if generated else "observation"
        for pos in range(start, end):
            if self.turn_index[pos] != turn:
                raise ValueError(f"turn {turn}: turn_index[{pos}] is {self.turn_index[pos]}")
            if self.loss_mask[pos] != generated:
                raise ValueError(f"turn {turn}: loss_mask[{pos}] must be {generated} on a {kind} token")
            if not generated and self.sample_logprobs[pos] != 0.0:
                raise ValueError(f"turn {turn}: sample_logprobs[{pos}] must be 0 on an observation token")

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def num_generated_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def num_observation_tokens(self) -> int:
        return len(self.loss_mask) - sum(self.loss_mask)

    @property
    def num_searches(self) -> int:
        return sum(turn.action is TurnAction.SEARCH for turn in self.turns)

    @property
    def num_invalid(self) -> int:
        return sum(turn.action is TurnAction.INVALID for turn in self.turns)

    @property
    def generated_texts(self) -> list[str]:
        return [turn.generated_text for turn in self.turns]

    @property
    def observation_texts(self) -> list[str]:
        """Observation text of each turn (``""`` where the turn had none), as the model saw it."""
        return [turn.observation_text for turn in self.turns]

    def retrieved_texts(self, protocol: ProtocolConfig = DEFAULT_PROTOCOL) -> list[str]:
        """Retrieved passage text of each turn, scaffolding removed (passages joined by newlines)."""
        return [retrieved_text(turn.observation_text, protocol) for turn in self.turns]

    def retrieved_passages(self, protocol: ProtocolConfig = DEFAULT_PROTOCOL) -> list[list[str]]:
        """Each turn's retrieved passages (``title\ntext``, as shown to the model); what FOLR matches."""
        return [retrieved_passages(turn.observation_text, protocol) for turn in self.turns]

    def final_answer(self, protocol: ProtocolConfig = DEFAULT_PROTOCOL) -> str | None:
        """The last ``<answer>`` in the generated text only (DESIGN section 3)."""
        return extract_answer(self.generated_texts, protocol)

    @property
    def truncated(self) -> bool:
        return self.context_truncated or any(
            turn.generation_truncated or turn.observation_truncated for turn in self.turns
        )


class TrajectoryBuilder:
    """Builds a :class:`Trajectory` turn by turn, keeping every per-token field aligned."""

    def __init__(self, prompt_ids: Sequence[int], **fields: Any) -> None:
        self._trajectory = Trajectory(prompt_ids=list(prompt_ids), **fields)

    @property
    def trajectory(self) -> Trajectory:
        return self._trajectory

    @property
    def response_length(self) -> int:
        return len(self._trajectory.response_ids)

    def add_generation(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[float] | None,
        text: str,
        action: TurnAction,
        content: str = "",
        invalid_reason: str | None = None,
        truncated: bool = False,
    ) -> Turn:
        """Append the tokens of one policy call as a new turn."""
        if logprobs is not None and len(logprobs) != len(token_ids):
            raise ValueError(f"{len(token_ids)} generated tokens but {len(logprobs)} logprobs")
        action = TurnAction(action)
        traj = self._trajectory
        index = len(traj.turns)
        start = len(traj.response_ids)
        traj.response_ids.extend(int(t) for t in token_ids)
        traj.loss_mask.extend([1] * len(token_ids))
        traj.turn_index.extend([index] * len(token_ids))
        if logprobs is None:
            traj.sample_logprobs.extend([0.0] * len(token_ids))
        else:
            traj.sample_logprobs.extend(float(x) for x in logprobs)
        turn = Turn(
            index=index,
            action=action,
            generated_text=text,
            generated_span=(start, len(traj.response_ids)),
            content=content,
            invalid_reason=invalid_reason,
            generation_truncated=truncated,
        )
        traj.turns.append(turn)
        return turn

    def add_observation(
        self,
        token_ids: Sequence[int],
        text: str,
        docs: Sequence[Doc] = (),
        truncated: bool = False,
    ) -> None:
        """Append the environment's answer to the current turn (masked out of every loss)."""
        traj = self._trajectory
        if not traj.turns:
            raise ValueError("an observation needs a preceding generation turn")
        turn = traj.turns[-1]
        if turn.observation_span is not None:
            raise ValueError(f"turn {turn.index} already has an observation")
        start = len(traj.response_ids)
        traj.response_ids.extend(int(t) for t in token_ids)
        traj.loss_mask.extend([0] * len(token_ids))
        traj.turn_index.extend([turn.index] * len(token_ids))
        traj.sample_logprobs.extend([0.0] * len(token_ids))
        turn.observation_span = (start, len(traj.response_ids))
        turn.observation_text = text
        turn.docs = tuple(docs)
        turn.observation_truncated = truncated

    def build(self) -> Trajectory:
        self._trajectory.validate()
        return self._trajectory


@dataclass
class TrajectoryBatch:
    """Trajectories as padded tensors, verl-style: left-padded prompts, right-padded responses.

    Shapes: B trajectories, P prompt length, L response length, T max turns.

    Attributes:
        prompt_ids: (B, P) long, left-padded with ``pad_token_id``.
        prompt_mask: (B, P) long, 1 on real prompt tokens.
        response_ids: (B, L) long, right-padded.
        response_mask: (B, L) long, 1 on every real response token (generated or observed).
        loss_mask: (B, L) float, 1 only on generated tokens.
        token_turn_index: (B, L) long, turn of each token, -1 on padding.
        sample_logprobs: (B, L) float, sampler logprobs on generated tokens, 0 elsewhere.
        turn_mask: (B, T) bool, True where turn k exists.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    loss_mask: torch.Tensor
    token_turn_index: torch.Tensor
    sample_logprobs: torch.Tensor
    turn_mask: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + L) prompt and response side by side."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + L) 1 on real tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> TrajectoryBatch:
        """Rows ``index`` of every tensor (micro-batching); padding columns are kept."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if index.shape != (self.batch_size,):
                raise ValueError(
                    f"a boolean row mask needs shape ({self.batch_size},), got {tuple(index.shape)}"
                )
            index = index.nonzero(as_tuple=True)[0]
        index = index.long()
        return TrajectoryBatch(**{name: getattr(self, name)[index] for name in _BATCH_FIELDS})

    def to(self, device: torch.device | str) -> TrajectoryBatch:
        return TrajectoryBatch(**{name: getattr(self, name).to(device) for name in _BATCH_FIELDS})


_BATCH_FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "response_ids",
    "response_mask",
    "loss_mask",
    "token_turn_index",
    "sample_logprobs",
    "turn_mask",
)


def collate_trajectories(trajectories: Sequence[Trajectory], pad_token_id: int) -> TrajectoryBatch:
    """Pad ``trajectories`` into a :class:`TrajectoryBatch` (inverse: :func:`uncollate`)."""
    if not trajectories:
        raise ValueError("cannot collate an empty list of trajectories")
    batch_size = len(trajectories)
    prompt_len = max(len(t.prompt_ids) for t in trajectories)
    response_len = max(1, max(len(t.response_ids) for t in trajectories))
    max_turns = max(1, max(t.num_turns for t in trajectories))

    prompt_ids = torch.full((batch_size, prompt_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((batch_size, prompt_len), dtype=torch.long)
    response_ids = torch.full((batch_size, response_len), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((batch_size, response_len), dtype=torch.long)
    loss_mask = torch.zeros((batch_size, response_len), dtype=torch.float32)
    token_turn_index = torch.full((batch_size, response_len), -1, dtype=torch.long)
    sample_logprobs = torch.zeros((batch_size, response_len), dtype=torch.float32)
    turn_mask = torch.zeros((batch_size, max_turns), dtype=torch.bool)

    for row, traj in enumerate(trajectories):
        traj.validate()
        n_prompt, n_response = len(traj.prompt_ids), len(traj.response_ids)
        if n_prompt:
            prompt_ids[row, prompt_len - n_prompt :] = torch.tensor(traj.prompt_ids, dtype=torch.long)
            prompt_mask[row, prompt_len - n_prompt :] = 1
        if n_response:
            response_ids[row, :n_response] = torch.tensor(traj.response_ids, dtype=torch.long)
            response_mask[row, :n_response] = 1
            loss_mask[row, :n_response] = torch.tensor(traj.loss_mask, dtype=torch.float32)
            token_turn_index[row, :n_response] = torch.tensor(traj.turn_index, dtype=torch.long)
            sample_logprobs[row, :n_response] = torch.tensor(traj.sample_logprobs, dtype=torch.float32)
        turn_mask[row, : traj.num_turns] = True
    return TrajectoryBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        loss_mask=loss_mask,
        token_turn_index=token_turn_index,
        sample_logprobs=sample_logprobs,
        turn_mask=turn_mask,
    )


@dataclass(frozen=True)
class TokenFields:
    """The per-token fields of one trajectory, unpadded (what :func:`uncollate` returns)."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    turn_index: list[int]
    sample_logprobs: list[float]


def uncollate(batch: TrajectoryBatch) -> list[TokenFields]:
    """Strip the padding of a :class:`TrajectoryBatch`; inverse of :func:`collate_trajectories`."""
    rows: list[TokenFields] = []
    for row in range(batch.batch_size):
        prompt_keep = batch.prompt_mask[row].bool()
        response_keep = batch.response_mask[row].bool()
        rows.append(
            TokenFields(
                prompt_ids=batch.prompt_ids[row][prompt_keep].tolist(),
                response_ids=batch.response_ids[row][response_keep].tolist(),
                loss_mask=[int(x) for x in batch.loss_mask[row][response_keep].tolist()],
                turn_index=batch.token_turn_index[row][response_keep].tolist(),
                sample_logprobs=batch.sample_logprobs[row][response_keep].tolist(),
            )
        )
    return rows
