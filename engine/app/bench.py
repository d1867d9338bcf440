"""``prt bench``: plain llama-cpp-python decoding vs our steered loop, same model, same prompts, one run.

Three ways of decoding the same prompts, interleaved round by round (the order
rotates each round so drift in machine speed hits each equally):

- plain:     llama-cpp-python's own ``Llama.generate`` with its greedy sampler,
             each token turned into text;
- engine:    our loop with no reward (the cost of owning the loop);
- steered:   our loop with a reference-size reward (2 layers, width 128), each step in two halves (the
             reward's state advanced on a worker while the candidates are picked, engine/runtime/decode.py);
- steered_whole_steps: the same reward, each step one run after the candidates are picked;
- with ``library``: our loop with several rewards (e.g. the base style rewards) at weight 0.5 each,
  scored by one merged session per step and by one session per reward (engine/runtime/mixing.py).

Each generates exactly ``tokens`` tokens (EOS ignored) so all see the same
context lengths. Decode speed is timed from the first token to the last, so
prompt prefill does not blur the ratio; ratios are medians over runs made back
to back, so a machine that speeds up or slows down mid-run does not skew them. The reward's own step is then timed
alone at a short and a long context.

``prt bench-rewards`` (``run_merge_bench``): N rewards scored per step by N sessions vs one merged
session (engine/runtime/mixing.py), steps interleaved, at a short and a long context; and the model bytes.
"""

from __future__ import annotations

import codecs
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import psutil

from engine.runtime.base_model import BaseModel
from engine.runtime.decode import Generation, RewardSlot, attach_rewards
from engine.runtime.mixing import stacked_model
from engine.runtime.reward_graph import (
    RewardNetworkShape,
    build_reward_model,
    embedding_rank_for,
    random_reward_weights,
    read_reward_weights,
)
from engine.runtime.rewards import RewardCard, RewardModel, RewardSession, open_session, save_reward
from engine.runtime.steering import SamplingConfig

PROMPTS = (
    "Explain how a bicycle works, part by part.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What should I consider when choosing a programming language for a new project?",
)
REFERENCE_SHAPE = dict(width=128, layers=2, heads=4)
SHORT_CONTEXT = 16
TIMED_REWARD_STEPS = 200
RewardRuntime = RewardModel | RewardSession  # both: reset, sync, advance, rewind


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    tokens: int = 128
    rounds: int = 3
    top_k: int = 40
    long_context: int = 1000

    def __post_init__(self) -> None:
        if self.tokens < 8 or self.rounds < 1 or self.top_k < 1 or self.long_context < SHORT_CONTEXT:
            raise ValueError("bench needs tokens >= 8, rounds >= 1, top_k >= 1, long_context >= 16")


LIBRARY_WEIGHT = 0.5


def run_bench(base: BaseModel, config: BenchConfig = BenchConfig(), library: Sequence[Path] = ()) -> dict:
    """``library``: reward files to decode with together, merged and separately (none: those runs are left out)."""
    with tempfile.TemporaryDirectory(prefix="prt-bench-") as folder:
        reward_path = write_reference_reward(base, Path(folder) / "reference-reward.onnx")
        slot = attach_rewards(base, [(reward_path, 1.0)])[0]
        library_slots = attach_rewards(base, [(path, LIBRARY_WEIGHT) for path in library])
        reward_file_bytes = reward_path.stat().st_size
        prompts = [base.chat_prompt_tokens([{"role": "user", "content": text}]) for text in PROMPTS]
        runners: dict[str, Callable[[list[int]], float]] = {
            "plain": lambda prompt: _plain_decode_seconds(base, prompt, config.tokens),
            "engine": lambda prompt: _engine_decode_seconds(base, prompt, [], config),
            "steered": lambda prompt: _engine_decode_seconds(base, prompt, [slot], config),
            "steered_whole_steps": lambda prompt: _engine_decode_seconds(base, prompt, [slot], config, split=False),
        }
        if library_slots:
            runners["library_merged"] = lambda prompt: _engine_decode_seconds(base, prompt, library_slots, config)
            runners["library_separate"] = lambda prompt: _engine_decode_seconds(
                base, prompt, library_slots, config, merge=False
            )
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        for prompt in prompts[:1]:  # warm-up: page in weights, build ORT kernels
            for run in runners.values():
                run(prompt)
        for round_index in range(config.rounds):
            order = _rotated(list(runners), round_index)
            for prompt in prompts:
                for name in order:
                    seconds[name].append(runners[name](prompt))
        timed_tokens = (config.tokens - 1) * config.rounds * len(prompts)
        tokens_per_second = {name: timed_tokens / sum(runs) for name, runs in seconds.items()}
        reward_ms = {
            f"reward_ms_per_step_at_{n}": _reward_step_ms(slot.reward, n, config.top_k)
            for n in (SHORT_CONTEXT, config.long_context)
        }
    return {
        "model": {"name": base.name, "path": str(base.path), "n_vocab": base.n_vocab},
        "reward": {
            **REFERENCE_SHAPE,
            "embedding_rank": slot.reward.card.network["embedding_rank"],
            "vocab_size": base.n_vocab,
            "file_bytes": reward_file_bytes,
            "share_of_model_file": round(reward_file_bytes / base.path.stat().st_size, 4),
        },
        "config": asdict(config) | {"prompts": len(prompts), "threads": base.config.n_threads or "auto"},
        "tokens_per_second": {name: round(value, 2) for name, value in tokens_per_second.items()},
        "ratio_steered_over_plain": _paired_speed_ratio(seconds["plain"], seconds["steered"]),
        "ratio_engine_over_plain": _paired_speed_ratio(seconds["plain"], seconds["engine"]),
        "ratio_split_over_whole_steps": _paired_speed_ratio(seconds["steered_whole_steps"], seconds["steered"]),
        **(_library_ratios(seconds, library_slots) if library_slots else {}),
        **{key: round(value, 4) for key, value in reward_ms.items()},
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "machine": {
            "platform": platform.platform(),
            "cpus_logical": psutil.cpu_count(),
            "cpus_physical": psutil.cpu_count(logical=False),
            "python": platform.python_version(),
        },
    }


def _library_ratios(seconds: dict[str, list[float]], slots: list[RewardSlot]) -> dict:
    return {
        "library": {
            "rewards": [slot.reward.name for slot in slots],
            "weight": LIBRARY_WEIGHT,
            "ratio_merged_over_separate": _paired_speed_ratio(seconds["library_separate"], seconds["library_merged"]),
            "ratio_merged_over_plain": _paired_speed_ratio(seconds["plain"], seconds["library_merged"]),
        }
    }


def format_report(report: dict) -> str:
    speeds = report["tokens_per_second"]
    long_key = next(
        key for key in report if key.startswith("reward_ms_per_step_at_") and not key.endswith(f"_{SHORT_CONTEXT}")
    )
    library = report.get("library")
    library_lines = (
        [
            f"library ({len(library['rewards'])} rewards at {library['weight']}) tok/s   merged "
            f"{speeds['library_merged']:.1f}   separate {speeds['library_separate']:.1f}",
            f"library        merged/separate {library['ratio_merged_over_separate']:.3f}   "
            f"merged/plain {library['ratio_merged_over_plain']:.3f}",
        ]
        if library
        else []
    )
    return "\n".join(
        [
            f"model: {report['model']['name']}   reward: 2 layers x 128 wide, embedding rank "
            f"{report['reward']['embedding_rank']} ({report['reward']['file_bytes'] / 1e6:.1f} MB, "
            f"{report['reward']['share_of_model_file']:.1%} of the model file)",
            f"decode tok/s   plain {speeds['plain']:.1f}   engine (no reward) {speeds['engine']:.1f}   "
            f"steered {speeds['steered']:.1f}",
            f"steered/plain  {report['ratio_steered_over_plain']:.3f}   engine/plain {report['ratio_engine_over_plain']:.3f}"
            f"   split/whole steps {report['ratio_split_over_whole_steps']:.3f}",
            f"reward step    {report[f'reward_ms_per_step_at_{SHORT_CONTEXT}']:.3f} ms at {SHORT_CONTEXT} tokens, "
            f"{report[long_key]:.3f} ms at {long_key.rsplit('_', 1)[1]} tokens",
            *library_lines,
            f"peak RSS       {report['peak_rss_mb']:.0f} MB",
        ]
    )


def _paired_speed_ratio(reference_seconds: list[float], other_seconds: list[float]) -> float:
    """Median over runs made back to back of reference time / other time: slow drift of the machine cancels."""
    return round(float(np.median(np.divide(reference_seconds, other_seconds))), 4)


def _rotated(names: list[str], shift: int) -> list[str]:
    shift %= len(names)
    return names[shift:] + names[:shift]


def write_reference_reward(base: BaseModel, path: Path) -> Path:
    """A reward with random weights in the reference shape, for benchmarks only."""
    rank = embedding_rank_for(base.n_vocab, REFERENCE_SHAPE["width"], base.path.stat().st_size)
    shape = RewardNetworkShape(vocab_size=base.n_vocab, embedding_rank=rank, **REFERENCE_SHAPE)
    card = RewardCard(
        name="reference-reward",
        description="random weights, for benchmarking only",
        vocabulary_fingerprint=base.vocabulary_fingerprint,
        vocabulary_size=base.n_vocab,
        base_model_name=base.name,
        network={**REFERENCE_SHAPE, "embedding_rank": shape.rank},
    )
    return save_reward(path, build_reward_model(random_reward_weights(shape, seed=0)), card)


def _first_to_last_seconds(stream: Iterable[object], tokens: int) -> float:
    """Time from the first streamed token to the ``tokens``-th."""
    first = None
    for count, _ in enumerate(stream, start=1):
        if first is None:
            first = time.perf_counter()
        if count == tokens:
            return time.perf_counter() - first
    raise RuntimeError(f"the stream ended before {tokens} tokens")


def _plain_decode_seconds(base: BaseModel, prompt: list[int], tokens: int) -> float:
    """llama-cpp-python's own loop and greedy sampler, turning tokens into text as any chat app must."""
    llama = base.llama
    llama.reset()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts = (
        decoder.decode(llama.detokenize([token])) for token in llama.generate(prompt, top_k=1, temp=0.0, reset=False)
    )
    return _first_to_last_seconds(texts, tokens)


def _engine_decode_seconds(
    base: BaseModel,
    prompt: list[int],
    slots: list[RewardSlot],
    config: BenchConfig,
    *,
    merge: bool = True,
    split: bool = True,
) -> float:
    base.llama.reset()  # same cold prefill as the plain run
    for slot in slots:
        slot.reward.reset()
    sampling = SamplingConfig(temperature=0.0, top_k=config.top_k, max_tokens=config.tokens, ignore_eos=True)
    generation = Generation(base, prompt, rewards=slots, config=sampling, merge_rewards=merge, split_reward_steps=split)
    events = (event for event in generation if event.token_id is not None)
    return _first_to_last_seconds(events, config.tokens)


def _reward_step_ms(reward: RewardModel, context: int, top_k: int) -> float:
    return _interleaved_step_ms({"one": [reward]}, context, top_k, reward.card.vocabulary_size)["one"]


def _interleaved_step_ms(
    ways: dict[str, Sequence[RewardRuntime]], context: int, top_k: int, vocab_size: int
) -> dict[str, float]:
    """Median ms of one decode step at ``context`` tokens, for each way of scoring (all its runtimes in turn);
    the ways take turns at every step, so a machine that changes speed hits each equally."""
    rng = np.random.default_rng(context)
    candidates = rng.integers(0, vocab_size, top_k)
    prefix = rng.integers(0, vocab_size, context).tolist()
    for runtime in (runtime for runtimes in ways.values() for runtime in runtimes):
        runtime.reset()
        runtime.sync(prefix, candidates)
    timings: dict[str, list[float]] = {name: [] for name in ways}
    for token in rng.integers(0, vocab_size, TIMED_REWARD_STEPS).tolist():
        for name, runtimes in ways.items():
            started = time.perf_counter()
            for runtime in runtimes:
                runtime.advance([token], candidates)
            timings[name].append(time.perf_counter() - started)
            for runtime in runtimes:
                runtime.rewind(context)  # stay at this context length
    return {name: float(np.median(values) * 1e3) for name, values in timings.items()}


# -- several rewards: separate sessions vs one merged session ------------------------------------------
def run_merge_bench(*, rewards: int = 4, vocab_size: int = 49152, top_k: int = 40, long_context: int = 1000) -> dict:
    """Per-step cost and memory of ``rewards`` reference-size rewards sharing one embedding (as rewards tuned for
    one base do): one session each vs one merged session, measured warm in one run."""
    if rewards < 2 or vocab_size < 2 or top_k < 1 or long_context < SHORT_CONTEXT:
        raise ValueError(
            f"the merge bench needs rewards >= 2, vocab_size >= 2, top_k >= 1, long_context >= {SHORT_CONTEXT}"
        )
    with tempfile.TemporaryDirectory(prefix="prt-bench-") as folder:
        paths = _write_sharing_rewards(Path(folder), rewards, vocab_size)
        merged_model = stacked_model([read_reward_weights(onnx.load(str(path))) for path in paths])
        separate = [RewardModel(path) for path in paths]
        merged = RewardSession(open_session(merged_model, threads=1), title="merged", source="merged")
        ways: dict[str, Sequence[RewardRuntime]] = {"separate": separate, "merged": [merged]}
        step_ms = {
            context: _interleaved_step_ms(ways, context, top_k, vocab_size) for context in (SHORT_CONTEXT, long_context)
        }
        separate_bytes, merged_bytes = sum(path.stat().st_size for path in paths), len(merged_model)
    return {
        "rewards": rewards,
        "reward": {**REFERENCE_SHAPE, "vocab_size": vocab_size, "top_k": top_k},
        "ms_per_step": {
            str(context): {name: round(ms, 4) for name, ms in timings.items()} for context, timings in step_ms.items()
        },
        "ratio_merged_over_separate": {
            str(context): round(timings["merged"] / timings["separate"], 3) for context, timings in step_ms.items()
        },
        "model_bytes": {
            "separate": separate_bytes,
            "merged": merged_bytes,  # the initializers, nearly all of it
            "ratio": round(merged_bytes / separate_bytes, 3),
        },
    }


def format_merge_report(report: dict) -> str:
    lines = [
        f"{report['rewards']} rewards, each 2 layers x 128 wide, vocabulary {report['reward']['vocab_size']}, "
        f"top-{report['reward']['top_k']}"
    ]
    for context, timings in report["ms_per_step"].items():
        lines.append(
            f"step at {context:>5} tokens   separate {timings['separate']:.3f} ms   merged "
            f"{timings['merged']:.3f} ms   merged/separate {report['ratio_merged_over_separate'][context]:.3f}"
        )
    sizes = report["model_bytes"]
    lines.append(
        f"model bytes         separate {sizes['separate'] / 1e6:.1f} MB   merged {sizes['merged'] / 1e6:.1f} MB"
        f"   merged/separate {sizes['ratio']:.3f}"
    )
    return "\n".join(lines)


def _write_sharing_rewards(folder: Path, count: int, vocab_size: int) -> list[Path]:
    """Reference-size rewards with random weights and one shared embedding."""
    shape = RewardNetworkShape(vocab_size=vocab_size, **REFERENCE_SHAPE)
    embedding = random_reward_weights(shape, seed=0).embedding
    paths = []
    for seed in range(count):
        weights = replace(random_reward_weights(shape, seed=seed), embedding=embedding)
        card = RewardCard(
            name=f"reference-{seed}",
            description="random weights, for benchmarking only",
            vocabulary_fingerprint="sha256:bench",
            vocabulary_size=vocab_size,
            base_model_name="none",
            network=REFERENCE_SHAPE,
        )
        paths.append(save_reward(folder / f"reference-{seed}.onnx", build_reward_model(weights), card))
    return paths


def peak_rss_bytes() -> int:
    if sys.platform == "win32":
        return psutil.Process().memory_info().peak_wset
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
