"""Finding a user's style in a few questions (PReF): two replies to one prompt, written under different
mixes of the base rewards; the user picks one, and the posterior over their mix picks the next pair.

Each round writes ``REPLIES_PER_PROMPT`` replies to a fresh prompt, one per mix drawn from the current
posterior (Thompson sampling: early mixes point every which way, later ones where the user's mix may
still be), all with the same sampling seed so the mix is what differs. A reply's features are its base
rewards summed over its tokens, read off the decode trace for free. Every pair of replies to one prompt
joins the pool of candidate questions, and the most informative unasked one is asked
(engine.app.pref.informativeness). No Qt here: the desktop runs ``next_question`` on a worker.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.app.paths import AppPaths
from engine.app.pref import PreferencePosterior, Profile, checked_answer, choose_question
from engine.runtime.base_model import BaseModel
from engine.runtime.decode import Generation, GenerationResult, attach_rewards
from engine.runtime.errors import PrtError
from engine.runtime.mixing import MergedSessions
from engine.runtime.steering import SamplingConfig

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
        and add their pairs to the pool. The app runs this while the user reads the current question."""
        with self._lock:
            prompt, seed = self._prompts[self._round % len(self._prompts)], self._round
            self._round += 1
            mixes = self.draw_mixes(REPLIES_PER_PROMPT)
        replies = []
        for index, mix in enumerate(mixes):
            replies.append(self.write_reply(prompt, mix, seed=seed))
            if progress:
                progress(index + 1, REPLIES_PER_PROMPT)
        with self._lock:
            self._pool += [StyleQuestion(prompt, first, second) for first, second in itertools.combinations(replies, 2)]

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
