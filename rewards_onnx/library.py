"""The base reward library: a few style rewards per base model, made from contrasting system prompts.

Each base reward is distilled (the base answers under a style's system prompt and the data keeps
the answers without it, rewards_onnx/distill.py), then tuned (rewards_onnx/train.py). A reward
thus moves the bare model toward that style. All of them are tuned with one seed and the embedding
frozen, so they share it and run merged, in one session per step (engine/runtime/mixing.py).

``check_library`` measures what each reward does: replies to prompts not used in training, with
and without the reward (same seeds), and the style's marker on each, e.g. words per reply.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.runtime.base_model import BaseModel
from engine.runtime.decode import RewardSlot, attach_rewards
from engine.runtime.errors import PrtError
from engine.runtime.rewards import RewardCard, card_path, write_card
from engine.runtime.steering import SamplingConfig
from rewards_onnx.distill import QUESTION_FORMS, distill
from rewards_onnx.teacher import ProgressCount, answer_prompts

if TYPE_CHECKING:  # building imports torch (rewards_onnx.train) when it runs; checking never does
    from rewards_onnx.train import Progress, TuneConfig, TuneReport

DEFAULT_COUNT = 120  # distilled answers per reward; at 40, two of the four rewards did not move their marker
TEACHER_TEMPERATURE = 0.7  # distillation and check sample at this temperature
CHECK_MAX_TOKENS = 256
SIGNIFICANT_ERRORS = 2.0  # a marker "moved" when its shift exceeds this many standard errors (about 95%)
# Topics never used by the distilled training data (rewards_onnx/distill.TOPICS), for check prompts
CHECK_TOPICS = [
    "umbrellas",
    "glaciers",
    "libraries",
    "trains",
    "kites",
    "snowflakes",
    "lighthouses",
    "owls",
    "bridges",
    "clocks",
    "forests",
    "soap",
    "pianos",
    "tomatoes",
    "airports",
    "volunteering",
    "museums",
    "helmets",
]


class LibraryError(PrtError):
    """The library folder is missing or holds no base rewards."""


# -- markers: one number per reply --------------------------------------------------------------------
def word_count(text: str) -> float:
    return float(len(text.split()))


LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S")


def list_line_share(text: str) -> float:
    """Share of non-empty lines that are list items ("- x", "* x", "1. x", "2) x")."""
    lines = [line for line in text.splitlines() if line.strip()]
    return sum(bool(LIST_ITEM.match(line)) for line in lines) / len(lines) if lines else 0.0


WORD = re.compile(r"[A-Za-z]+")


def mean_word_length(text: str) -> float:
    """Letters per word: plain, everyday words are short."""
    words = WORD.findall(text)
    return sum(map(len, words)) / len(words) if words else 0.0


PERSONAL_WORD = re.compile(r"\b(?:i|me|my|mine|you|your|yours)\b", re.IGNORECASE)  # "I'm", "you're" count too


def personal_words_per_100_words(text: str) -> float:
    """First- and second-person words per 100 words: a reply that speaks as "I" to "you"."""
    words = len(text.split())
    return 100.0 * len(PERSONAL_WORD.findall(text)) / words if words else 0.0


@dataclass(frozen=True)
class BaseStyle:
    name: str  # file stem and reward name
    label: str  # the short human label on the card
    system: str  # the teacher's system prompt
    marker: Callable[[str], float]
    marker_name: str
    direction: int  # +1: the reward should raise the marker; -1: lower it
    max_tokens: int = 160  # the distillation's budget per answer (longer answers are dropped)


# Chosen because SmolLM2-135M-Instruct follows these prompts measurably (its answers under them move the
# marker); it ignored prompts for questions back, exclamations, emojis or a formal register.
STYLES = (
    BaseStyle(
        "concise",
        "Short and to the point",
        "Answer in one short sentence.",
        word_count,
        "words per reply",
        -1,
        max_tokens=96,
    ),
    BaseStyle(
        "structured",
        "Bulleted lists",
        "Answer as a bulleted list of short points, each on its own line starting with '- '.",
        list_line_share,
        "share of lines that are list items",
        +1,
    ),
    BaseStyle(
        "simple",
        "Simple words",
        "Explain like I'm five years old: use very simple, short words.",
        mean_word_length,
        "letters per word",
        -1,
    ),
    BaseStyle(
        "casual",
        "Casual and personal",
        "Chat like a close friend: casual, warm, and personal. Say what you think using 'I', and talk to me as 'you'.",
        personal_words_per_100_words,
        "'I'/'you' words per 100 words",
        +1,
        max_tokens=256,
    ),  # at 160, 30 of 240 answers ended in time
)


def check_prompts(count: int) -> list[str]:
    """``count`` questions on topics the training data never used, in the training data's question forms."""
    prompts = [form.format(topic) for topic, form in itertools.product(CHECK_TOPICS, QUESTION_FORMS)]
    if not 1 <= count <= len(prompts):
        raise ValueError(f"prompts must be between 1 and {len(prompts)}, got {count}")
    random.Random(0).shuffle(prompts)
    return prompts[:count]


# -- build ----------------------------------------------------------------------------------------------
@dataclass
class BuiltReward:
    style: BaseStyle
    path: Path
    examples: int
    distill_seconds: float
    tuned: TuneReport

    def to_json(self) -> dict:
        return {
            "name": self.style.name,
            "label": self.style.label,
            "path": str(self.path),
            "examples": self.examples,
            "distill_seconds": round(self.distill_seconds, 1),
            "tune_seconds": round(self.tuned.seconds, 1),
            "teacher_seconds": round(self.tuned.teacher_seconds, 1),
            "held_out": self.tuned.held_out.to_json(),
        }


def build_library(
    base: BaseModel,
    out_dir: Path,
    *,
    count: int = DEFAULT_COUNT,
    styles: Sequence[BaseStyle] = STYLES,
    config: TuneConfig | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> list[BuiltReward]:
    """Distill and tune one reward per style into ``out_dir`` (created if needed); one tune seed for all of them,
    and the embedding frozen, so that they share it and run merged."""
    from rewards_onnx.train import TuneConfig

    config = replace(config or TuneConfig(), train_embedding=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = on_progress or (lambda progress: None)
    return [build_reward(base, style, out_dir, count=count, config=config, report=report) for style in styles]


def build_reward(
    base: BaseModel,
    style: BaseStyle,
    out_dir: Path,
    *,
    count: int,
    config: TuneConfig,
    report: Callable[[Progress], None],
) -> BuiltReward:
    from rewards_onnx.train import Progress, tune

    started = time.perf_counter()

    def distill_progress(done: int, total: int) -> None:
        report(Progress("distill", done, total, time.perf_counter() - started, style.name))

    examples = distill(
        base,
        style.system,
        count,
        max_tokens=style.max_tokens,
        temperature=TEACHER_TEMPERATURE,
        seed=config.seed,
        progress=distill_progress,
    )
    distill_seconds = time.perf_counter() - started
    tuned = tune(
        base,
        examples,
        out_dir / f"{style.name}.onnx",
        config=config,
        name=style.name,
        on_progress=lambda progress: report(replace(progress, message=f"{style.name} {progress.message}")),
    )
    _label_card(tuned, style, examples=len(examples), distill_seconds=distill_seconds)
    return BuiltReward(style, tuned.path, len(examples), distill_seconds, tuned)


def _label_card(tuned: TuneReport, style: BaseStyle, *, examples: int, distill_seconds: float) -> None:
    card = RewardCard.load(card_path(tuned.path))
    card.label = style.label
    card.description = (
        f"{style.label}: moves the model toward its answers under the system prompt "
        f'"{style.system}" ({examples} distilled answers).'
    )
    card.metrics["library"] = {
        "marker": style.marker_name,
        "direction": style.direction,
        "distill_seconds": round(distill_seconds, 1),
        "tune_seconds": round(tuned.seconds, 1),
    }
    write_card(tuned.path, card)


# -- check ----------------------------------------------------------------------------------------------
@dataclass
class MarkerCheck:
    """A style's marker on each held-out reply, three ways (same prompts, same seeds)."""

    style: BaseStyle
    without: list[float]  # the bare base model
    steered: list[float]  # the base with the reward at weight 1
    teacher: list[float]  # the base given the style's system prompt: where the reward was trained to go

    @property
    def shift(self) -> float:
        """Mean change of the marker that the reward made."""
        return float(np.mean(self.steered) - np.mean(self.without))

    @property
    def shift_standard_error(self) -> float:
        differences = np.subtract(self.steered, self.without)
        return float(differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else float("nan")

    @property
    def moved(self) -> bool:
        """Whether the reward moved the marker in the intended direction by more than two standard errors."""
        return self.style.direction * self.shift > SIGNIFICANT_ERRORS * self.shift_standard_error

    def to_json(self) -> dict:
        return {
            "reward": self.style.name,
            "label": self.style.label,
            "marker": self.style.marker_name,
            "direction": "up" if self.style.direction > 0 else "down",
            "prompts": len(self.without),
            "without": round(float(np.mean(self.without)), 4),
            "with": round(float(np.mean(self.steered)), 4),
            "teacher": round(float(np.mean(self.teacher)), 4),
            "shift": round(self.shift, 4),
            "shift_standard_error": round(self.shift_standard_error, 4),
            "moved": self.moved,
        }


def styles_named(names: Sequence[str]) -> list[BaseStyle]:
    """The styles with these names, in library order; every name must be a style."""
    known = {style.name for style in STYLES}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise LibraryError(f"Unknown style {', '.join(unknown)}; the styles are {', '.join(sorted(known))}.")
    return [style for style in STYLES if style.name in names]


def library_rewards(folder: Path, styles: Sequence[BaseStyle] = STYLES) -> list[tuple[BaseStyle, Path]]:
    found = [(style, path) for style in styles if (path := Path(folder) / f"{style.name}.onnx").is_file()]
    if not found:
        raise LibraryError(f"No base rewards in {folder}; build them with 'prt library build'.")
    return found


def check_library(
    base: BaseModel,
    folder: Path,
    *,
    prompts: int = 32,
    max_tokens: int = CHECK_MAX_TOKENS,
    styles: Sequence[BaseStyle] = STYLES,
    progress: Callable[[int, int], None] | None = None,
) -> list[MarkerCheck]:
    """Each reward's marker on held-out prompts: bare base, base + reward, base under the style's prompt."""
    rewards = library_rewards(folder, styles)
    questions = check_prompts(prompts)
    answered = ProgressCount(len(questions) * (1 + 2 * len(rewards)), progress)
    config = SamplingConfig(temperature=TEACHER_TEMPERATURE, max_tokens=max_tokens)

    def replies(system: str | None, slots: list[RewardSlot]) -> list[str]:
        asked = [(question, system) for question in questions]
        return [r.text for r in answer_prompts(base, asked, rewards=slots, config=config, on_reply=answered.advance)]

    plain = replies(None, [])
    checks = []
    for style, path in rewards:
        steered, teacher = replies(None, attach_rewards(base, [(path, 1.0)])), replies(style.system, [])
        checks.append(
            MarkerCheck(style, *([style.marker(text) for text in texts] for texts in (plain, steered, teacher)))
        )
    return checks
