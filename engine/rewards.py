"""Reward files (ONNX + JSON card) and their runtime: one onnxruntime session with KV state.

A reward is ``NAME.onnx`` with ``NAME.json`` beside it. The card says which
vocabulary the reward was trained for; a reward is refused for a base model
with another vocabulary. At run time the reward keeps its own KV cache: the
prompt is prefilled once, then each step feeds one token, so a step costs the
same at token 10 and token 2000 except for attention over the cache.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from engine import reward_graph as contract
from engine.base_model import common_prefix_length
from engine.errors import RewardFileError, RewardRuntimeError, VocabularyMismatchError
from engine.files import file_sha256, write_atomically

CARD_FORMAT_VERSION = 1


@dataclass(kw_only=True)
class RewardCard:
    """What a reward is, what it was trained for and how well it did; stored as JSON beside the ONNX file."""

    name: str
    vocabulary_fingerprint: str
    vocabulary_size: int
    base_model_name: str
    base_model_sha256: str | None = None
    description: str = ""
    network: dict[str, int] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)  # counts only, never content
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    onnx_sha256: str = ""
    format_version: int = CARD_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> "RewardCard":
        if not path.is_file():
            raise RewardFileError(f"The reward card {path} is missing; a reward needs its .json card beside the .onnx file.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            card = cls(**data)
        except (ValueError, TypeError) as error:
            raise RewardFileError(f"The reward card {path} is not a valid card ({error}); re-export the reward.") from error
        if card.format_version > CARD_FORMAT_VERSION:
            raise RewardFileError(f"The reward card {path} has format {card.format_version}; this app reads up to "
                                  f"{CARD_FORMAT_VERSION}. Update the app.")
        return card


def card_path(onnx_path: Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def save_reward(path: Path, model: onnx.ModelProto, card: RewardCard) -> Path:
    """Write the ONNX file and its card, each atomically; the card records the ONNX sha256."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise RewardFileError(f"A reward file must end in .onnx, got {path.name}.")
    data = model.SerializeToString()
    write_atomically(path, data)
    card.onnx_sha256 = file_sha256(path)
    write_atomically(card_path(path), card.to_json())
    return path


class RewardModel:
    """One reward: an onnxruntime session plus its KV state for the current sequence."""

    def __init__(self, path: Path | str, *, threads: int = 1) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise RewardFileError(f"Reward file not found: {self.path}.")
        self.card = RewardCard.load(card_path(self.path))
        self.name = self.card.name
        actual = file_sha256(self.path)
        if self.card.onnx_sha256 and actual != self.card.onnx_sha256:
            raise RewardFileError(f"The reward {self.path} does not match its card (sha256 {actual[:12]}... "
                                  f"vs {self.card.onnx_sha256[:12]}...): it was truncated or changed. Re-export it.")
        self._session = _open_session(self.path, threads)
        self.layers, self.heads, self.head_dim = _check_contract(self._session, self.path)
        self._output_names = [contract.REWARDS] + [name for layer in range(self.layers)
                                                   for name in (contract.present_key(layer), contract.present_value(layer))]
        self._state_names = [name for layer in range(self.layers)
                             for name in (contract.past_key(layer), contract.past_value(layer))]
        self._tokens: list[int] = []
        self._state: list[np.ndarray] = []
        self.reset()

    def check_compatible(self, *, base_name: str, base_fingerprint: str) -> None:
        if self.card.vocabulary_fingerprint != base_fingerprint:
            raise VocabularyMismatchError(
                f"The reward '{self.name}' was trained for '{self.card.base_model_name}' "
                f"({self.card.vocabulary_size} tokens, vocabulary {self.card.vocabulary_fingerprint[:19]}), "
                f"but the loaded model '{base_name}' has a different vocabulary ({base_fingerprint[:19]}); "
                "use a reward trained for this model's family, or tune one with this model.")

    # -- state --------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return len(self._tokens)

    def reset(self) -> None:
        empty = np.zeros((1, self.heads, 0, self.head_dim), dtype=np.float32)
        self._state = [empty] * len(self._state_names)
        self._tokens = []

    def rewind(self, n_tokens: int) -> None:
        """Keep only the state of the first ``n_tokens`` tokens (positions are relative: nothing else changes)."""
        if n_tokens < self.n_past:
            self._state = [tensor[:, :, :n_tokens] for tensor in self._state]
            self._tokens = self._tokens[:n_tokens]

    # -- scoring ------------------------------------------------------------
    def advance(self, new_tokens: Sequence[int], candidates: np.ndarray) -> np.ndarray:
        """Append ``new_tokens`` to the state and return the rewards [K] of the candidates for the next token."""
        feeds = {contract.INPUT_IDS: np.asarray(new_tokens, dtype=np.int64).reshape(1, -1),
                 contract.CANDIDATE_IDS: np.asarray(candidates, dtype=np.int64).reshape(1, -1),
                 **dict(zip(self._state_names, self._state))}
        try:
            rewards, *state = self._session.run(self._output_names, feeds)
        except Exception as error:  # onnxruntime raises its own exception types
            raise RewardRuntimeError(f"The reward '{self.name}' failed at token {self.n_past}: {error}") from error
        self._state = state
        self._tokens.extend(int(token) for token in new_tokens)
        return rewards[0]

    def sync(self, tokens: Sequence[int], candidates: np.ndarray) -> np.ndarray:
        """Make the state hold ``tokens`` (reusing the common prefix) and score the candidates after them."""
        keep = min(common_prefix_length(self._tokens, tokens), len(tokens) - 1)
        self.rewind(keep)
        return self.advance(tokens[keep:], candidates)


def _open_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # the base model owns the other cores
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RewardFileError(f"The reward {path} is not a readable ONNX model ({first_line}); "
                              "it may be truncated or corrupt. Re-export it.") from error


def _check_contract(session: ort.InferenceSession, path: Path) -> tuple[int, int, int]:
    """Check the inputs/outputs against the contract; return (layers, heads, head_dim)."""
    inputs = {node.name: node for node in session.get_inputs()}
    outputs = {node.name for node in session.get_outputs()}
    layers = sum(1 for name in inputs if name.startswith("past_key_"))
    expected_inputs = {contract.INPUT_IDS, contract.CANDIDATE_IDS} | {
        name for layer in range(layers) for name in (contract.past_key(layer), contract.past_value(layer))}
    expected_outputs = {contract.REWARDS} | {
        name for layer in range(layers) for name in (contract.present_key(layer), contract.present_value(layer))}
    if layers == 0 or set(inputs) != expected_inputs or not expected_outputs <= outputs:
        raise RewardFileError(
            f"The reward {path} does not follow the reward contract (inputs {sorted(inputs)}, outputs "
            f"{sorted(outputs)}); see docs/reward-onnx-contract.md.")
    _, heads, _, head_dim = inputs[contract.past_key(0)].shape
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise RewardFileError(f"The reward {path} must declare fixed head count and head size in its state inputs.")
    return layers, heads, head_dim
