"""The reward network in torch: the same math as engine/runtime/reward_graph.py, operation for operation.

Parameters are stored in the graph's layout (x @ W, W shaped [in, out]) so export is a
plain copy. The token embedding is initialized from the base GGUF's own embedding (PCA
down to the shape's rank), int8-rounded as the ONNX file will hold it; when it is trained,
``round_embedding`` rounds it again before export. An embedding narrower than the width
is lifted by ``embedding_up`` [r, d], which starts as the identity on the first r
dimensions. ``head`` and ``token_bias`` start at zero: an untrained reward changes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGUFReader
from gguf.quants import dequantize
from torch import nn

from engine.runtime.reward_graph import LAYER_NORM_EPS, LayerWeights, RewardNetworkShape, RewardWeights, quantize_rows

MASKED = -1e9  # the graph's value for future positions


def alibi_slopes(heads: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = nn.Dropout(dropout)  # training only: the exported graph has none
        self.ln1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.qkv = nn.Parameter(torch.randn(width, 3 * width) * 0.02)
        self.out = nn.Parameter(torch.randn(width, width) * 0.02)
        self.ln2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Parameter(torch.randn(width, mlp_ratio * width) * 0.02)
        self.fc1_bias = nn.Parameter(torch.zeros(mlp_ratio * width))
        self.fc2 = nn.Parameter(torch.randn(mlp_ratio * width, width) * 0.02)
        self.fc2_bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (self.ln1(x) @ self.qkv).split(width, dim=-1)  # [B, T, d] each
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias  # [B, H, T, T]
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.dropout(attended @ self.out)
        hidden = F.gelu(self.ln2(x) @ self.fc1 + self.fc1_bias)  # exact (erf) GELU, as the graph
        return x + self.dropout(hidden @ self.fc2 + self.fc2_bias)

    def export(self) -> LayerWeights:
        def array(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np.float32)

        return LayerWeights(
            ln1_scale=array(self.ln1.weight),
            ln1_bias=array(self.ln1.bias),
            qkv=array(self.qkv),
            out=array(self.out),
            ln2_scale=array(self.ln2.weight),
            ln2_bias=array(self.ln2.bias),
            fc1=array(self.fc1),
            fc1_bias=array(self.fc1_bias),
            fc2=array(self.fc2),
            fc2_bias=array(self.fc2_bias),
        )


class RewardNet(nn.Module):
    slopes: torch.Tensor  # a buffer [1, H, 1, 1]: the ALiBi slopes

    def __init__(
        self, shape: RewardNetworkShape, embedding: np.ndarray, *, train_embedding: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.shape = shape
        self.embedding = nn.Parameter(_int8_rounded(embedding), requires_grad=train_embedding)
        self.embedding_up = (
            nn.Parameter(torch.eye(shape.rank, shape.width)) if shape.lifted else None
        )  # trained with the rest, even when the embedding is frozen
        self.blocks = nn.ModuleList(
            Block(shape.width, shape.heads, shape.mlp_ratio, dropout) for _ in range(shape.layers)
        )
        self.input_dropout = nn.Dropout(dropout)
        self.final_ln = nn.LayerNorm(shape.width, eps=LAYER_NORM_EPS)
        self.head = nn.Parameter(torch.zeros(shape.width, shape.width))
        self.token_bias = nn.Parameter(torch.zeros(shape.vocab_size))
        self.register_buffer("slopes", alibi_slopes(shape.heads).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def round_embedding(self) -> None:
        """Round a trained embedding to what the ONNX file will hold, so the figures are the file's."""
        self.embedding.copy_(_int8_rounded(self.embedding.detach().numpy()))

    def queries(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> one query vector per position [B, T, d] (causal: position t sees tokens <= t)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        distance = (positions[:, None] - positions[None, :]).float()  # [T, T] = query - key
        bias = torch.where(distance < 0, torch.tensor(MASKED), -self.slopes * distance)  # [1, H, T, T]
        x = self.embedding[tokens]
        if self.embedding_up is not None:
            x = x @ self.embedding_up
        x = self.input_dropout(x)
        for block in self.blocks:
            x = block(x, bias)
        query = self.final_ln(x) @ self.head
        return query if self.embedding_up is None else query @ self.embedding_up.T

    def rewards(self, queries: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        """queries [..., r], candidate_ids [..., C] -> rewards [..., C]."""
        return (self.embedding[candidate_ids] * queries.unsqueeze(-2)).sum(-1) + self.token_bias[candidate_ids]

    def export(self) -> RewardWeights:
        def array(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np.float32)

        # cast: nn.ModuleList is not generic, so to mypy its items are plain Modules; all of them are Blocks
        layers = [cast(Block, b).export() for b in self.blocks]
        return RewardWeights(
            shape=self.shape,
            embedding=array(self.embedding),
            layers=layers,
            final_scale=array(self.final_ln.weight),
            final_bias=array(self.final_ln.bias),
            head=array(self.head),
            token_bias=array(self.token_bias),
            embedding_up=None if self.embedding_up is None else array(self.embedding_up),
        )


def _int8_rounded(embedding: np.ndarray) -> torch.Tensor:
    quantized, scale = quantize_rows(embedding.astype(np.float32))
    return torch.from_numpy(quantized.astype(np.float32) * scale[:, None])


def base_embedding_projection(gguf_path: Path, width: int, *, seed: int) -> np.ndarray | None:
    """The base's token embedding reduced to ``width`` dims by PCA, unit variance; None if it cannot be read."""
    reader = GGUFReader(gguf_path)
    tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if tensor is None:
        return None
    matrix = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    matrix = matrix.reshape(-1, int(tensor.shape[0]))  # [V, n_embd]
    centered = matrix - matrix.mean(dim=0)
    generator = torch.Generator().manual_seed(seed)
    sample = centered[torch.randperm(len(centered), generator=generator)[:16384]]
    _, _, directions = torch.linalg.svd(sample, full_matrices=False)  # rows: principal directions
    projected = centered @ directions[: min(width, directions.shape[0])].T
    if projected.shape[1] < width:  # a base narrower than the reward: pad with small noise
        noise = torch.randn(len(projected), width - projected.shape[1], generator=generator) * projected.std()
        projected = torch.cat([projected, noise], dim=1)
    return (projected / projected.std()).numpy()
