"""The reward network as an ONNX graph, built from numpy weights.

This module *is* the runtime contract of docs/reward-onnx-contract.md: the
engine's tests and benchmark build rewards with it, and the training side
exports trained weights through it, so every reward file has the same inputs,
outputs and KV-state layout.

Network: a small pre-LayerNorm causal transformer with ALiBi position biases (no
position table, so the state can be cut anywhere and any length works). The
token embedding E [V, r] is tied between input and output and stored int8 with one
scale per row. Its rank r is the width d, except for vocabularies so large that the
table would outweigh the rest (``embedding_rank_for``): there E is narrower and a
matrix U [r, d] lifts it to the width (contract version 2). The reward of candidate
c after the last position is

    q = LN_f(h_last) W_head (U^T when r < d),   r(c) = dot(q, e_c) + b_c

The graph outputs q too (``query``, version 2), so a caller can advance the state
before the candidates are known and score them afterwards from E and b.
With ``W_head = 0`` and ``b = 0`` every reward is 0: an untrained reward leaves
the base model unchanged.

Several rewards of one shape and one embedding can be stacked into one graph
(``build_stacked_reward_model``): the batch axis becomes the reward axis, so the
engine scores them all with one run per step (engine/runtime/mixing.py).
``read_reward_weights`` reads a reward file's weights back for that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONTRACT_VERSION = 2  # 2: the embedding may be narrower than the width (U), and q is an output
READABLE_CONTRACT_VERSIONS = ("1", "2")
EMBEDDING_BUDGET = 0.07  # the int8 embedding table's share of the base GGUF's bytes, at most
MIN_EMBEDDING_RANK = 64  # below it, what a reward can tell tokens apart by costs more than the bytes saved
OPSET = 20
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MultiHeadAttention)
INPUT_IDS = "input_ids"
CANDIDATE_IDS = "candidate_ids"
REWARDS = "rewards"
QUERY = "query"
LAYER_NORM_EPS = 1e-5


def past_key(layer: int) -> str:
    return f"past_key_{layer}"


def past_value(layer: int) -> str:
    return f"past_value_{layer}"


def present_key(layer: int) -> str:
    return f"present_key_{layer}"


def present_value(layer: int) -> str:
    return f"present_value_{layer}"


@dataclass(frozen=True, kw_only=True)
class RewardNetworkShape:
    vocab_size: int
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    embedding_rank: int | None = None  # None: the width

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        for name in ("vocab_size", "width", "layers", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.rank <= self.width:
            raise ValueError(f"embedding_rank must be in [1, {self.width}], got {self.embedding_rank}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def rank(self) -> int:
        return self.width if self.embedding_rank is None else self.embedding_rank

    @property
    def lifted(self) -> bool:
        """Whether the embedding is narrower than the width (and U lifts it)."""
        return self.rank < self.width


def embedding_rank_for(vocab_size: int, width: int, base_file_bytes: int) -> int | None:
    """The embedding rank that keeps the int8 table within EMBEDDING_BUDGET of the base GGUF: the width when it
    fits (None), else the largest multiple of 16 that does, but never below MIN_EMBEDDING_RANK. A 262k-token
    vocabulary on a 253 MB GGUF gets 64; 49k tokens on 98 MB keep the full 128."""
    fitting = int(EMBEDDING_BUDGET * base_file_bytes / vocab_size) // 16 * 16
    rank = max(MIN_EMBEDDING_RANK, fitting)
    return None if rank >= width else rank


@dataclass(kw_only=True)
class LayerWeights:
    ln1_scale: np.ndarray  # [d]
    ln1_bias: np.ndarray  # [d]
    qkv: np.ndarray  # [d, 3d]
    out: np.ndarray  # [d, d]
    ln2_scale: np.ndarray  # [d]
    ln2_bias: np.ndarray  # [d]
    fc1: np.ndarray  # [d, m*d]
    fc1_bias: np.ndarray  # [m*d]
    fc2: np.ndarray  # [m*d, d]
    fc2_bias: np.ndarray  # [d]


@dataclass(kw_only=True)
class RewardWeights:
    shape: RewardNetworkShape
    embedding: np.ndarray  # [V, r] float; quantized to int8 rows on export
    layers: list[LayerWeights] = field(default_factory=list)
    final_scale: np.ndarray  # [d]
    final_bias: np.ndarray  # [d]
    head: np.ndarray  # [d, d]
    token_bias: np.ndarray  # [V]
    embedding_up: np.ndarray | None = None  # [r, d] when r < d, else None

    def __post_init__(self) -> None:
        expected = (self.shape.vocab_size, self.shape.rank)
        if self.embedding.shape != expected:
            raise ValueError(f"embedding must have shape {expected}, got {self.embedding.shape}")
        up_shape = None if self.embedding_up is None else self.embedding_up.shape
        if up_shape != ((self.shape.rank, self.shape.width) if self.shape.lifted else None):
            raise ValueError(f"embedding_up must be [rank, width] exactly when rank < width, got {up_shape}")
        if len(self.layers) != self.shape.layers:
            raise ValueError(f"expected {self.shape.layers} layers, got {len(self.layers)}")
        if self.token_bias.shape != (self.shape.vocab_size,):
            raise ValueError(f"token_bias must have shape ({self.shape.vocab_size},), got {self.token_bias.shape}")


def random_reward_weights(shape: RewardNetworkShape, *, seed: int, scale: float = 0.05) -> RewardWeights:
    """Random weights everywhere, head included: a reward that says something, for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    d, m = shape.width, shape.width * shape.mlp_ratio

    def normal(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    layers = [
        LayerWeights(
            ln1_scale=ones(d),
            ln1_bias=normal(d),
            qkv=normal(d, 3 * d),
            out=normal(d, d),
            ln2_scale=ones(d),
            ln2_bias=normal(d),
            fc1=normal(d, m),
            fc1_bias=normal(m),
            fc2=normal(m, d),
            fc2_bias=normal(d),
        )
        for _ in range(shape.layers)
    ]
    # unit-variance embedding and a 1/d head keep rewards O(1), like a trained reward's
    embedding = rng.standard_normal((shape.vocab_size, shape.rank)).astype(np.float32)
    head = (rng.standard_normal((d, d)) / d).astype(np.float32)
    up = (rng.standard_normal((shape.rank, d)) / math.sqrt(shape.rank)).astype(np.float32) if shape.lifted else None
    return RewardWeights(
        shape=shape,
        embedding=embedding,
        layers=layers,
        final_scale=ones(d),
        final_bias=normal(d),
        head=head,
        token_bias=normal(shape.vocab_size),
        embedding_up=up,
    )


def token_preference_weights(shape: RewardNetworkShape, *, token: int, strength: float) -> RewardWeights:
    """A reward that adds ``strength`` to one token and 0 to every other, whatever the context."""
    weights = random_reward_weights(shape, seed=0)
    weights.head = np.zeros_like(weights.head)
    weights.token_bias = np.zeros(shape.vocab_size, dtype=np.float32)
    weights.token_bias[token] = strength
    return weights


def quantize_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: matrix ~= q * scale[:, None]."""
    scale = np.abs(matrix).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    quantized = np.clip(np.rint(matrix / scale[:, None]), -127, 127).astype(np.int8)
    return quantized, scale.astype(np.float32)


class _GraphBuilder:
    """Collects nodes and initializers; each helper returns the name of its output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        hint: str | None = None,
        output_name: str | None = None,
        **attributes: Any,
    ) -> str:
        """A node with one output, named ``output_name`` or a fresh name."""
        name = output_name or self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [name], **attributes))
        return name

    def op_outputs(
        self, op_type: str, inputs: Sequence[str], outputs: int, *, hint: str | None = None, **attributes: Any
    ) -> list[str]:
        """A node with ``outputs`` outputs, each with a fresh name."""
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, **attributes))
        return names


def build_reward_model(weights: RewardWeights, *, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    return build_stacked_reward_model([weights], metadata=metadata)


def build_stacked_reward_model(
    stack: Sequence[RewardWeights], *, metadata: dict[str, str] | None = None
) -> onnx.ModelProto:
    """N rewards of one shape and one embedding in one graph: rewards [N, K], state [N, H, P, D] per layer.

    The contract's batch axis is the reward axis; one reward (N = 1) is exactly the graph of the contract.
    The embedding, the position biases and the candidates' embeddings are computed once for all N rewards.
    """
    shape = _common_shape(stack)
    g = _GraphBuilder()
    heads, head_dim, width = shape.heads, shape.head_dim, shape.width

    embedding_q, embedding_scale = quantize_rows(stack[0].embedding)
    table = g.const("embedding_int8", embedding_q)
    row_scale = g.const("embedding_scale", embedding_scale[:, None])  # [V, 1]

    def embed(ids: str) -> str:  # ids [1, n] -> [1, n, r]
        rows = g.op("Cast", [g.op("Gather", [table, ids])], to=TensorProto.FLOAT)
        return g.op("Mul", [rows, g.op("Gather", [row_scale, ids])])

    x = embed(INPUT_IDS)  # [1, T, d]; the first layer norm broadcasts it to [N, T, d]
    if shape.lifted:
        x = _matmul(g, x, "embedding_up", [_lift(w) for w in stack])  # [N, T, d]
    bias = _alibi_causal_bias(g, heads)  # [1, H, T, P+T]

    for index in range(shape.layers):
        layer = [weights.layers[index] for weights in stack]
        x = _attention_block(g, x, layer, index, bias, heads=heads, head_dim=head_dim)
        x = _mlp_block(g, x, layer)

    last = g.op(
        "Slice",
        [
            x,
            g.const("minus_one", np.array([-1])),
            g.const("int_max", np.array([2**62])),
            g.const("axis_seq", np.array([1])),
        ],
    )  # [N, 1, d]
    last = _layer_norm(g, last, [w.final_scale for w in stack], [w.final_bias for w in stack])
    query = _matmul(g, last, "head", [w.head for w in stack])  # [N, 1, d]
    if shape.lifted:
        query = _matmul(g, query, "embedding_down", [_lift(w).T.copy() for w in stack])  # [N, 1, r]
    g.op("Squeeze", [query, g.const("axis_seq", np.array([1]))], output_name=QUERY)  # [N, r]
    candidates = embed(CANDIDATE_IDS)  # [1, K, r]
    dots = g.op("MatMul", [candidates, g.op("Transpose", [query], perm=[0, 2, 1])])  # [N, K, 1]
    dots = g.op("Squeeze", [dots, g.const("axis_last", np.array([2]))])  # [N, K]
    g.op("Add", [dots, _candidate_token_bias(g, [w.token_bias for w in stack])], output_name=REWARDS)

    graph = helper.make_graph(
        g.nodes, "prt_reward", _graph_inputs(shape, len(stack)), _graph_outputs(shape, len(stack)), g.initializers
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)], producer_name="prt"
    )
    model.ir_version = 9
    properties = {
        "prt_contract_version": str(CONTRACT_VERSION),
        "vocab_size": str(shape.vocab_size),
        "width": str(width),
        "layers": str(shape.layers),
        "heads": str(heads),
        "embedding_rank": str(shape.rank),
        **(metadata or {}),
    }
    helper.set_model_props(model, properties)
    return model


def _lift(weights: RewardWeights) -> np.ndarray:
    if weights.embedding_up is None:
        raise ValueError("a reward with a full-width embedding has no embedding_up")
    return weights.embedding_up


def _common_shape(stack: Sequence[RewardWeights]) -> RewardNetworkShape:
    if not stack:
        raise ValueError("stack must hold at least one reward")
    shape = stack[0].shape
    for weights in stack[1:]:
        if weights.shape != shape:
            raise ValueError(f"stacked rewards must share one shape, got {shape} and {weights.shape}")
        if weights.embedding is not stack[0].embedding and not np.array_equal(weights.embedding, stack[0].embedding):
            raise ValueError("stacked rewards must share one embedding")
    return shape


def _stacked(g: _GraphBuilder, hint: str, arrays: list[np.ndarray], *, per_position: bool = False) -> str:
    """One reward's parameter as it is; N rewards' stacked on a leading reward axis, with a length-1
    position axis after it for parameters added to every position ([N, 1, ...])."""
    if len(arrays) == 1:
        return g.const(hint, arrays[0])
    stacked = np.stack(arrays)
    return g.const(hint, stacked[:, None] if per_position else stacked)


def _matmul(g: _GraphBuilder, x: str, hint: str, weights: list[np.ndarray]) -> str:
    """x [N, T, a] times each reward's own [a, b]: [N, T, b], as one batched MatMul."""
    return g.op("MatMul", [x, _stacked(g, hint, weights)])


def _candidate_token_bias(g: _GraphBuilder, biases: list[np.ndarray]) -> str:
    """b_c of each reward for each candidate: [N, K]."""
    if len(biases) == 1:
        return g.op("Gather", [g.const("token_bias", biases[0]), CANDIDATE_IDS])  # [1, K]
    flat_ids = g.op("Squeeze", [CANDIDATE_IDS, g.const("axis0", np.array([0]))])  # [K]
    return g.op("Gather", [_stacked(g, "token_bias", biases), flat_ids], axis=1)  # [N, K]


def read_reward_weights(model: onnx.ModelProto) -> RewardWeights:
    """The weights of a one-reward graph made by ``build_reward_model`` (its inverse; the embedding comes back
    int8-rounded). Raises ValueError for any other graph."""
    properties = {entry.key: entry.value for entry in model.metadata_props}
    arrays: dict[str, list[np.ndarray]] = {}
    for tensor in model.graph.initializer:  # in build order; names are "<hint>_<counter>"
        arrays.setdefault(tensor.name.rsplit("_", 1)[0], []).append(numpy_helper.to_array(tensor))
    try:
        width, layers = int(properties["width"]), int(properties["layers"])
        (table,), (row_scale,), (head,), (token_bias,) = (
            arrays[name] for name in ("embedding_int8", "embedding_scale", "head", "token_bias")
        )
        rank = table.shape[1]
        shape = RewardNetworkShape(
            vocab_size=int(properties["vocab_size"]),
            width=width,
            layers=layers,
            heads=int(properties["heads"]),
            mlp_ratio=arrays["fc1"][0].shape[1] // width,
            embedding_rank=rank if rank < width else None,
        )
        scales, biases = arrays["ln_scale"], arrays["ln_bias"]  # per layer: ln1, ln2; then the final one
        if properties["prt_contract_version"] not in READABLE_CONTRACT_VERSIONS or len(scales) != 2 * layers + 1:
            raise ValueError("not a one-reward graph of a contract version this app reads")
        return RewardWeights(
            shape=shape,
            embedding=table.astype(np.float32) * row_scale,
            embedding_up=arrays["embedding_up"][0] if shape.lifted else None,
            final_scale=scales[-1],
            final_bias=biases[-1],
            head=head,
            token_bias=token_bias,
            layers=[
                LayerWeights(
                    ln1_scale=scales[2 * i],
                    ln1_bias=biases[2 * i],
                    qkv=arrays["qkv"][i],
                    out=arrays["attn_out"][i],
                    ln2_scale=scales[2 * i + 1],
                    ln2_bias=biases[2 * i + 1],
                    fc1=arrays["fc1"][i],
                    fc1_bias=arrays["fc1_bias"][i],
                    fc2=arrays["fc2"][i],
                    fc2_bias=arrays["fc2_bias"][i],
                )
                for i in range(layers)
            ],
        )
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"not a reward graph of this builder: {error}") from error


@dataclass(frozen=True)
class CandidateRows:
    """What scores candidates from a ``query`` output (version 2) outside the graph, as the graph does."""

    table: np.ndarray  # [V, R] int8
    scale: np.ndarray  # [V, 1] float32
    token_bias: np.ndarray  # [N, V] float32

    def rewards(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """query [N, R], candidates [K] -> rewards [N, K]."""
        rows = self.table[candidates].astype(np.float32) * self.scale[candidates]  # [K, R]
        return query @ rows.T + self.token_bias[:, candidates]


def candidate_rows(model: onnx.ModelProto) -> CandidateRows | None:
    """The embedding and biases of a graph made by this builder with a ``query`` output; None for any other."""
    if QUERY not in {output.name for output in model.graph.output}:
        return None
    found = {tensor.name.rsplit("_", 1)[0]: tensor for tensor in model.graph.initializer}
    if not {"embedding_int8", "embedding_scale", "token_bias"} <= found.keys():
        return None
    table = numpy_helper.to_array(found["embedding_int8"])
    bias = numpy_helper.to_array(found["token_bias"]).astype(np.float32)
    return CandidateRows(
        table=table,
        scale=numpy_helper.to_array(found["embedding_scale"]).astype(np.float32).reshape(-1, 1),
        token_bias=bias.reshape(-1, table.shape[0]),
    )


def _alibi_causal_bias(g: _GraphBuilder, heads: int) -> str:
    """Additive attention bias [1, H, T, P+T]: -slope_h * distance, and -1e9 on future keys."""
    past = g.op("Shape", [past_key(0)], start=2, end=3)  # [1]: P
    new = g.op("Shape", [INPUT_IDS], start=1, end=2)  # [1]: T
    total = g.op("Add", [past, new])
    scalar = g.const("axis0", np.array([0]))
    zero, one = g.const("zero", np.array(0)), g.const("one", np.array(1))
    key_positions = g.op("Range", [zero, g.op("Squeeze", [total, scalar]), one])  # [P+T]
    query_positions = g.op("Range", [g.op("Squeeze", [past, scalar]), g.op("Squeeze", [total, scalar]), one])  # [T]
    distance = g.op(
        "Sub",
        [
            g.op("Unsqueeze", [query_positions, g.const("axis1", np.array([1]))]),
            g.op("Unsqueeze", [key_positions, scalar]),
        ],
    )  # [T, P+T]
    distance_f = g.op("Cast", [distance], to=TensorProto.FLOAT)
    slopes = np.array([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=np.float32)
    linear = g.op("Mul", [g.const("alibi_slopes", -slopes.reshape(1, heads, 1, 1)), distance_f])  # [1, H, T, P+T]
    future = g.op("Less", [distance_f, g.const("zero_f", np.array(0.0, dtype=np.float32))])
    return g.op("Where", [future, g.const("neg_big", np.array(-1e9, dtype=np.float32)), linear])


def _layer_norm(g: _GraphBuilder, x: str, scales: list[np.ndarray], biases: list[np.ndarray]) -> str:
    if len(scales) == 1:
        return g.op(
            "LayerNormalization",
            [x, g.const("ln_scale", scales[0]), g.const("ln_bias", biases[0])],
            axis=-1,
            epsilon=LAYER_NORM_EPS,
        )
    # LayerNormalization takes one [d] scale: normalize plainly, then apply each reward's [N, 1, d] affine
    unit = g.const("ln_unit", np.ones_like(scales[0]))
    normed = g.op("LayerNormalization", [x, unit], axis=-1, epsilon=LAYER_NORM_EPS)
    scaled = g.op("Mul", [normed, _stacked(g, "ln_scale", scales, per_position=True)])
    return g.op("Add", [scaled, _stacked(g, "ln_bias", biases, per_position=True)])


def _attention_block(
    g: _GraphBuilder, x: str, layer: list[LayerWeights], index: int, bias: str, *, heads: int, head_dim: int
) -> str:
    """One fused MultiHeadAttention node: appends K/V to the state, adds the bias, attends."""
    width = heads * head_dim
    normed = _layer_norm(g, x, [w.ln1_scale for w in layer], [w.ln1_bias for w in layer])
    qkv = _matmul(g, normed, "qkv", [w.qkv for w in layer])  # [N, T, 3d]
    q, k, v = g.op_outputs("Split", [qkv, g.const("split3", np.array([width] * 3))], 3, axis=2)  # [N, T, d] each
    attended = g.fresh("attended")
    g.nodes.append(
        helper.make_node(
            "MultiHeadAttention",
            [q, k, v, "", "", bias, past_key(index), past_value(index)],
            [attended, present_key(index), present_value(index)],
            domain=MS_DOMAIN,
            num_heads=heads,
            scale=1 / math.sqrt(head_dim),
        )
    )  # [N, T, d]; present [N, H, P+T, hd]
    return g.op("Add", [x, _matmul(g, attended, "attn_out", [w.out for w in layer])])


def _mlp_block(g: _GraphBuilder, x: str, layer: list[LayerWeights]) -> str:
    normed = _layer_norm(g, x, [w.ln2_scale for w in layer], [w.ln2_bias for w in layer])
    hidden = g.op(
        "Add",
        [
            _matmul(g, normed, "fc1", [w.fc1 for w in layer]),
            _stacked(g, "fc1_bias", [w.fc1_bias for w in layer], per_position=True),
        ],
    )
    gelu = g.op("Gelu", [hidden])  # exact (erf) GELU
    out = g.op(
        "Add",
        [
            _matmul(g, gelu, "fc2", [w.fc2 for w in layer]),
            _stacked(g, "fc2_bias", [w.fc2_bias for w in layer], per_position=True),
        ],
    )
    return g.op("Add", [x, out])


def _graph_inputs(shape: RewardNetworkShape, rewards: int) -> list[onnx.ValueInfoProto]:
    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [1, "new_tokens"]),
        helper.make_tensor_value_info(CANDIDATE_IDS, TensorProto.INT64, [1, "candidates"]),
    ]
    state: list[int | str] = [rewards, shape.heads, "past_tokens", shape.head_dim]
    for layer in range(shape.layers):
        inputs += [
            helper.make_tensor_value_info(past_key(layer), TensorProto.FLOAT, state),
            helper.make_tensor_value_info(past_value(layer), TensorProto.FLOAT, state),
        ]
    return inputs


def _graph_outputs(shape: RewardNetworkShape, rewards: int) -> list[onnx.ValueInfoProto]:
    outputs = [
        helper.make_tensor_value_info(REWARDS, TensorProto.FLOAT, [rewards, "candidates"]),
        helper.make_tensor_value_info(QUERY, TensorProto.FLOAT, [rewards, shape.rank]),
    ]
    state: list[int | str] = [rewards, shape.heads, "total_tokens", shape.head_dim]
    for layer in range(shape.layers):
        outputs += [
            helper.make_tensor_value_info(present_key(layer), TensorProto.FLOAT, state),
            helper.make_tensor_value_info(present_value(layer), TensorProto.FLOAT, state),
        ]
    return outputs
