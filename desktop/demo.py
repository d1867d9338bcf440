"""``--demo``: a short canned conversation and a few rewards, without loading any model.

The reply at the end carries a per-token trace built from real StepTrace objects (seeded numbers),
so the token view shows tints and tooltips; it is the second of two alternatives, the chat uses a preset, and
its first turns are marked as left out of the context. The screenshot is the same on every run.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from desktop.token_view import TokenInfo, token_info
from engine.app.chat import RewardInfo
from engine.app.paths import AppPaths
from engine.app.store import Store
from engine.runtime.decode import StepTrace, TokenEvent
from engine.runtime.errors import PrtError
from engine.runtime.rewards import RewardCard
from engine.runtime.steering import steered_scores

DEMO_MODEL = "SmolLM2-135M-Instruct.Q4_1"
NOT_HERE = "This is the demo: no model is loaded. Start the app without --demo to chat."
OTHER_MODEL = "gemma-3-270m-q4_k_m"


@dataclass(frozen=True)
class DemoReward:
    trained_on: str
    training_data: dict
    held_out: dict
    enabled: bool
    weight: float

    def card(self, name: str) -> RewardCard:
        return RewardCard(
            name=name,
            vocabulary_fingerprint=f"sha256:{self.trained_on}",
            vocabulary_size=49152,
            base_model_name=self.trained_on,
            training_data=self.training_data,
            metrics={"held_out": self.held_out},
        )


REWARDS = {
    "concise": DemoReward(
        DEMO_MODEL,
        {"demonstrations": 180, "preference_pairs": 42},
        {
            "tokens": 5210,
            "base_nll": 2.412,
            "steered_nll": 2.035,
            "teacher_nll": 1.87,
            "gap_closed": 0.7,
            "pairs": 12,
            "pair_accuracy": 0.83,
        },
        True,
        1.0,
    ),
    "friendly-tone": DemoReward(
        DEMO_MODEL, {"demonstrations": 64}, {"tokens": 1930, "base_nll": 2.61, "steered_nll": 2.44}, True, 0.5
    ),
    "legal-style": DemoReward(OTHER_MODEL, {"preference_pairs": 300}, {"pairs": 30, "pair_accuracy": 0.77}, False, 1.0),
}
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."
PRESET = "Trail guide"
EARLIER = [  # left out of the demo's context, under the marker
    ("user", "Is a 12 km loop too long for a first hike?"),
    ("assistant", "Not if it is mostly flat: allow four to five hours with breaks."),
]
CONTEXT = {"left_out": len(EARLIER), "used": 1734, "size": 2048}  # as the reply's stats keep it
CONVERSATION = [
    ("user", "What should I pack for a day hike in autumn?"),
    (
        "assistant",
        "For a day hike in autumn, pack:\n\n- **Layers**: a warm fleece and a rain jacket\n"
        "- **Water** (1–2 litres) and snacks\n- A map, a charged phone and a headlamp\n\n"
        "Days are shorter, so start early.",
    ),
    ("user", "And if it rains?"),
]
PASSED_OVER_REPLY = "Rain is part of the fun! Bring a poncho."  # the first reply, regenerated: "< 2/2 >"
TRACED_REPLY = (
    "Then add waterproof trousers and a dry bag for your phone. Wet leaves are slippery, "
    "so wear boots with a good grip and take it slowly on descents."
)


def _not_here(*_args: object, **_kwargs: object) -> NoReturn:
    raise PrtError(NOT_HERE)


class DemoBase:
    """Just enough of a base model for the window: a name and a path, and no tokens."""

    name = DEMO_MODEL
    path = Path(f"{DEMO_MODEL}.gguf")
    token_bytes = staticmethod(_not_here)


class DemoEngine:
    """Answers what the window asks of a ChatEngine from canned data; replying is refused politely."""

    def __init__(self) -> None:
        self.base = DemoBase()
        self.alpha = 1.0
        self._weights: dict[Path, float] = {}

    def describe_rewards(self, paths: Iterable[Path | str]) -> list[RewardInfo]:
        return [self._describe(Path(path)) for path in paths]

    @staticmethod
    def _describe(path: Path) -> RewardInfo:
        reward = REWARDS[path.stem]
        if reward.trained_on == DEMO_MODEL:
            return RewardInfo(path, reward.card(path.stem), True)
        return RewardInfo(
            path,
            reward.card(path.stem),
            False,
            f"Trained for '{reward.trained_on}', whose vocabulary differs from '{DEMO_MODEL}'.",
        )

    def set_active_rewards(self, weights: Mapping[Path | str, float]) -> None:
        self._weights = {Path(path): weight for path, weight in weights.items()}

    def set_alpha(self, alpha: float) -> None:
        self.alpha = alpha

    @property
    def active_reward_names(self) -> list[str]:
        return [path.stem for path, weight in self._weights.items() if weight * self.alpha != 0]

    # no model here: loading one, replying and lending it to the style survey are refused politely
    load_model = reply = run_locked = run_exclusive = staticmethod(_not_here)


def split_into_tokens(text: str) -> list[str]:
    """Word pieces with their leading space, roughly as a BPE tokenizer cuts English."""
    return re.findall(r" ?[\w']+| ?[^\w\s]+|\s+", text)


def traced_tokens(pieces: list[str], vocabulary: list[str], *, seed: int = 7, k: int = 6) -> list[TokenInfo]:
    """TokenInfos from seeded StepTraces: the chosen piece among k candidates, two rewards moving them."""
    rng = np.random.default_rng(seed)
    names = ("concise", "friendly-tone")
    weights = np.array([REWARDS[name].weight for name in names], dtype=np.float32)
    tokens = []
    for piece in pieces:
        chosen_id = vocabulary.index(piece)
        others = rng.choice([i for i in range(len(vocabulary)) if i != chosen_id], size=k - 1, replace=False)
        chosen = int(rng.choice([0, 0, 0, 1, 2]))
        candidate_ids = np.insert(others, chosen, chosen_id)
        base_logprobs = np.sort(rng.normal(-3.0, 1.5, size=k)).astype(np.float32)[::-1] - 0.2
        reward_values = rng.normal(0.0, 0.6, size=(len(names), k)).astype(np.float32)
        scores = steered_scores(base_logprobs, reward_values, weights, 1.0)
        trace = StepTrace(chosen_id, chosen, candidate_ids, base_logprobs, reward_values, scores, names)
        tokens.append(token_info(TokenEvent(piece, chosen_id, trace), lambda token: vocabulary[token]))
    return tokens


def fill_store(store: Store) -> tuple[int, int, list[TokenInfo]]:
    """The demo rewards, preset, feedback and conversation; returns the conversation's id, the traced reply's id
    and its tokens."""
    dials = {}
    for name, reward in REWARDS.items():
        path = Path("/demo/rewards") / f"{name}.onnx"
        store.add_reward(path, name)
        store.set_reward_state(path, enabled=reward.enabled, weight=reward.weight)
        if reward.enabled:
            dials[str(path)] = reward.weight
    preset = store.save_preset(PRESET, system_prompt=SYSTEM_PROMPT, dials=dials, strength=1.0, sampling={})
    store.create_conversation("Bread without yeast")
    conversation_id = store.create_conversation(
        title="Packing for a day hike", system_prompt=SYSTEM_PROMPT, model_name=DEMO_MODEL
    )
    store.set_conversation_preset(conversation_id, preset)
    for role, text in EARLIER:
        store.add_message(conversation_id, role, text)
    ids = [store.add_message(conversation_id, role, text) for role, text in CONVERSATION]
    store.add_feedback(
        "thumbs_up",
        prompt=CONVERSATION[0][1],
        system=SYSTEM_PROMPT,
        chosen=CONVERSATION[1][1],
        conversation_id=conversation_id,
        message_id=ids[1],
    )
    pieces = split_into_tokens(TRACED_REPLY)
    vocabulary = sorted(set(pieces) | {" Sure", " Also", " However", " rain", " shoes", " jacket", "!"})
    passed_over = store.add_message(conversation_id, "assistant", PASSED_OVER_REPLY)
    reply_id = store.add_message(
        conversation_id,
        "assistant",
        TRACED_REPLY,
        stats={
            "tokens": len(pieces),
            "tokens_per_second": 41.7,
            "rewards": ["concise", "friendly-tone"],
            "context": CONTEXT,
        },
        alternative_to=passed_over,
    )
    return conversation_id, reply_id, traced_tokens(pieces, vocabulary)


@dataclass(frozen=True)
class Demo:
    engine: DemoEngine
    store: Store
    paths: AppPaths
    conversation_id: int
    reply_id: int  # the traced reply
    tokens: list[TokenInfo]


@contextlib.contextmanager
def demo_data() -> Iterator[Demo]:
    """A throw-away app folder (the model list and rewards folder are the demo's too) and store holding the demo,
    removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="prt-demo-"))
    store = Store(folder / "demo.db")
    try:
        yield Demo(DemoEngine(), store, AppPaths(folder), *fill_store(store))
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)
