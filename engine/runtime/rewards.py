"""Reward files (ONNX + JSON card) and their runtime: one onnxruntime session with KV state.

A reward is ``NAME.onnx`` with ``NAME.json`` beside it. The card says which
vocabulary the reward was trained for; a reward is refused for a base model
with another vocabulary. At run time the reward keeps its own KV cache: the
prompt is prefilled once, then each step feeds one token, so a step costs the
same at token 10 and token 2000 except for attention over the cache.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from engine.runtime import reward_graph as contract
from engine.runtime.base_model import common_prefix_length
from engine.runtime.errors import RewardFileError, RewardRuntimeError, VocabularyMismatchError
from engine.runtime.files import file_sha256, write_atomically
from engine.runtime.user_json import parse_user_json

CARD_FORMAT_VERSION = 2  # 2 added ``label``; cards of format 1 load with an empty label


@dataclass(kw_only=True)
class RewardCard:
    """What a reward is, what it was trained for and how well it did; stored as JSON beside the ONNX file."""

    name: str
    vocabulary_fingerprint: str
    vocabulary_size: int
    base_model_name: str
    base_model_sha256: str | None = None
    description: str = ""
    label: str = ""  # a short human label for the app, e.g. "Short and to the point"
    network: dict[str, int] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)  # counts only, never content
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    onnx_sha256: str = ""
    format_version: int = CARD_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> RewardCard:
        if not path.is_file():
            raise RewardFileError(
                f"The reward card {path} is missing; a reward needs its .json card beside the .onnx file."
            )
        try:
            data = parse_user_json(path.read_bytes())
        except OSError as error:
            raise RewardFileError(f"Cannot read the reward card {path} ({error.strerror}); check the file.") from error
        except ValueError as error:  # not UTF-8, not JSON, too deep
            raise _bad_card(path, str(error)) from error
        version = data.get("format_version") if isinstance(data, dict) else None
        if isinstance(version, int) and version > CARD_FORMAT_VERSION:  # before checking fields a newer app may add
            raise RewardFileError(
                f"The reward card {path} has format {version}; this app reads up to "
                f"{CARD_FORMAT_VERSION}. Update the app."
            )
        problem = _card_problem(data)
        if problem:
            raise _bad_card(path, problem)
        return cls(**data)


# figures the app shows from a card, as numbers (formatting a text as a number would fail)
_SHOWN_FIGURES = {
    "training_data": ("demonstrations", "preference_pairs"),
    "held_out": ("tokens", "base_nll", "steered_nll", "gap_closed", "pair_accuracy", "pairs"),
}


def _json_types(hint: Any) -> tuple[type, ...]:
    """The JSON types a field's annotation allows: str -> (str,), str | None -> (str, NoneType), dict[...] -> (dict,)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(option) or option for option in options)


def _card_problem(data: Any) -> str | None:
    """What is wrong with a card's decoded JSON, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    expected = {name: _json_types(hint) for name, hint in typing.get_type_hints(RewardCard).items()}
    required = [f.name for f in fields(RewardCard) if f.default is MISSING and f.default_factory is MISSING]
    unknown, missing = sorted(set(data) - set(expected)), [name for name in required if name not in data]
    if unknown or missing:
        return f"unknown fields {unknown}" if unknown else f"missing fields {missing}"
    for name, value in data.items():
        if not isinstance(value, expected[name]) or isinstance(value, bool):
            return f"{name} has the wrong type ({type(value).__name__})"
    if data["vocabulary_size"] < 1:
        return f"vocabulary_size is {data['vocabulary_size']}"
    held_out = data.get("metrics", {}).get("held_out", {})
    if not isinstance(held_out, dict):
        return "metrics.held_out is not an object"
    for where, figures in (("training_data", data.get("training_data", {})), ("held_out", held_out)):
        for name in _SHOWN_FIGURES[where]:
            value = figures.get(name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                return f"{where}.{name} is not a number"
    return None


def _bad_card(path: Path, problem: str) -> RewardFileError:
    return RewardFileError(f"The reward card {path} is not a valid card ({problem}); re-export the reward.")


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
    write_card(path, card)
    return path


def write_card(onnx_path: Path, card: RewardCard) -> None:
    """(Re)write the card beside a reward file, atomically."""
    write_atomically(card_path(onnx_path), card.to_json())


class RewardSession:
    """An onnxruntime session that follows the reward contract, plus the KV state of one token sequence.

    It computes ``rows`` rewards per call: 1 for a reward file, N for rewards stacked into one graph
    (engine/runtime/mixing.py). Rewards come back as [rows, K]; the state is [rows, H, P, D] per layer.

    Given the graph's ``candidate_rows`` (contract version 2), a step can also be taken in two halves:
    ``prepare`` advances the state by the new token before the candidates are known (on another thread,
    while the caller picks them), and ``score_prepared`` scores them from the query it left.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        title: str,
        source: Path | str,
        candidate_rows: contract.CandidateRows | None = None,
    ) -> None:
        self.title = title  # names the reward(s) in errors: "The reward 'x'"
        self._session: ort.InferenceSession | None = session  # None once closed
        self.rows, self.layers, self.heads, self.head_dim = _check_contract(session, source)
        self.candidate_rows = candidate_rows
        self._query: np.ndarray | None = None  # what the last run left for score_prepared()
        self._prepared_tokens = 0
        self._output_names = [contract.REWARDS] + [
            name
            for layer in range(self.layers)
            for name in (contract.present_key(layer), contract.present_value(layer))
        ]
        self._state_names = [
            name for layer in range(self.layers) for name in (contract.past_key(layer), contract.past_value(layer))
        ]
        if candidate_rows is not None:
            self._output_names.append(contract.QUERY)
        self._tokens: list[int] = []
        self._state: list[np.ndarray] = []
        self._check_first_step(session, source)

    def _check_first_step(self, session: ort.InferenceSession, source: Path | str) -> None:
        """Score two candidates after one token: a graph can have the contract's names and still return other
        shapes, types or non-finite rewards, which would fail far from their cause, in the middle of a reply."""
        self.reset()
        try:
            outputs = session.run(self._output_names, self._feeds([0], np.zeros(2, dtype=np.int64)))
        except Exception as error:  # onnxruntime raises its own exception types
            raise RewardFileError(
                f"The reward {source} fails on its first token ({_first_line(error)}); it may be corrupt. Re-export it."
            ) from error
        state_shape = (self.rows, self.heads, 1, self.head_dim)
        expected = [(self.rows, 2)] + [state_shape] * len(self._state_names)
        if self.candidate_rows is not None:
            expected.append((self.rows, self.candidate_rows.table.shape[1]))
        actual = [getattr(output, "shape", None) for output in outputs]
        if actual != expected or not all(out.dtype == np.float32 and np.isfinite(out).all() for out in outputs):
            raise RewardFileError(
                f"The reward {source} breaks the reward contract: after one token it returned "
                f"shapes {actual} (expected {expected}, finite float32); see "
                "docs/reward-onnx-contract.md."
            )

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    @property
    def closed(self) -> bool:
        return self._session is None

    def close(self) -> None:
        """Let go of the onnxruntime session and the state (their memory); scoring afterwards is refused. Safe twice."""
        self._session = None
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((self.rows, self.heads, 0, self.head_dim), dtype=np.float32)
        self._state = [empty] * len(self._state_names)
        self._tokens = []

    def rewind(self, n_tokens: int) -> None:
        """Keep only the state of the first ``n_tokens`` tokens (positions are relative: nothing else changes)."""
        if n_tokens < self.n_past:
            self._state = [tensor[:, :, :n_tokens] for tensor in self._state]
            self._tokens = self._tokens[:n_tokens]

    def advance(self, new_tokens: Sequence[int], candidates: np.ndarray) -> np.ndarray:
        """Append ``new_tokens`` to the state and return the rewards [rows, K] of the candidates for the next token.

        A step whose rewards are not finite raises and leaves the state as it was."""
        rewards, state, query = self._run(new_tokens, candidates)
        self._check_finite(rewards)
        self._commit(new_tokens, state, query)
        return rewards

    def prepare(self, new_tokens: Sequence[int]) -> None:
        """The first half of ``advance``: append ``new_tokens`` to the state, keeping the query for the candidates."""
        if self.candidate_rows is None:
            raise RewardRuntimeError(f"{self.title} cannot advance before its candidates are known (contract v1).")
        self._query = None
        _, state, query = self._run(new_tokens, np.zeros(0, dtype=np.int64))
        self._commit(new_tokens, state, query)
        self._prepared_tokens = len(new_tokens)

    def score_prepared(self, candidates: np.ndarray) -> np.ndarray:
        """The second half of ``advance``: the rewards [rows, K] of the candidates after what ``prepare`` appended.

        Rewards that are not finite raise and take back what ``prepare`` appended."""
        if self._query is None or self.candidate_rows is None:
            raise RewardRuntimeError(f"{self.title} has no prepared step to score.")
        rewards = self.candidate_rows.rewards(self._query, candidates)
        if not np.isfinite(rewards).all():
            self.rewind(self.n_past - self._prepared_tokens)
            self._check_finite(rewards)
        return rewards

    def _run(
        self, new_tokens: Sequence[int], candidates: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
        """One run of the graph: (rewards, the new state, the query or None); the session's state is untouched."""
        if self._session is None:
            raise RewardRuntimeError(
                f"{self.title} cannot score: it was closed (switched off, or its model was "
                "unloaded); load it again to score with it."
            )
        try:
            rewards, *state = self._session.run(self._output_names, self._feeds(new_tokens, candidates))
        except Exception as error:  # onnxruntime raises its own exception types
            raise RewardRuntimeError(f"{self.title} failed at token {self.n_past}: {error}") from error
        query = state.pop() if self.candidate_rows is not None else None
        return rewards, state, query

    def _commit(self, new_tokens: Sequence[int], state: list[np.ndarray], query: np.ndarray | None) -> None:
        self._state, self._query = state, query
        self._tokens.extend(int(token) for token in new_tokens)

    def _check_finite(self, rewards: np.ndarray) -> None:
        if not np.isfinite(rewards).all():  # sampling from NaN scores raises deep in numpy; greedy picks garbage
            raise RewardRuntimeError(
                f"{self.title} gave a reward that is not a finite number at token "
                f"{self.n_past}; its file may be damaged: turn it off, or re-export it."
            )

    def _feeds(self, new_tokens: Sequence[int], candidates: np.ndarray) -> dict[str, np.ndarray]:
        return {
            contract.INPUT_IDS: np.asarray(new_tokens, dtype=np.int64).reshape(1, -1),
            contract.CANDIDATE_IDS: np.asarray(candidates, dtype=np.int64).reshape(1, -1),
            **dict(zip(self._state_names, self._state)),
        }

    def sync(self, tokens: Sequence[int], candidates: np.ndarray) -> np.ndarray:
        """Make the state hold ``tokens`` (reusing the common prefix) and score the candidates after them: [rows, K]."""
        keep = min(common_prefix_length(self._tokens, tokens), len(tokens) - 1)
        self.rewind(keep)
        return self.advance(tokens[keep:], candidates)


class RewardModel:
    """One reward file: its card and a session with KV state for the current sequence.

    Whoever opens one closes it: ``close()``, or ``with RewardModel(path) as reward:``.
    """

    def __init__(self, path: Path | str, *, threads: int = 1) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise RewardFileError(f"Reward file not found: {self.path}.")
        self.card = RewardCard.load(card_path(self.path))
        self.name = self.card.name
        self.threads = threads
        actual = file_sha256(self.path)
        if self.card.onnx_sha256 and actual != self.card.onnx_sha256:
            raise RewardFileError(
                f"The reward {self.path} does not match its card (sha256 {actual[:12]}... "
                f"vs {self.card.onnx_sha256[:12]}...): it was truncated or changed. Re-export it."
            )
        self.session = RewardSession(
            open_session(self.path, threads=threads),
            title=f"The reward '{self.name}'",
            source=self.path,
            candidate_rows=_candidate_rows(self.path),
        )
        if self.session.rows != 1:
            raise RewardFileError(f"The reward {self.path} holds {self.session.rows} rewards; a reward file holds one.")

    def close(self) -> None:
        """Free the session; scoring afterwards raises RewardRuntimeError. Safe to call twice."""
        self.session.close()

    @property
    def closed(self) -> bool:
        return self.session.closed

    def __enter__(self) -> RewardModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def check_compatible(self, *, base_name: str, base_fingerprint: str) -> None:
        if self.card.vocabulary_fingerprint != base_fingerprint:
            raise VocabularyMismatchError(
                f"The reward '{self.name}' was trained for '{self.card.base_model_name}' "
                f"({self.card.vocabulary_size} tokens, vocabulary {self.card.vocabulary_fingerprint[:19]}), "
                f"but the loaded model '{base_name}' has a different vocabulary ({base_fingerprint[:19]}); "
                "use a reward trained for this model's family, or tune one with this model."
            )

    # -- state and scoring: the session's, for this one reward ---------------------------
    @property
    def n_past(self) -> int:
        return self.session.n_past

    def reset(self) -> None:
        self.session.reset()

    def rewind(self, n_tokens: int) -> None:
        self.session.rewind(n_tokens)

    def advance(self, new_tokens: Sequence[int], candidates: np.ndarray) -> np.ndarray:
        """Append ``new_tokens`` to the state and return the rewards [K] of the candidates for the next token."""
        return self.session.advance(new_tokens, candidates)[0]

    def sync(self, tokens: Sequence[int], candidates: np.ndarray) -> np.ndarray:
        """Make the state hold ``tokens`` (reusing the common prefix) and score the candidates after them: [K]."""
        return self.session.sync(tokens, candidates)[0]


def _candidate_rows(path: Path) -> contract.CandidateRows | None:
    try:
        return contract.candidate_rows(onnx.load(str(path)))
    except Exception:  # not a graph onnx can read: onnxruntime says so in the caller's words
        return None


def open_session(model: Path | bytes, *, threads: int) -> ort.InferenceSession:
    """A CPU session for a reward graph (a file, or a serialized model); onnxruntime's errors become RewardFileError."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # the base model owns the other cores
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        source = model if isinstance(model, bytes) else str(model)
        # no fallback: on a damaged file onnxruntime would print four lines to stdout and parse it again
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"], enable_fallback=0)
    except Exception as error:  # onnxruntime raises its own exception types
        what = "graph built in memory" if isinstance(model, bytes) else model
        raise RewardFileError(
            f"The reward {what} is not a readable ONNX model ({_first_line(error)}); "
            "it may be truncated or corrupt. Re-export it."
        ) from error


def _first_line(error: Exception) -> str:
    """onnxruntime's messages run over many lines; the first says what failed."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_contract(session: ort.InferenceSession, path: Path | str) -> tuple[int, int, int, int]:
    """Check the inputs/outputs against the contract; return (rows, layers, heads, head_dim)."""
    inputs = {node.name: node for node in session.get_inputs()}
    outputs = {node.name for node in session.get_outputs()}
    layers = sum(1 for name in inputs if name.startswith("past_key_"))
    expected_inputs = {contract.INPUT_IDS, contract.CANDIDATE_IDS} | {
        name for layer in range(layers) for name in (contract.past_key(layer), contract.past_value(layer))
    }
    expected_outputs = {contract.REWARDS} | {
        name for layer in range(layers) for name in (contract.present_key(layer), contract.present_value(layer))
    }
    if layers == 0 or set(inputs) != expected_inputs or not expected_outputs <= outputs:
        raise RewardFileError(
            f"The reward {path} does not follow the reward contract (inputs {sorted(inputs)}, outputs "
            f"{sorted(outputs)}); see docs/reward-onnx-contract.md."
        )
    state_shape = inputs[contract.past_key(0)].shape
    if len(state_shape or ()) != 4:
        raise RewardFileError(
            f"The reward {path} declares its state with shape {state_shape}, not "
            "[batch, heads, tokens, head size]; see docs/reward-onnx-contract.md."
        )
    rows, heads, _, head_dim = state_shape
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise RewardFileError(f"The reward {path} must declare fixed head count and head size in its state inputs.")
    return rows if isinstance(rows, int) else 1, layers, heads, head_dim  # a symbolic batch: one sequence
