"""Finding a user's style in a few questions (PReF): two replies to one prompt, written under different
mixes of the base rewards; the user picks one, and the posterior over their mix picks the next pair.

Each round writes ``REPLIES_PER_PROMPT`` replies to a fresh prompt, one per mix drawn from the current
posterior (Thompson sampling: early mixes point every which way, later ones where the user's mix may
still be), all with the same sampling seed so the mix is what differs. A reply's features are its base
rewards summed over its tokens, read off the decode trace for free. Every pair of replies to one prompt
joins the pool of candidate questions, and the most informative unasked one is asked
(engine.app.pref.informativeness). No Qt here: the desktop runs ``next_question`` on a worker.

The default model's base rewards come with the app (assets/library/, "the shipped library"): what
``prt library build`` makes, less what the GGUF already holds. Each reward's embedding is the base's own
token embedding projected by PCA (rewards_onnx/network.py), so the pack keeps only the projection and the
other weights (as float16), and ``install_shipped_library`` rebuilds the ONNX files from them and the GGUF
in a few seconds instead of the build's half hour. It checks the GGUF and the pack by sha256 and the
rebuilt rewards against the built ones' values on a probe (``PROBE_TOLERANCE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.app.paths import AppPaths
from engine.app.pref import PreferencePosterior, Profile, checked_answer, choose_question
from engine.runtime.base_model import BaseModel
from engine.runtime.decode import Generation, GenerationResult, attach_rewards
from engine.runtime.errors import PrtError
from engine.runtime.files import file_sha256
from engine.runtime.mixing import MergedSessions
from engine.runtime.reward_graph import LayerWeights, RewardNetworkShape, RewardWeights, build_reward_model
from engine.runtime.rewards import RewardCard, RewardModel, save_reward
from engine.runtime.steering import SamplingConfig

if TYPE_CHECKING:
    from importlib.abc import Traversable

DEFAULT_QUESTIONS = 10
REPLIES_PER_PROMPT = 3  # 3 pairs per prompt for 3 replies' time
REPLY_TOKENS = 160
REPLY_TEMPERATURE = 0.7
MIX_SIZE = 1.5  # a mix's largest |weight|; at 1 the replies differ too little to choose between
REWARD_SCALE = 10.0  # nats: a reward summed over a reply differs by about this much between contrasting replies

# Everyday requests, the kind a new user would type; none of them is in the library's training data.
PROMPTS = (
    "How do I make a good cup of coffee at home?",
    "What should I know before adopting a cat?",
    "Can you explain why the sky is blue?",
    "How can I get better at waking up early?",
    "What is a good way to start learning to cook?",
    "Why do leaves change color in autumn?",
    "How should I prepare for a job interview?",
    "What makes a good birthday present for a friend?",
    "How do vaccines work?",
    "What are some tips for a first long bike ride?",
    "How do I keep houseplants alive?",
    "What is the difference between weather and climate?",
)


def library_dir(model_path: Path | str) -> Path:
    """The default data folder's library for a model (AppPaths.library); the app passes its own AppPaths instead."""
    return AppPaths.resolve().library(model_path)


def library_reward_paths(folder: Path) -> list[Path]:
    """The base rewards in ``folder`` (each .onnx with its .json card), by name; [] when it was never built."""
    return sorted(path for path in Path(folder).glob("*.onnx") if path.with_suffix(".json").is_file())


class SurveyCancelled(PrtError):
    """The survey was cancelled while it wrote replies."""


@dataclass(frozen=True)
class StyleReply:
    text: str
    mix: tuple[float, ...]  # the reward weights it was written with
    features: tuple[float, ...]  # each base reward summed over the reply's tokens, / REWARD_SCALE


@dataclass(frozen=True)
class StyleQuestion:
    prompt: str
    first: StyleReply  # shown as A
    second: StyleReply  # shown as B

    @property
    def difference(self) -> np.ndarray:
        """v = f(A) - f(B): the user prefers A with probability sigmoid(lambda^T v)."""
        return np.subtract(self.first.features, self.second.features)


class StyleSurvey:
    """Up to ``questions`` "which reply?" questions about the base rewards at ``reward_paths``.

    ``next_question`` (= ``write_round`` + ``pick_question``) blocks for a few seconds while it writes the
    replies; ``write_round`` may run on a worker while ``answer`` refits the posterior. ``cancel``, from any
    thread, makes a running round raise SurveyCancelled soon.
    """

    def __init__(
        self,
        base: BaseModel,
        reward_paths: Sequence[Path | str],
        *,
        questions: int = DEFAULT_QUESTIONS,
        seed: int = 0,
        reply_tokens: int = REPLY_TOKENS,
        prompts: Sequence[str] = PROMPTS,
    ) -> None:
        if not reward_paths:
            raise ValueError("a style survey needs at least one base reward")
        self.base = base
        self.slots = attach_rewards(base, [(path, 0.0) for path in reward_paths])
        self.merged_sessions = MergedSessions()  # one merged session for the base rewards, kept from reply to reply
        self.reward_names = [slot.reward.name for slot in self.slots]
        self.questions = questions
        self.reply_tokens = reply_tokens
        self.posterior = PreferencePosterior(len(self.slots))
        self.answered: list[tuple[StyleQuestion, str]] = []
        self.reward_paths = [Path(path) for path in reward_paths]
        self._prompts = list(prompts)
        self._rng = np.random.default_rng(seed)
        self._pool: list[StyleQuestion] = []  # unasked pairs
        self._round = 0
        self._cancelled = threading.Event()
        self._generation: Generation | None = None
        self._lock = threading.Lock()  # the posterior and the pool: answers may come while a round is written

    @property
    def finished(self) -> bool:
        return len(self.answered) >= self.questions

    @property
    def unasked(self) -> int:
        """Pairs in the pool, ready to ask without writing."""
        with self._lock:
            return len(self._pool)

    def next_question(self, *, progress: Callable[[int, int], None] | None = None) -> StyleQuestion:
        """Write the replies to a fresh prompt, then take the most informative unasked pair from the pool."""
        if self.finished:
            raise ValueError(f"all {self.questions} questions have been answered")
        self.write_round(progress=progress)
        return self.pick_question()

    def write_round(self, *, progress: Callable[[int, int], None] | None = None) -> None:
        """Write REPLIES_PER_PROMPT replies to the next prompt, under mixes drawn from the posterior as it is now,
        each reply's pairs joining the pool as soon as it is written (before ``progress`` is told). The app runs
        this while the user reads the current question."""
        with self._lock:
            prompt, seed = self._prompts[self._round % len(self._prompts)], self._round
            self._round += 1
            mixes = self.draw_mixes(REPLIES_PER_PROMPT)
        replies: list[StyleReply] = []
        for index, mix in enumerate(mixes):
            reply = self.write_reply(prompt, mix, seed=seed)
            with self._lock:  # its pairs are ready to ask at once: the first question needs only two replies
                self._pool += [StyleQuestion(prompt, first, reply) for first in replies]
            replies.append(reply)
            if progress:
                progress(index + 1, REPLIES_PER_PROMPT)

    def pick_question(self) -> StyleQuestion:
        """The most informative unasked pair under the current posterior, taken out of the pool."""
        with self._lock:
            if not self._pool:
                raise ValueError("no unasked pair: write a round first")
            pool = np.array([question.difference for question in self._pool])
            return self._pool.pop(choose_question(self.posterior, pool, set()))

    def cancel(self) -> None:
        self._cancelled.set()
        if self._generation is not None:
            self._generation.cancel()

    def answer(self, question: StyleQuestion, answer: str) -> None:
        """ "a" (prefers the first reply), "b" (the second) or "none"."""
        with self._lock:
            self.posterior.update(question.difference, checked_answer(answer))
            self.answered.append((question, answer))

    def profile(self, name: str) -> Profile:
        return Profile.from_posterior(name, self.reward_names, self.posterior)

    def draw_mixes(self, count: int) -> list[np.ndarray]:
        """``count`` weight vectors drawn from the posterior, each scaled so its largest |weight| is MIX_SIZE."""
        draws = self._rng.multivariate_normal(self.posterior.mean, self.posterior.covariance, size=count)
        return [MIX_SIZE * draw / max(np.abs(draw).max(), 1e-9) for draw in draws]

    def write_reply(self, prompt: str, mix: np.ndarray, *, seed: int) -> StyleReply:
        for slot, weight in zip(self.slots, mix):
            slot.weight = float(weight)
        config = SamplingConfig(temperature=REPLY_TEMPERATURE, seed=seed, max_tokens=self.reply_tokens)
        prompt_tokens = self.base.chat_prompt_tokens([{"role": "user", "content": prompt}])
        self._generation = Generation(
            self.base, prompt_tokens, rewards=self.slots, config=config, merged_sessions=self.merged_sessions
        )
        if self._cancelled.is_set():  # checked after publishing the generation, so a cancel in between still stops it
            raise SurveyCancelled("The style questions were cancelled.")
        result = self._generation.run()
        if result.finish_reason == "cancelled":
            raise SurveyCancelled("The style questions were cancelled.")
        features = reward_totals(result, len(self.slots)) / REWARD_SCALE
        return StyleReply(result.text.strip(), tuple(float(w) for w in mix), tuple(float(f) for f in features))


def sample_reply_features(
    base: BaseModel,
    reward_paths: Sequence[Path | str],
    *,
    replies: int,
    seed: int = 0,
    reply_tokens: int = REPLY_TOKENS,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Features [replies, R] of replies to PROMPTS, each under a mix drawn from the prior, as the survey writes
    them: a real question pool for ``prt pref-bench --features``."""
    survey = StyleSurvey(base, reward_paths, seed=seed, reply_tokens=reply_tokens)
    rows = []
    for index in range(replies):
        [mix] = survey.draw_mixes(1)
        rows.append(survey.write_reply(PROMPTS[index % len(PROMPTS)], mix, seed=index).features)
        if progress:
            progress(index + 1, replies)
    return np.array(rows)


def reward_totals(result: GenerationResult, rewards: int) -> np.ndarray:
    """Each reward's value for the chosen token, summed over the reply (end of turn included): [rewards]."""
    totals = np.zeros(rewards)
    for step in result.trace:
        totals += step.reward_values[:, step.chosen]
    return totals


def save_profile(store, survey: StyleSurvey, name: str) -> Profile:
    """Keep the survey's result in the store, in one transaction: the profile with every question and answer,
    each pick as 'pick' feedback (training data for a tuned reward later), and the dials set to the profile.
    Before any answer there is no style to save, and the dials the user set stay as they are."""
    if not survey.answered:
        raise ValueError("answer at least one question before saving a style profile")
    profile = survey.profile(name)
    questions = [
        {
            "prompt": question.prompt,
            "a": question.first.text,
            "b": question.second.text,
            "mix_a": question.first.mix,
            "mix_b": question.second.mix,
            "answer": answer,
        }
        for question, answer in survey.answered
    ]
    picks = [
        (
            question.prompt,
            *(
                (question.first.text, question.second.text)
                if answer == "a"
                else (question.second.text, question.first.text)
            ),
        )
        for question, answer in survey.answered
        if answer != "none" and question.first.text and question.second.text
    ]  # an empty reply teaches nothing
    weights = dial_weights(profile)
    dials = {path: (reward, weights[reward]) for path, reward in zip(survey.reward_paths, survey.reward_names)}
    store.save_style_profile(
        {"profile": json.loads(profile.to_json()), "questions": questions}, picks=picks, dials=dials
    )
    return profile


def dial_weights(profile: Profile) -> dict[str, float]:
    """The dial per reward: the profile's weights (largest |weight| 1) at the strength the replies were written at."""
    return {reward: MIX_SIZE * weight for reward, weight in profile.weights.items()}


def saved_profile(store) -> Profile | None:
    """The profile the last survey saved, or None."""
    saved = store.setting("style_profile")
    if not isinstance(saved, dict):  # none yet, or not what save_profile writes
        return None
    return Profile.from_json(json.dumps(saved.get("profile")))


# -- the shipped library ---------------------------------------------------------------------------------
SHIPPED_FORMAT = 1
SHIPPED_LIBRARIES: Traversable = resources.files("assets") / "library"  # <model file stem>.json + .bin
# The rebuilt rewards against the built ones on the probe: float16 weights move a reward by about 1e-3 of its size
PROBE_TOLERANCE = 0.02
LAYER_FIELDS = tuple(field.name for field in fields(LayerWeights))
VOLATILE_CARD_FIELDS = ("created", "onnx_sha256")  # differ from build to build; set again on install
_STORED_TYPES = {"float16": "<f2", "float32": "<f4"}


class ShippedLibraryError(PrtError):
    """The shipped library does not fit the model file, or its files are damaged."""


@dataclass(frozen=True)
class ShippedLibrary:
    """A pack of base rewards for one GGUF file (its manifest, read; the weights file beside it, unread)."""

    manifest: dict[str, Any]
    weights: Traversable  # the .bin beside the manifest

    @property
    def reward_names(self) -> list[str]:
        return [reward["name"] for reward in self.manifest["rewards"]]


def shipped_library(model_path: Path | str, *, folder: Traversable | Path = SHIPPED_LIBRARIES) -> ShippedLibrary | None:
    """The pack made for this model file, if there is one: same file name and size (cheap checks, for the window
    to decide what to offer; ``install_shipped_library`` checks the sha256)."""
    stem = Path(model_path).stem
    manifest_file, weights = folder / f"{stem}.json", folder / f"{stem}.bin"
    if not manifest_file.is_file() or not weights.is_file():
        return None
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        fits = manifest["format_version"] == SHIPPED_FORMAT and manifest["model"]["size"] == os.path.getsize(model_path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ShippedLibrary(manifest, weights) if fits else None


def decode_arrays(data: bytes, entries: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The pack's arrays as float32, from their (name, stored, shape, offset) entries."""
    arrays = {}
    for entry in entries:
        dtype = np.dtype(_STORED_TYPES[entry["stored"]])
        count = int(np.prod(entry["shape"], dtype=np.int64))
        if entry["offset"] + count * dtype.itemsize > len(data):
            raise ValueError(f"the array {entry['name']} ends past the weights file")
        values = np.frombuffer(data, dtype=dtype, count=count, offset=entry["offset"])
        arrays[entry["name"]] = values.astype(np.float32).reshape(entry["shape"])
    return arrays


def token_embedding(model_path: Path | str, tensor: Mapping[str, Any]) -> np.ndarray:
    """The GGUF's token embedding [rows, columns] as float32, at the offset the manifest recorded for this exact
    file (F32, F16 or Q8_0, dequantized as gguf.quants does)."""
    rows, columns, kind = tensor["rows"], tensor["columns"], tensor["type"]
    with open(model_path, "rb") as handle:
        handle.seek(tensor["offset"])
        if kind == "F32":
            values = np.fromfile(handle, dtype="<f4", count=rows * columns)
        elif kind == "F16":
            values = np.fromfile(handle, dtype="<f2", count=rows * columns).astype(np.float32)
        elif kind == "Q8_0":  # blocks of 32: a float16 scale, then 32 int8
            blocks = np.fromfile(handle, dtype=np.uint8, count=rows * columns // 32 * 34).reshape(-1, 34)
            scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
            values = blocks[:, 2:].copy().view(np.int8).astype(np.float32) * scale
        else:
            raise ShippedLibraryError(f"The shipped library reads a token embedding of type {kind}, which it cannot.")
    return np.ascontiguousarray(values, dtype=np.float32).reshape(rows, columns)


def projected_embedding(matrix: np.ndarray, mean: np.ndarray, directions: np.ndarray, scale: float) -> np.ndarray:
    """The reward's embedding: the base's, centered, on the PCA directions, at unit variance (float32)."""
    return ((matrix - mean) @ directions.T / np.float32(scale)).astype(np.float32)


def install_shipped_library(shipped: ShippedLibrary, model_path: Path | str, out_dir: Path) -> list[Path]:
    """Write the shipped rewards into ``out_dir`` (the model's library folder) as ``prt library build`` would
    leave them, and return their paths. Nothing is left in ``out_dir`` unless every reward was rebuilt and
    matched its probe."""
    manifest, model_path, out_dir = shipped.manifest, Path(model_path), Path(out_dir)
    if file_sha256(model_path) != manifest["model"]["sha256"]:
        raise ShippedLibraryError(
            f"{model_path.name} is not the file the shipped style rewards were made for (its sha256 differs); "
            "build them with 'prt library build'."
        )
    data = shipped.weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["weights"]["sha256"]:
        raise ShippedLibraryError("The app's shipped style rewards are damaged (sha256); reinstall the app.")
    arrays = decode_arrays(data, manifest["weights"]["arrays"])
    spec = manifest["embedding"]
    embedding = projected_embedding(
        token_embedding(model_path, spec["tensor"]),
        arrays["embedding.mean"],
        arrays["embedding.directions"],
        spec["scale"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".installing"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        staged = [_write_shipped_reward(reward, arrays, embedding, staging) for reward in manifest["rewards"]]
        found = probe_rewards(staged, manifest["probe"])
        for reward in manifest["rewards"]:
            expected = np.array(manifest["probe"]["rewards"][reward["name"]])
            if not np.allclose(found[reward["name"]], expected, rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE):
                worst = float(np.abs(found[reward["name"]] - expected).max())
                raise ShippedLibraryError(
                    f"The shipped reward {reward['name']} does not reproduce the built one on this machine "
                    f"(off by {worst:.3g}); build the style rewards with 'prt library build'."
                )
        installed = []
        for path in staged:  # the files first, then their cards: a reward counts once its card is there
            os.replace(path, out_dir / path.name)
        for path in staged:
            os.replace(path.with_suffix(".json"), out_dir / path.with_suffix(".json").name)
            installed.append(out_dir / path.name)
        return installed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_shipped_reward(
    reward: Mapping[str, Any], arrays: Mapping[str, np.ndarray], embedding: np.ndarray, folder: Path
) -> Path:
    name, network = reward["name"], reward["network"]
    shape = RewardNetworkShape(vocab_size=len(embedding), **network)
    weights = RewardWeights(
        shape=shape,
        embedding=embedding,
        layers=[
            LayerWeights(**{field: arrays[f"{name}.layers.{index}.{field}"] for field in LAYER_FIELDS})
            for index in range(shape.layers)
        ],
        final_scale=arrays[f"{name}.final_scale"],
        final_bias=arrays[f"{name}.final_bias"],
        head=arrays[f"{name}.head"],
        token_bias=arrays[f"{name}.token_bias"],
        embedding_up=arrays.get(f"{name}.embedding_up"),
    )
    card = RewardCard(**reward["card"], created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    card.description += " Installed from the app's shipped library (weights stored as float16)."
    return save_reward(folder / f"{name}.onnx", build_reward_model(weights, metadata=reward["metadata"]), card)


def probe_rewards(paths: Sequence[Path], probe: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Each reward's values for the probe's candidates after each prefix of its tokens: {name: [prefixes, K]}."""
    values = {}
    candidates = np.array(probe["candidates"], dtype=np.int64)
    for path in paths:
        with RewardModel(path) as reward:
            values[reward.name] = np.array(
                [reward.sync(probe["tokens"][:length], candidates) for length in probe["prefixes"]]
            )
    return values
