"""A llama-architecture GGUF as a torch model, weights dequantized: the per-user fine-tune's starting point.

This is a benchmark tool (``prt compare``), not the product: the app never runs a base model in torch.
It reads the same tensors llama.cpp does and computes the same function (RMSNorm, RoPE on adjacent
pairs as llama.cpp's "normal" rope type, grouped-query attention, SwiGLU, tied or separate output),
in float32, so it agrees with llama.cpp to within the quantized kernels' rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGUFReader
from gguf.quants import dequantize
from torch import nn

from engine.runtime.errors import PrtError

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, kv_heads, T, head_dim]


class UnsupportedModelError(PrtError):
    """The GGUF is not a llama-architecture model this torch copy can run."""


@dataclass(frozen=True)
class LlamaShape:
    n_vocab: int
    width: int
    layers: int
    heads: int
    kv_heads: int
    feed_forward: int
    rope_base: float
    rms_eps: float

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LlamaBlock(nn.Module):
    def __init__(self, shape: LlamaShape, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.shape = shape
        self.attn_norm = RMSNorm(weights["attn_norm.weight"], shape.rms_eps)
        self.ffn_norm = RMSNorm(weights["ffn_norm.weight"], shape.rms_eps)
        names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        self.linear = nn.ParameterDict({name: nn.Parameter(weights[f"{name}.weight"]) for name in names})

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None, layer: int):
        shape, w = self.shape, self.linear
        batch, length, _ = x.shape
        h = self.attn_norm(x)
        q = (h @ w["attn_q"].T).view(batch, length, shape.heads, shape.head_dim).transpose(1, 2)
        k = (h @ w["attn_k"].T).view(batch, length, shape.kv_heads, shape.head_dim).transpose(1, 2)
        v = (h @ w["attn_v"].T).view(batch, length, shape.kv_heads, shape.head_dim).transpose(1, 2)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        if cache is not None:
            if layer < len(cache):
                k = torch.cat([cache[layer][0], k], dim=2)
                v = torch.cat([cache[layer][1], v], dim=2)
                cache[layer] = (k, v)
            else:
                cache.append((k, v))
        group = shape.heads // shape.kv_heads  # query head h reads key/value head h // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        past = k.shape[2] - length
        mask = torch.ones(length, k.shape[2], dtype=torch.bool).tril(diagonal=past)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attended.transpose(1, 2).reshape(batch, length, shape.width) @ w["attn_output"].T
        h = self.ffn_norm(x)
        return x + (F.silu(h @ w["ffn_gate"].T) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (x[2i], x[2i+1]), as llama.cpp rotates a llama GGUF's (permuted) q and k."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class TorchLlama(nn.Module):
    def __init__(self, shape: LlamaShape, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.shape = shape
        self.embedding = nn.Parameter(tensors["token_embd.weight"])
        self.blocks = nn.ModuleList(
            LlamaBlock(
                shape, {key.split(".", 2)[2]: value for key, value in tensors.items() if key.startswith(f"blk.{i}.")}
            )
            for i in range(shape.layers)
        )
        self.output_norm = RMSNorm(tensors["output_norm.weight"], shape.rms_eps)
        output = tensors.get("output.weight")
        self.output = None if output is None else nn.Parameter(output)  # None: tied to the embedding

    @classmethod
    def from_gguf(cls, path: Path) -> TorchLlama:
        reader = GGUFReader(path)
        fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.")}
        architecture = fields.get("general.architecture")
        if architecture != "llama":
            raise UnsupportedModelError(
                f"{Path(path).name} is a {architecture!r} model; the fine-tune baseline runs llama-architecture "
                "GGUFs only (SmolLM2, Llama, and others converted as llama)."
            )
        tensors = {t.name: _dequantized(t) for t in reader.tensors}
        shape = LlamaShape(
            n_vocab=int(tensors["token_embd.weight"].shape[0]),
            width=int(fields["llama.embedding_length"]),
            layers=int(fields["llama.block_count"]),
            heads=int(fields["llama.attention.head_count"]),
            kv_heads=int(fields.get("llama.attention.head_count_kv", fields["llama.attention.head_count"])),
            feed_forward=int(fields["llama.feed_forward_length"]),
            rope_base=float(fields.get("llama.rope.freq_base", 10000.0)),
            rms_eps=float(fields["llama.attention.layer_norm_rms_epsilon"]),
        )
        if shape.width % shape.heads or shape.heads % shape.kv_heads or shape.head_dim % 2:
            raise UnsupportedModelError(f"{Path(path).name} has an attention shape this copy cannot run: {shape}.")
        return cls(shape, tensors)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V]; with ``cache``, the tokens follow those already in it."""
        past = cache[0][0].shape[2] if cache else 0
        rope = self._rope(past, tokens.shape[1])
        x = self.embedding[tokens]
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        output = self.embedding if self.output is None else self.output
        return self.output_norm(x) @ output.T

    def _rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.shape.head_dim // 2
        frequencies = self.shape.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
        angles = torch.arange(start, start + length, dtype=torch.float64)[:, None] * frequencies
        return angles.cos().float(), angles.sin().float()

    @torch.no_grad()
    def greedy(self, prompt: Sequence[int], *, max_tokens: int, is_stop: Callable[[int], bool]) -> list[int]:
        """The reply at temperature 0, through a KV cache; ends at a stop token (not included) or ``max_tokens``."""
        self.eval()
        cache: KVCache = []
        logits = self(torch.tensor([list(prompt)]), cache)[0, -1]
        reply: list[int] = []
        while len(reply) < max_tokens:
            token = int(logits.argmax())
            if is_stop(token):
                break
            reply.append(token)
            logits = self(torch.tensor([[token]]), cache)[0, -1]
        return reply


def _dequantized(tensor) -> torch.Tensor:
    """A GGUF tensor as float32 in torch's layout: GGUF lists dimensions innermost first, torch outermost first."""
    values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    dims = [int(d) for d in reversed(tensor.shape.tolist())]
    return torch.from_numpy(values.reshape(dims).copy())
