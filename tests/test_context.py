"""The context policy (engine/app/context.py): a long chat leaves out its oldest turns and never dead-ends.

Through real parts: a tiny GGUF with the real SmolLM2 tokenizer and chat template (512-token context), the
ChatEngine, ``prt chat`` as a user runs it, and the default model for what only real text shows.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import TINY_CONFIG
from engine.app.chat import ChatEngine
from engine.app.context import ContextUse, continuation_prompt_tokens, default_reply_room, plan_context
from engine.app.context_bench import chat_script, format_context_report, run_chat
from engine.runtime.base_model import BaseModel, BaseModelConfig
from engine.runtime.errors import ContextOverflowError, PromptError
from engine.runtime.reward_graph import random_reward_weights
from engine.runtime.steering import SamplingConfig
from helpers import prt, prt_process, reference_greedy
from tiny_models import small_reward_shape, write_reward

N_CTX = TINY_CONFIG.n_ctx
ROOM = 64
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}


def user(turn: int) -> dict[str, str]:
    return {"role": "user", "content": f"Question {turn}: tell me about item {turn} and why it matters."}


def assistant(turn: int) -> dict[str, str]:
    return {"role": "assistant", "content": f"Item {turn} matters because " + "it is useful and cheap. " * 4}


def conversation(turns: int, *, system: bool = True) -> list[dict[str, str]]:
    """``turns`` whole turns and then the next user message."""
    messages = [SYSTEM] if system else []
    for turn in range(turns):
        messages += [user(turn), assistant(turn)]
    return messages + [user(turns)]


def tokens_of(base: BaseModel, messages) -> int:
    return len(base.chat_prompt_tokens(messages))


@pytest.fixture
def engine(tiny_gguf):
    chat = ChatEngine()
    chat.load_model(tiny_gguf, TINY_CONFIG)
    yield chat
    chat.close()


# -- the policy --------------------------------------------------------------------------------
def test_a_chat_that_fits_is_sent_whole(tiny_base):
    messages = conversation(2)
    kept, use = plan_context(tiny_base, messages, reply_room=ROOM)
    assert kept == messages
    assert use == ContextUse(left_out=0, prompt_tokens=tokens_of(tiny_base, messages), context_size=N_CTX)


def test_the_system_prompt_and_the_latest_whole_turns_are_kept_under_half_the_context(tiny_base):
    messages = conversation(20)
    assert tokens_of(tiny_base, messages) > N_CTX
    kept, use = plan_context(tiny_base, messages, reply_room=ROOM)
    history = messages[1:]
    assert kept == [SYSTEM] + history[use.left_out :]
    assert kept[1]["role"] == "user" and use.left_out % 2 == 0  # whole turns: the history sent starts at a user
    assert use.prompt_tokens == tokens_of(tiny_base, kept) <= N_CTX // 2
    assert tokens_of(tiny_base, [SYSTEM] + history[use.left_out - 2 :]) > N_CTX // 2  # as much as fits in half


def test_without_a_system_prompt_the_history_still_starts_at_a_user_message(tiny_base):
    messages = conversation(20, system=False)
    kept, use = plan_context(tiny_base, messages, reply_room=ROOM)
    assert kept == messages[use.left_out :] and kept[0]["role"] == "user" and use.left_out > 0


def test_a_left_out_inside_a_turn_moves_to_the_next_user_message(tiny_base):
    messages = conversation(3)
    kept, use = plan_context(tiny_base, messages, reply_room=ROOM, left_out=1)  # history[1] is an assistant's
    assert use.left_out == 2 and kept == [SYSTEM] + messages[3:]
    kept, use = plan_context(tiny_base, messages, reply_room=ROOM, left_out=99)  # e.g. after messages were deleted
    assert use.left_out == 6 and kept == [SYSTEM, messages[-1]]


def test_the_prefix_stays_until_the_context_is_full_then_drops_to_half(tiny_base):
    """Turn after turn, the prompt starts with the last one (KV caches reuse it) until a reply would not fit; then
    enough turns are left out at once that the prompt takes at most half the context."""
    messages, left_out, previous, moves = [SYSTEM], 0, None, []
    for turn in range(40):
        messages.append(user(turn))
        kept, use = plan_context(tiny_base, messages, reply_room=ROOM, left_out=left_out)
        prompt = tiny_base.chat_prompt_tokens(kept)
        assert use.prompt_tokens == len(prompt) and len(prompt) + ROOM <= N_CTX
        if use.left_out == left_out:
            if previous is not None:
                assert prompt[: len(previous)] == previous  # only the new turn is evaluated
        else:
            moves.append(turn)
            assert use.left_out > left_out
            assert tokens_of(tiny_base, [SYSTEM] + messages[1 + left_out :]) + ROOM > N_CTX  # it had to move
            assert use.prompt_tokens <= N_CTX // 2
        left_out, previous = use.left_out, prompt
        messages.append(assistant(turn))
    assert 3 <= len(moves) <= 40 // 4, moves  # it moved, and each move served several turns
    assert all(later - earlier >= 3 for earlier, later in zip(moves, moves[1:])), moves


def test_the_last_user_message_is_never_left_out(tiny_base):
    long = {"role": "user", "content": "word " * 300}  # more than half the context, less than all of it
    messages = conversation(3)[:-1] + [long]
    kept, use = plan_context(tiny_base, messages, reply_room=ROOM)
    assert kept == [SYSTEM, long] and use.left_out == 6 and use.prompt_tokens > N_CTX // 2


def test_a_single_message_too_long_is_one_clear_error(tiny_base):
    too_long = {"role": "user", "content": "word " * 600}
    with pytest.raises(ContextOverflowError) as raised:
        plan_context(tiny_base, [too_long], reply_room=ROOM)
    message = str(raised.value)
    assert re.fullmatch(
        r"Your message is \d+ tokens, but this model's context holds 512 with room for a reply; .*", message
    )
    assert "shorten it" in message and "Settings > Preferences" in message and "--ctx" in message
    with pytest.raises(ContextOverflowError, match=r"^Your message and the system prompt are \d+ tokens"):
        plan_context(tiny_base, conversation(5)[:-1] + [too_long], reply_room=ROOM)  # the history is no matter


def test_a_message_that_fits_but_leaves_no_room_for_the_reply_is_refused(tiny_base):
    almost = {"role": "user", "content": "word " * 460}
    assert N_CTX - ROOM < tokens_of(tiny_base, [almost]) < N_CTX - 16
    with pytest.raises(ContextOverflowError, match="room for a reply"):
        plan_context(tiny_base, [almost], reply_room=ROOM)
    assert plan_context(tiny_base, [almost], reply_room=16)[1].left_out == 0


def test_the_reply_room_is_max_tokens_up_to_a_quarter_of_the_context():
    assert default_reply_room(512, 64) == 64
    assert default_reply_room(512, 512) == 128
    assert default_reply_room(8192, 512) == 512


# -- continuing a reply ------------------------------------------------------------------------
def test_the_continuation_prompt_is_the_template_prefix_and_the_partial_reply(tiny_base):
    before = [SYSTEM, user(1)]
    partial = {"role": "assistant", "content": "Item 1 matters because"}
    prompt = continuation_prompt_tokens(tiny_base, before + [partial])
    assert prompt == tiny_base.chat_prompt_tokens(before) + tiny_base.tokenize(partial["content"])
    text = tiny_base.llama.detokenize(prompt, special=True).decode()
    assert text.endswith("<|im_start|>assistant\nItem 1 matters because")  # no end of turn: the reply goes on
    _, use = plan_context(tiny_base, before + [partial], reply_room=ROOM, continue_last=True)
    assert use.prompt_tokens == len(prompt)
    with pytest.raises(PromptError, match="no reply to continue"):
        continuation_prompt_tokens(tiny_base, before)


def test_a_long_chat_is_continued_with_its_oldest_turns_left_out(tiny_base):
    messages = conversation(20) + [{"role": "assistant", "content": "Item 20 matters because"}]
    kept, use = plan_context(tiny_base, messages, reply_room=ROOM, continue_last=True)
    assert kept[0] == SYSTEM and kept[1]["role"] == "user" and kept[-2:] == messages[-2:] and use.left_out > 0
    assert use.prompt_tokens == len(continuation_prompt_tokens(tiny_base, kept)) <= N_CTX // 2


def test_the_engine_continues_a_reply_from_its_text(engine):
    messages = [SYSTEM, user(1), {"role": "assistant", "content": "Item 1 matters because"}]
    config = SamplingConfig(temperature=0.0, max_tokens=8, ignore_eos=True)
    generation = engine.reply(messages, config, continue_last=True)
    assert generation.prompt_tokens == continuation_prompt_tokens(engine.base, messages)
    assert generation.context.prompt_tokens == len(generation.prompt_tokens)
    result = generation.run()
    assert result.token_ids == reference_greedy(engine.base, generation.prompt_tokens, 8)


@pytest.mark.slow
def test_a_continued_reply_on_the_default_model_goes_on_from_the_partial_text(default_model_path):
    chat = ChatEngine()
    try:
        base = chat.load_model(default_model_path, BaseModelConfig(n_ctx=1024, n_threads=2, n_gpu_layers=0))
        question = {"role": "user", "content": "What is the capital of France?"}
        partial = {"role": "assistant", "content": "The capital of France is"}
        config = SamplingConfig(temperature=0.0, max_tokens=1)
        result = chat.reply([question, partial], config, continue_last=True).run()
        paris = base.tokenize(" Paris")
        assert paris[0] in result.trace[0].candidate_ids[:3].tolist()  # ranks, not one CPU's greedy text
    finally:
        chat.close()


# -- the engine and `prt chat` ---------------------------------------------------------------------
def test_the_engine_plans_each_reply_and_says_what_it_sent(engine):
    config = SamplingConfig(temperature=0.0, max_tokens=ROOM)
    first = engine.reply(conversation(20), config)
    assert first.context.left_out > 0 and first.context.context_size == N_CTX
    assert first.context.prompt_tokens == len(first.prompt_tokens) <= N_CTX // 2
    messages = conversation(21)
    again = engine.reply(messages, config, left_out=first.context.left_out)
    assert again.context.left_out == first.context.left_out  # it still fits: the same prefix
    assert again.prompt_tokens[: len(first.prompt_tokens)] == first.prompt_tokens


def stats_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "tok/s" in line]


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_60_turn_chat_on_a_512_token_context_answers_every_turn(tiny_gguf):
    lines = [f"Question number {i}: what do you think about item {i}, and why?" for i in range(60)]
    ran = prt_process(
        "chat",
        "--model",
        str(tiny_gguf),
        "--ctx",
        "512",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--threads",
        "2",
        stdin="\n".join(lines) + "\n",
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count("bot> ") == 60
    stats = stats_lines(ran.stderr)
    assert len(stats) == 60 and "prt: error" not in ran.stderr
    meters = [int(used) for used in re.findall(r"ctx (\d+)/512\]", ran.stderr)]
    assert len(meters) == 60 and max(meters) <= 512
    left_out_lines = re.findall(r"^\[(\d+) earlier messages are not sent to the model\]$", ran.stderr, re.M)
    assert len(left_out_lines) >= 2 and [int(n) for n in left_out_lines] == sorted(int(n) for n in left_out_lines)


def test_prt_chat_drops_only_a_message_too_long_and_reset_sends_everything_again(tiny_gguf):
    lines = [f"Question number {i}: what do you think about item {i}, and why?" for i in range(12)]
    stdin = "\n".join([*lines, "word " * 600, "/reset", "Hello there", "And again", "/quit"]) + "\n"
    ran = prt(
        "chat", "--model", str(tiny_gguf), "--ctx", "512", "--max-tokens", "24", "--temperature", "0", stdin=stdin
    )
    assert ran.returncode == 0, ran.stderr
    errors = [line for line in ran.stderr.splitlines() if line.startswith("prt: error: ")]
    assert len(errors) == 1 and "Your message is" in errors[0] and "--ctx" in errors[0]
    assert ran.stdout.count("bot> ") == 14 and "earlier messages are not sent" in ran.stderr
    prompts = [int(n) for n in re.findall(r"prompt (\d+) tokens", ran.stderr)]
    hello, again = prompts[-2:]
    assert hello + 8 < again < N_CTX // 2  # after /reset the second prompt holds the first turn whole again


@pytest.mark.slow
def test_the_context_bench_counts_what_each_kv_state_evaluates(tmp_path, tiny_gguf, tiny_base):
    reward = write_reward(
        tmp_path / "style.onnx",
        random_reward_weights(small_reward_shape(tiny_base.n_vocab), seed=4),
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        base_name=tiny_base.name,
    )
    config = BaseModelConfig(n_ctx=256, n_threads=2, n_gpu_layers=0)
    figures = run_chat(tiny_gguf, config, [reward], chat_script(10), max_tokens=16)
    first, *rest = figures
    assert first.base_prefill_tokens == first.prompt_tokens  # a fresh model holds nothing
    moved = [turn for turn, previous in zip(rest, figures) if turn.left_out != previous.left_out]
    assert moved
    for turn in figures:
        assert turn.reward_prefill_tokens == [turn.base_prefill_tokens]  # one KV state each, one sequence
    kept = [turn for turn in rest if turn not in moved]
    assert kept and all(turn.base_prefill_tokens < turn.prompt_tokens / 2 for turn in kept)  # the cache held
    assert all(turn.base_prefill_tokens > turn.prompt_tokens / 2 for turn in moved)  # the window moved: refilled


@pytest.mark.slow
def test_prt_bench_context_policy_reports_both_runs(tiny_gguf):
    ran = prt("bench", "--model", str(tiny_gguf), "--context-policy", "256", "--turns", "3", "--threads", "2", "--json")
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["policy"]["n_ctx"] == 256 and report["whole_chat"]["left_out_at_the_end"] == 0
    assert len(report["policy"]["per_turn"]) == 3 and report["ratio_prefill_tokens"] > 0
    assert "a/b: prefill tokens" in format_context_report(report)
