"""The base reward library: a few style rewards per base model, made from contrasting system prompts.

Each base reward is distilled (the base answers under a style's system prompt and the data keeps
the answers without it, rewards_onnx/distill.py), then tuned (rewards_onnx/train.py). A reward
thus moves the bare model toward that style. All of them are tuned with one seed and the embedding
frozen, so they share it and run merged, in one session per step (engine/runtime/mixing.py).

``check_library`` measures what each reward does: replies to prompts not used in training, with
and without the reward (same seeds), and the style's marker on each, e.g. words per reply.

A build of every style also writes the library's compact form, ``pack/<model file stem>.json`` and
``.bin`` (``pack_library``): the weights the GGUF does not already hold, as float16. The app ships the
default model's pack in assets/library/ and installs it in seconds (engine.app.onboarding.
install_shipped_library); ``prt library build`` on the default model reproduces those two files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from engine.app.onboarding import (
    LAYER_FIELDS,
    SHIPPED_FORMAT,
    VOLATILE_CARD_FIELDS,
    decode_arrays,
    probe_rewards,
    projected_embedding,
    token_embedding,
)
from engine.runtime.base_model import BaseModel
from engine.runtime.decode import RewardSlot, attach_rewards
from engine.runtime.errors import PrtError
from engine.runtime.files import file_sha256, write_atomically
from engine.runtime.reward_graph import quantize_rows, read_reward_weights
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
    built = [build_reward(base, style, out_dir, count=count, config=config, report=report) for style in styles]
    if [entry.style for entry in built] == list(STYLES):
        try:
            pack_library(base, out_dir, out_dir / PACK_FOLDER, seed=config.seed)
        except LibraryError:  # a base the pack cannot rebuild the embedding from: the rewards are built all the same
            pass
    return built


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


# -- pack: the compact form the app ships ------------------------------------------------------------------
PACK_FOLDER = "pack"
MAX_EMBEDDING_MISMATCH = 1e-3  # share of int8 embedding values the numpy rebuild may round the other way
PROBE_PROMPT = "What is a good way to spend a rainy afternoon?"
PROBE_REPLY = "- Read a book.\n- I'd bake cookies with you, my friend!\nIt is simple and lovely."
STANDARD_PROPERTIES = (
    "prt_contract_version",
    "vocab_size",
    "width",
    "layers",
    "heads",
    "embedding_rank",
)  # the graph builder's own
TIMINGS = ("distill_seconds", "tune_seconds")  # the card's timings, which vary from build to build


def pack_library(
    base: BaseModel, folder: Path, out_dir: Path, *, styles: Sequence[BaseStyle] = STYLES, seed: int = 0
) -> Path:
    """Write ``out_dir/<model file stem>.json`` (the manifest) and ``.bin`` (the weights) for the rewards in
    ``folder``, built for ``base`` with tune seed ``seed``; returns the manifest's path. The same rewards give the
    same two files, byte for byte."""
    rewards = library_rewards(folder, styles)
    embedding_spec = token_embedding_spec(base.path)
    weights = [read_reward_weights(onnx.load(path)) for _, path in rewards]
    rank = weights[0].shape.rank
    mean, directions, scale = embedding_projection(base.path, rank, seed=seed)
    rebuilt, _ = quantize_rows(projected_embedding(token_embedding(base.path, embedding_spec), mean, directions, scale))
    for (style, _), reward in zip(rewards, weights):
        built, _ = quantize_rows(reward.embedding)
        mismatch = float(np.mean(rebuilt != built))
        if mismatch > MAX_EMBEDDING_MISMATCH:
            raise LibraryError(
                f"The {style.name} reward's embedding is not the base's projected one ({mismatch:.2%} of it "
                "differs): was it tuned with the embedding frozen, with this seed?"
            )
    arrays: list[tuple[str, np.ndarray]] = [("embedding.mean", mean), ("embedding.directions", directions)]
    entries = []
    for (style, path), reward in zip(rewards, weights):
        parts = {
            **{
                f"layers.{index}.{name}": getattr(layer, name)
                for index, layer in enumerate(reward.layers)
                for name in LAYER_FIELDS
            },
            "final_scale": reward.final_scale,
            "final_bias": reward.final_bias,
            "head": reward.head,
            "token_bias": reward.token_bias,
            **({"embedding_up": reward.embedding_up} if reward.embedding_up is not None else {}),
        }
        arrays += [(f"{style.name}.{name}", value) for name, value in parts.items()]
        card = json.loads(RewardCard.load(card_path(path)).to_json())
        for name in VOLATILE_CARD_FIELDS:
            card.pop(name)
        for name in TIMINGS:
            card["metrics"].get("library", {}).pop(name, None)
        properties = {entry.key: entry.value for entry in onnx.load(path).metadata_props}
        entries.append(
            {
                "name": style.name,
                "network": {
                    "width": reward.shape.width,
                    "layers": reward.shape.layers,
                    "heads": reward.shape.heads,
                    "mlp_ratio": reward.shape.mlp_ratio,
                    "embedding_rank": reward.shape.embedding_rank,
                },
                "metadata": {key: value for key, value in properties.items() if key not in STANDARD_PROPERTIES},
                "card": card,
            }
        )
    data, stored = _stored_arrays(arrays)
    assert decode_arrays(data, stored).keys() == dict(arrays).keys()
    probe = _probe(base)
    probe["rewards"] = {
        name: np.round(values, 6).tolist() for name, values in probe_rewards([p for _, p in rewards], probe).items()
    }
    manifest = {
        "format_version": SHIPPED_FORMAT,
        "model": {
            "file": base.path.name,
            "name": base.name,
            "sha256": file_sha256(base.path),
            "size": base.path.stat().st_size,
            "vocabulary_fingerprint": base.vocabulary_fingerprint,
        },
        "embedding": {"tensor": embedding_spec, "scale": scale, "seed": seed},
        "weights": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "arrays": stored},
        "rewards": entries,
        "probe": probe,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(base.path).stem
    write_atomically(out_dir / f"{stem}.bin", data)
    write_atomically(out_dir / f"{stem}.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out_dir / f"{stem}.json"


def token_embedding_spec(gguf_path: Path) -> dict:
    """Where the GGUF's token embedding is and how it is stored, for engine.app.onboarding.token_embedding."""
    from gguf import GGUFReader

    tensor = next((t for t in GGUFReader(gguf_path).tensors if t.name == "token_embd.weight"), None)
    if tensor is None or tensor.tensor_type.name not in ("F32", "F16", "Q8_0"):
        raise LibraryError(f"{Path(gguf_path).name} has no token embedding that a pack can rebuild rewards from.")
    return {
        "name": tensor.name,
        "offset": int(tensor.data_offset),
        "type": tensor.tensor_type.name,
        "rows": int(tensor.shape[1]),
        "columns": int(tensor.shape[0]),
    }


def projected_base_embedding(gguf_path: Path, width: int, *, seed: int) -> np.ndarray:
    """The embedding a library reward has (before int8): the base's own, projected as the pack rebuilds it."""
    mean, directions, scale = embedding_projection(gguf_path, width, seed=seed)
    return projected_embedding(token_embedding(gguf_path, token_embedding_spec(gguf_path)), mean, directions, scale)


def embedding_projection(gguf_path: Path, width: int, *, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """rewards_onnx.network.base_embedding_projection's terms: the mean [n_embd], the PCA directions [width, n_embd]
    and the scale, computed as it computes them, so that (E - mean) @ directions.T / scale is its result."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensor = next(t for t in GGUFReader(gguf_path).tensors if t.name == "token_embd.weight")
    matrix = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    matrix = matrix.reshape(-1, int(tensor.shape[0]))
    if width > matrix.shape[1]:
        raise LibraryError(f"A pack needs rewards no wider than the base's embedding ({matrix.shape[1]}), got {width}.")
    mean = matrix.mean(dim=0)
    centered = matrix - mean
    generator = torch.Generator().manual_seed(seed)
    sample = centered[torch.randperm(len(centered), generator=generator)[:16384]]
    _, _, directions = torch.linalg.svd(sample, full_matrices=False)
    projected = centered @ directions[:width].T
    return mean.numpy(), directions[:width].contiguous().numpy(), float(projected.std())


def _stored_arrays(arrays: Sequence[tuple[str, np.ndarray]]) -> tuple[bytes, list[dict]]:
    """The arrays one after another: matrices and the token bias as float16, small vectors as float32 (the
    projection stays float32: every reward's embedding is made from it)."""
    chunks, entries, offset = [], [], 0
    for name, value in arrays:
        exact = name.startswith("embedding.") or (value.ndim == 1 and not name.endswith("token_bias"))
        stored = "float32" if exact else "float16"
        chunk = np.ascontiguousarray(value, dtype="<f4" if exact else "<f2").tobytes()
        entries.append({"name": name, "stored": stored, "shape": list(value.shape), "offset": offset})
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks), entries


def _probe(base: BaseModel) -> dict:
    """Tokens to score the rewards on: a chat prompt and a reply; the candidates are the reply's own tokens."""
    prompt = base.chat_prompt_tokens([{"role": "user", "content": PROBE_PROMPT}])
    reply = base.tokenize(PROBE_REPLY)
    tokens = prompt + reply
    return {
        "tokens": tokens,
        "prefixes": [len(prompt), len(prompt) + len(reply) // 2, len(tokens)],
        "candidates": sorted(set(reply)),
    }


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
