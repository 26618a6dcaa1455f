"""The agent protocol: instruction template, action parsing and observation formatting.

Search-R1 compatible by default (Jin et al. 2025, "Search-R1"): the model reasons in
``<think>...</think>``, searches with ``<search> query </search>``, reads
``<information>...</information>`` and answers with ``<answer> ... </answer>``. Every string here is a
field of :class:`ProtocolConfig`, so other tag sets or instructions are a config change, not a fork.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cached_property

from tspo.doc import Doc

SEARCH_R1_INSTRUCTION = (
    "Answer the given question. "
    "You must conduct reasoning inside <think> and </think> first every time you get new information. "
    "After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. "
    "If you find no further external knowledge needed, you can directly provide the answer inside "
    "<answer> and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: {question}\n"
)

INVALID_ACTION_MESSAGE = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
    "</search>. If I want to give the final answer, I should put the answer between <answer> and "
    "</answer>. Let me try again.\n"
)


class ActionKind(str, Enum):
    """What a generated segment asks the environment to do."""

    SEARCH = "search"
    ANSWER = "answer"
    INVALID = "invalid"


class InvalidReason(str, Enum):
    """Why a segment is not a valid action (recorded per turn for diagnostics)."""

    NO_TAG = "no_tag"
    UNCLOSED_TAG = "unclosed_tag"
    EMPTY_CONTENT = "empty_content"
    # Never returned by parse_action: a well-formed search in the final, search-less generation.
    SEARCH_AFTER_LIMIT = "search_after_limit"


@dataclass(frozen=True)
class ParsedAction:
    """The action of one generated segment.

    Attributes:
        kind: search, answer or invalid.
        content: the stripped query or answer; empty for invalid actions.
        reason: why the action is invalid, ``None`` for valid ones.
        end: index in the segment just past the closing tag (``len(text)`` when invalid); text after
            it is discarded, as generation would have stopped there.
    """

    kind: ActionKind
    content: str = ""
    reason: InvalidReason | None = None
    end: int = 0


@dataclass(frozen=True)
class WorkedExample:
    """One solved question shown before the real one (a few-shot example).

    Attributes:
        question: the example's question (from the training split).
        searches: ``(query, retrieved docs)`` per search turn, in order; the docs are what the configured
            retriever returned for the query, so the example looks exactly like a real rollout.
        answer: the final answer (a gold alias).
    """

    question: str
    searches: tuple[tuple[str, tuple[Doc, ...]], ...]
    answer: str


@dataclass(frozen=True)
class ProtocolConfig:
    """Tags and texts of the agent protocol (defaults reproduce Search-R1)."""

    instruction: str = field(
        default=SEARCH_R1_INSTRUCTION,
        metadata={"help": "instruction template; must contain '{question}'"},
    )
    search_tag: str = field(default="search", metadata={"help": "tag name of a search call"})
    answer_tag: str = field(default="answer", metadata={"help": "tag name of the final answer"})
    information_tag: str = field(default="information", metadata={"help": "tag wrapping retrieved docs"})
    observation_padding: str = field(
        default="\n\n",
        metadata={
            "help": "whitespace before and after each <information> block (Search-R1: two newlines; "
            "small models few-shot prompted follow the format better with one)"
        },
    )
    invalid_action_message: str = field(
        default=INVALID_ACTION_MESSAGE, metadata={"help": "observation appended after an invalid action"}
    )
    append_question_mark: bool = field(
        default=True,
        metadata={"help": "append '?' to a question that lacks one (Search-R1's data scripts do)"},
    )
    use_chat_template: bool = field(
        default=True,
        metadata={"help": "wrap the instruction as a user turn when the tokenizer has a template"},
    )
    examples: int = field(
        default=0,
        metadata={
            "help": "worked examples placed before the question (few-shot): complete search / information "
            "/ answer trajectories of training questions with real retrieval results; 0 = zero-shot"
        },
    )
    # The rendered examples themselves: chosen at run time (they need the training split and the
    # retriever), so not a config key; ``with_worked_examples`` attaches them.
    worked_examples: tuple[WorkedExample, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if "{question}" not in self.instruction:
            raise ValueError("protocol.instruction must contain the placeholder '{question}'")
        tags = (self.search_tag, self.answer_tag, self.information_tag)
        for name, value in zip(("search_tag", "answer_tag", "information_tag"), tags, strict=True):
            if not value or not re.fullmatch(r"[A-Za-z_][\w-]*", value):
                raise ValueError(f"protocol.{name} must be a plain tag name, got {value!r}")
        if self.observation_padding.strip(" \n"):
            raise ValueError(
                f"protocol.observation_padding must be spaces and newlines, got {self.observation_padding!r}"
            )
        if self.examples < 0:
            raise ValueError(f"protocol.examples must be >= 0, got {self.examples}")
        if len(set(tags)) != len(tags):
            raise ValueError(
                f"protocol tags must be distinct, got search={tags[0]!r} answer={tags[1]!r} "
                f"information={tags[2]!r}"
            )

    def with_worked_examples(self, examples: Sequence[WorkedExample]) -> ProtocolConfig:
        """A copy of this protocol whose prompts start with ``examples`` (see :func:`few_shot_turns`)."""
        copy = replace(self)
        object.__setattr__(copy, "worked_examples", tuple(examples))
        return copy

    @property
    def stop_strings(self) -> tuple[str, str]:
        """Generation of a turn stops at the first of these (DESIGN section 3)."""
        return (f"</{self.search_tag}>", f"</{self.answer_tag}>")

    @cached_property
    def _action_pattern(self) -> re.Pattern[str]:
        # An opening tag, then content holding no other protocol tag, then the matching close tag.
        # The "no other tag" rule makes nested tags resolve to the innermost complete pair.
        tags = f"{re.escape(self.search_tag)}|{re.escape(self.answer_tag)}"
        return re.compile(rf"<({tags})>((?:(?!</?(?:{tags})>).)*?)</\1>", re.DOTALL)

    @cached_property
    def _open_tag_pattern(self) -> re.Pattern[str]:
        tags = f"{re.escape(self.search_tag)}|{re.escape(self.answer_tag)}"
        return re.compile(rf"<({tags})>")


DEFAULT_PROTOCOL = ProtocolConfig()


def normalize_question(question: str, config: ProtocolConfig = DEFAULT_PROTOCOL) -> str:
    """The question as it goes into the prompt: stripped, with ``?`` appended when missing.

    Search-R1's ``qa_search_{train,test}_merge.py`` do exactly this (even after a final ``.``), so
    prompts built here are byte-identical to the ones its parquet files hold.
    """
    question = question.strip()
    if config.append_question_mark and question and not question.endswith("?"):
        question += "?"
    return question


def build_instruction(question: str, config: ProtocolConfig = DEFAULT_PROTOCOL) -> str:
    """The user-turn text for ``question`` (Search-R1's prompt by default)."""
    return config.instruction.replace("{question}", normalize_question(question, config))


def build_prompt_messages(question: str, config: ProtocolConfig = DEFAULT_PROTOCOL) -> list[dict[str, str]]:
    """The prompt as chat messages (the form verl parquet files and chat templates take): each worked
    example as a user turn and the assistant's response, then the question's user turn."""
    messages = []
    for instruction, response in few_shot_turns(config):
        messages += [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
    return [*messages, {"role": "user", "content": build_instruction(question, config)}]


def example_segments(example: WorkedExample, config: ProtocolConfig = DEFAULT_PROTOCOL) -> list[str]:
    """A worked example's response as a rollout would hold it, one string per segment: each generated
    action, the observation :func:`format_observation` renders for it, ..., then the answer. Prompts
    tokenize each segment on its own, as the rollout loop does, so the tokens match a real rollout's."""
    segments = []
    for query, docs in example.searches:
        segments.append(f"<{config.search_tag}> {query} </{config.search_tag}>")
        segments.append(format_observation(docs, config))
    segments.append(f"<{config.answer_tag}> {example.answer} </{config.answer_tag}>")
    return segments


def example_response(example: WorkedExample, config: ProtocolConfig = DEFAULT_PROTOCOL) -> str:
    """A worked example's whole response text (:func:`example_segments` joined)."""
    return "".join(example_segments(example, config))


def few_shot_turns(config: ProtocolConfig = DEFAULT_PROTOCOL) -> list[tuple[str, str]]:
    """``(instruction, response)`` of each attached worked example, in order."""
    return [
        (build_instruction(ex.question, config), example_response(ex, config))
        for ex in config.worked_examples
    ]


#: Between a worked example's answer and the next instruction when no chat template separates them.
EXAMPLE_SEPARATOR = "\n\n"


def build_prompt_text(question: str, config: ProtocolConfig = DEFAULT_PROTOCOL) -> str:
    """The prompt without a chat template: each worked example as a complete episode (instruction and
    response), then the instruction for ``question``. Without examples it is :func:`build_instruction`
    byte for byte (Search-R1's prompt)."""
    shots = "".join(
        f"{instruction}{response}{EXAMPLE_SEPARATOR}" for instruction, response in few_shot_turns(config)
    )
    return shots + build_instruction(question, config)


def parse_action(text: str, config: ProtocolConfig = DEFAULT_PROTOCOL) -> ParsedAction:
    """Parse one generated segment into a search, an answer or an invalid action.

    Rules (each deliberate and tested):
    - the first *complete* ``<search>``/``<answer>`` pair wins (earliest closing tag); text after its
      closing tag is ignored;
    - nested tags resolve to the innermost complete pair (``<search>a <search>b</search>`` -> ``b``);
    - a pair whose content is only whitespace is invalid (``EMPTY_CONTENT``);
    - an opening tag without its closing tag is invalid (``UNCLOSED_TAG``);
    - no tag at all is invalid (``NO_TAG``).
    """
    match = config._action_pattern.search(text)
    if match is None:
        reason = InvalidReason.UNCLOSED_TAG if config._open_tag_pattern.search(text) else InvalidReason.NO_TAG
        return ParsedAction(ActionKind.INVALID, reason=reason, end=len(text))
    content = match.group(2).strip()
    if not content:
        return ParsedAction(ActionKind.INVALID, reason=InvalidReason.EMPTY_CONTENT, end=match.end())
    kind = ActionKind.SEARCH if match.group(1) == config.search_tag else ActionKind.ANSWER
    return ParsedAction(kind, content=content, end=match.end())


def extract_answer(generated_texts: Sequence[str], config: ProtocolConfig = DEFAULT_PROTOCOL) -> str | None:
    """The content of the last complete ``<answer>`` in the model's generated text.

    Takes the generated segments only (never the prompt or observations), so an answer tag quoted in
    the instruction or inside a retrieved passage can never be scored as the model's answer.
    Returns ``None`` when the model gave no answer.
    """
    tag = re.escape(config.answer_tag)
    pattern = re.compile(rf"<{tag}>((?:(?!</?{tag}>).)*?)</{tag}>", re.DOTALL)
    last: str | None = None
    for segment in generated_texts:
        for match in pattern.finditer(segment):
            last = match.group(1).strip()
    return last


def format_documents(docs: Sequence[Doc]) -> str:
    """Search-R1's passage list: ``Doc 1(Title: t) text`` one per line."""
    return "\n".join(f"Doc {rank}(Title: {doc.title}) {doc.text}" for rank, doc in enumerate(docs, start=1))


def format_observation(docs: Sequence[Doc], config: ProtocolConfig = DEFAULT_PROTOCOL) -> str:
    """The observation appended after a search turn: ``\\n\\n<information>...</information>\\n\\n``
    (the padding is ``config.observation_padding``)."""
    tag, pad = config.information_tag, config.observation_padding
    return f"{pad}<{tag}>{format_documents(docs).strip()}</{tag}>{pad}"


_DOC_HEADER = re.compile(r"Doc \d+\(Title: (.*?)\) ")


def retrieved_text(observation: str, config: ProtocolConfig = DEFAULT_PROTOCOL) -> str:
    """The retrieved passages inside an observation's ``<information>`` blocks, without scaffolding.

    What FOLR inspects: the ``Doc N(Title: t)`` headers become ``t`` and the tags are dropped, so an
    alias such as "1" or "information" never hits on the template, and the invalid-action message
    (which has no information block) never counts as retrieved text. A block whose closing tag was cut
    by observation truncation is read to the end of the text.
    """
    tag = re.escape(config.information_tag)
    blocks = re.findall(rf"<{tag}>(.*?)(?:</{tag}>|$)", observation, flags=re.DOTALL)
    return "\n".join(_DOC_HEADER.sub(lambda m: f"{m.group(1)}\n", block) for block in blocks)


def retrieved_passages(observation: str, config: ProtocolConfig = DEFAULT_PROTOCOL) -> list[str]:
    """Each retrieved passage of an observation as ``title\ntext``, in order, scaffolding removed.

    FOLR matches a gold alias inside one passage at a time, so an alias can never straddle two passages
    ("...moved to New" + "York is a city..."), as in Search-R1's ``is_retrieval_correct``. Text in a block
    before its first ``Doc N(Title: ...)`` header (a block not in the document format) is one passage.
    """
    tag = re.escape(config.information_tag)
    passages: list[str] = []
    for block in re.findall(rf"<{tag}>(.*?)(?:</{tag}>|$)", observation, flags=re.DOTALL):
        pieces = _DOC_HEADER.split(block)  # [lead, title 1, text 1, title 2, text 2, ...]
        if pieces[0].strip():
            passages.append(pieces[0])
        passages += [
            f"{title}\n{text.removesuffix(chr(10))}"  # the newline format_documents puts between docs
            for title, text in zip(pieces[1::2], pieces[2::2], strict=True)
        ]
    return passages


def invalid_observation(config: ProtocolConfig = DEFAULT_PROTOCOL) -> str:
    """The corrective observation appended after an invalid action."""
    return config.invalid_action_message


def truncate_segment(text: str, config: ProtocolConfig = DEFAULT_PROTOCOL) -> str:
    """Cut ``text`` just after its first stop string (what a stop-string sampler would have returned)."""
    cut = len(text)
    for stop in config.stop_strings:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position + len(stop))
    return text[:cut]
