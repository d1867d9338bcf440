"""Tiny real models for tests, built on the fly.

A tiny GGUF is a 2-layer llama with random weights and the real SmolLM2 tokenizer
(token list, merges, chat template) copied from the default model, so two seeds
give two different models of one vocabulary. Rewards are built with the same
graph builder the engine documents as its contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter, LlamaFileType

from engine.runtime.reward_graph import RewardNetworkShape, RewardWeights, build_reward_model
from engine.runtime.rewards import RewardCard, save_reward


@dataclass(frozen=True)
class Tokenizer:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    chat_template: str
    bos: int
    eos: int
    pre: str


def read_tokenizer(gguf_path: Path) -> Tokenizer:
    fields = GGUFReader(gguf_path).fields

    def value(key: str):
        return fields[key].contents()

    return Tokenizer(
        tokens=value("tokenizer.ggml.tokens"),
        token_types=value("tokenizer.ggml.token_type"),
        merges=value("tokenizer.ggml.merges"),
        chat_template=value("tokenizer.chat_template"),
        bos=value("tokenizer.ggml.bos_token_id"),
        eos=value("tokenizer.ggml.eos_token_id"),
        pre=value("tokenizer.ggml.pre"),
    )


def write_tiny_llama(
    path: Path,
    tokenizer: Tokenizer,
    *,
    seed: int,
    n_embd: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_ff: int = 128,
    n_ctx: int = 2048,
) -> Path:
    rng = np.random.default_rng(seed)
    n_vocab = len(tokenizer.tokens)

    def normal(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-llama-seed{seed}")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_heads)
    writer.add_rope_dimension_count(n_embd // n_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    writer.add_token_merges(tokenizer.merges)
    writer.add_bos_token_id(tokenizer.bos)
    writer.add_eos_token_id(tokenizer.eos)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    # numpy shapes are GGUF dims reversed: [out, in]. No output.weight: llama.cpp ties it to token_embd.
    writer.add_tensor("token_embd.weight", normal(n_vocab, n_embd, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for layer in range(n_layers):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", normal(n_embd, n_embd))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", normal(n_ff, n_embd))
        writer.add_tensor(f"{prefix}.ffn_up.weight", normal(n_ff, n_embd))
        writer.add_tensor(f"{prefix}.ffn_down.weight", normal(n_embd, n_ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_reward(
    path: Path, weights: RewardWeights, *, vocabulary_fingerprint: str, base_name: str, name: str | None = None
) -> Path:
    card = RewardCard(
        name=name or path.stem,
        vocabulary_fingerprint=vocabulary_fingerprint,
        vocabulary_size=weights.shape.vocab_size,
        base_model_name=base_name,
        network={"width": weights.shape.width, "layers": weights.shape.layers, "heads": weights.shape.heads},
    )
    return save_reward(path, build_reward_model(weights), card)


def small_reward_shape(vocab_size: int) -> RewardNetworkShape:
    return RewardNetworkShape(vocab_size=vocab_size, width=32, layers=2, heads=4)
