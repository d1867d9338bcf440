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
from collections.abc import Callable
from pathlib import Path

from engine.runtime.base_model import BaseModel
from engine.runtime.decode import Generation
from engine.runtime.files import write_atomically
from engine.runtime.steering import SamplingConfig
from rewards_onnx.data import DatasetError, Demonstration
from rewards_onnx.teacher import messages_for

TOPICS = [
    "bicycles",
    "the ocean",
    "sleep",
    "coffee",
    "volcanoes",
    "learning a language",
    "saving money",
    "the moon",
    "gardening",
    "chess",
    "rainbows",
    "exercise",
    "bread baking",
    "honeybees",
    "the internet",
    "photography",
    "deserts",
    "friendship",
    "electric cars",
    "music practice",
    "recycling",
    "dinosaurs",
    "time management",
    "mountains",
    "cooking rice",
    "the human heart",
    "public speaking",
    "penguins",
    "solar panels",
    "reading books",
    "thunderstorms",
    "making tea",
    "job interviews",
    "rivers",
    "birds migrating",
    "writing letters",
    "cats",
    "the stock market",
    "camping",
    "maps",
]
# More topics, asked after all of TOPICS (so the first 240 prompts, and data made from them, stay as they were)
MORE_TOPICS = [
    "earthquakes",
    "the immune system",
    "knitting",
    "wind turbines",
    "the Roman Empire",
    "jazz",
    "origami",
    "skateboarding",
    "sharks",
    "composting",
    "the water cycle",
    "yoga",
    "hot air balloons",
    "chocolate",
    "octopuses",
    "lightning",
    "the pyramids",
    "vaccines",
    "board games",
    "wolves",
    "fireworks",
    "coral reefs",
    "hiking boots",
    "jellyfish",
    "the printing press",
    "spiders",
    "submarines",
    "poetry",
    "the sun",
    "elephants",
    "mushrooms",
    "the violin",
    "robots",
    "rainforests",
    "sea turtles",
    "running shoes",
    "ancient Greece",
    "telescopes",
    "pizza",
    "the brain",
    "comets",
    "vegetables",
    "hurricanes",
    "meditation",
    "astronauts",
    "the alphabet",
    "frogs",
    "caves",
    "wine making",
    "tigers",
    "dreams",
    "pottery",
    "black holes",
    "cheese",
    "the Olympics",
    "batteries",
    "whales",
    "gravity",
    "swimming",
    "windmills",
    "knights",
    "soccer",
    "ants",
    "tides",
    "ice cream",
    "the compass",
    "painting",
    "earthworms",
    "rockets",
    "fossils",
    "the Arctic",
    "horses",
    "sunflowers",
    "the periodic table",
    "surfing",
    "bamboo",
    "parrots",
    "magnets",
    "strawberries",
    "sailing",
    "spices",
    "the Great Wall of China",
    "video games",
    "beavers",
    "the stomach",
    "lakes",
    "the first airplanes",
    "potatoes",
    "butterflies",
    "fishing",
    "the calendar",
    "dolphins",
    "snow",
    "the speed of light",
    "marathons",
    "paper",
    "apples",
    "jungles",
    "blood",
    "the Eiffel Tower",
    "foxes",
    "wool",
    "skiing",
    "stars",
    "cement",
    "eggs",
    "hummingbirds",
    "typewriters",
    "weather forecasts",
    "cactuses",
    "orchestras",
    "handwriting",
    "seeds",
    "koalas",
    "clouds",
    "movies",
    "yogurt",
    "wheat",
    "the lungs",
    "bats",
    "carpentry",
    "oranges",
    "television",
    "glass",
    "the nervous system",
    "dance",
    "salt",
    "trees",
    "sand",
    "the tongue",
    "beetles",
    "traffic lights",
    "rock climbing",
    "wind",
    "bones",
    "buses",
    "vitamins",
    "rain",
    "the eyes",
    "puzzles",
    "cotton",
    "seashells",
    "newspapers",
    "the circus",
    "teeth",
    "candles",
    "farming",
    "sheep",
    "pencils",
    "satellites",
    "dragons in myths",
    "wetlands",
    "the ozone layer",
    "lemons",
    "statues",
    "canals",
    "tea ceremonies",
    "basketball",
    "nuclear power",
    "silk",
    "the postal service",
]
QUESTION_FORMS = [
    "What is special about {}?",
    "How do {} work?",
    "Why do people care about {}?",
    "Give me some advice about {}.",
    "Tell me an interesting fact about {}.",
    "Explain {} to a child.",
]


def example_prompts(seed: int) -> list[str]:
    """Every topic in every question form, in a seeded order: the 240 prompts on TOPICS first, then those on
    MORE_TOPICS."""
    prompts = []
    for topics in (TOPICS, MORE_TOPICS):
        batch = [form.format(topic) for topic, form in itertools.product(topics, QUESTION_FORMS)]
        random.Random(seed).shuffle(batch)
        prompts += batch
    return prompts


def distill(
    base: BaseModel,
    system: str,
    count: int,
    *,
    max_tokens: int = 96,
    temperature: float = 0.7,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Demonstration]:
    """Up to ``count`` teacher answers that ended on their own (cut-off answers would teach stopping mid-sentence)."""
    examples: list[Demonstration] = []
    for index, prompt in enumerate(example_prompts(seed)):
        if len(examples) == count:
            break
        config = SamplingConfig(temperature=temperature, max_tokens=max_tokens, seed=seed + index)
        result = Generation(base, base.chat_prompt_tokens(messages_for(prompt, system)), config=config).run()
        if result.finish_reason == "stop" and result.text.strip():
            examples.append(
                Demonstration(prompt, result.text.strip(), teacher_system=system, teacher_temperature=temperature)
            )
        if progress:
            progress(len(examples), count)
    if not examples:
        raise DatasetError(f"No teacher answer ended within {max_tokens} tokens; raise --max-tokens.")
    return examples


def write_jsonl(path: Path, examples: list[Demonstration]) -> None:
    lines = [
        json.dumps(
            {
                "prompt": e.prompt,
                "response": e.response,
                "teacher_system": e.teacher_system,
                "teacher_temperature": e.teacher_temperature,
            },
            ensure_ascii=False,
        )
        for e in examples
    ]
    write_atomically(Path(path), "\n".join(lines) + "\n")
