"""Example data by distillation: the base model answers under a system prompt (the "teacher"),
and the data keeps the answers *without* that system prompt as the user's turn. Each line
records the teacher's system prompt, so tuning can match the teacher's whole next-token
distribution rather than only the sampled token. A reward trained on it moves the bare
base model toward the teacher: a persona or style with no prompt at run time. This is
also how built-in style rewards are made.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Callable

from engine.base_model import BaseModel
from engine.decode import Generation
from engine.files import write_atomically
from engine.steering import SamplingConfig
from rewards_onnx.data import DatasetError, Demonstration
from rewards_onnx.teacher import messages_for

TOPICS = [
    "bicycles", "the ocean", "sleep", "coffee", "volcanoes", "learning a language", "saving money", "the moon",
    "gardening", "chess", "rainbows", "exercise", "bread baking", "honeybees", "the internet", "photography",
    "deserts", "friendship", "electric cars", "music practice", "recycling", "dinosaurs", "time management",
    "mountains", "cooking rice", "the human heart", "public speaking", "penguins", "solar panels", "reading books",
    "thunderstorms", "making tea", "job interviews", "rivers", "birds migrating", "writing letters", "cats",
    "the stock market", "camping", "maps",
]
QUESTION_FORMS = [
    "What is special about {}?", "How do {} work?", "Why do people care about {}?", "Give me some advice about {}.",
    "Tell me an interesting fact about {}.", "Explain {} to a child.",
]


def example_prompts(seed: int) -> list[str]:
    """Every topic in every question form (240 prompts), in a seeded order."""
    prompts = [form.format(topic) for topic, form in itertools.product(TOPICS, QUESTION_FORMS)]
    random.Random(seed).shuffle(prompts)
    return prompts


def distill(base: BaseModel, system: str, count: int, *, max_tokens: int = 96, temperature: float = 0.7,
            seed: int = 0, progress: Callable[[int, int], None] | None = None) -> list[Demonstration]:
    """Up to ``count`` teacher answers that ended on their own (cut-off answers would teach stopping mid-sentence)."""
    examples = []
    for index, prompt in enumerate(example_prompts(seed)):
        if len(examples) == count:
            break
        config = SamplingConfig(temperature=temperature, max_tokens=max_tokens, seed=seed + index)
        result = Generation(base, base.chat_prompt_tokens(messages_for(prompt, system)), config=config).run()
        if result.finish_reason == "stop" and result.text.strip():
            examples.append(Demonstration(prompt, result.text.strip(), teacher_system=system,
                                          teacher_temperature=temperature))
        if progress:
            progress(len(examples), count)
    if not examples:
        raise DatasetError(f"No teacher answer ended within {max_tokens} tokens; raise --max-tokens.")
    return examples


def write_jsonl(path: Path, examples: list[Demonstration]) -> None:
    lines = [json.dumps({"prompt": e.prompt, "response": e.response, "teacher_system": e.teacher_system,
                         "teacher_temperature": e.teacher_temperature}, ensure_ascii=False) for e in examples]
    write_atomically(Path(path), "\n".join(lines) + "\n")
