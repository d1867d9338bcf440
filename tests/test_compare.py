"""prt compare and its parts, through the real parts: a tiny llama GGUF in llama.cpp and its torch copy, a real
ONNX reward, the shipped fact probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFWriter

from helpers import assert_one_line_error, other_prompts, prt, reference_greedy
from rewards_onnx.finetune import FinetuneConfig, finetune, reply_log_probs, reply_nll
from rewards_onnx.knowledge import SHIPPED_FACTS, Fact, answer_sequence, is_correct, read_facts
from rewards_onnx.metrics import full_vocabulary_logprobs
from rewards_onnx.teacher import SequenceTargets, messages_for, reduce_to_support, response_sequence
from rewards_onnx.torch_llama import TorchLlama, UnsupportedModelError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def torch_copy(tiny_gguf) -> TorchLlama:
    return TorchLlama.from_gguf(tiny_gguf)


def test_the_torch_copy_computes_what_llama_cpp_computes(tiny_base, torch_copy):
    tokens, first = response_sequence(tiny_base, messages_for("How are you?", None), "Fine, thanks. And you?")
    expected = np.stack([logits for _, logits in tiny_base.next_token_logits(tokens, first)])
    with torch.no_grad():
        actual = torch_copy(torch.tensor([tokens]))[0, first - 1 : -1].numpy()
    # float32 weights on both sides; llama.cpp keeps its KV cache in float16, so logits of about -40 differ by 0.01
    difference = np.abs(_log_softmax(expected) - _log_softmax(actual))
    assert difference.mean() < 0.02 and difference.max() < 0.15
    prompt = tiny_base.chat_prompt_tokens(messages_for("Say something.", None))
    assert torch_copy.greedy(prompt, max_tokens=12, is_stop=lambda t: False) == reference_greedy(tiny_base, prompt, 12)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_a_model_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'gpt2' model"):
        TorchLlama.from_gguf(path)


def test_the_fine_tune_learns_its_replies_and_keeps_its_best_epoch(tiny_base, tiny_gguf):
    sequences = [
        response_sequence(tiny_base, messages_for(prompt, None), "Fine, thanks.") for prompt in other_prompts(8)
    ]
    report = finetune(tiny_gguf, sequences[:6], sequences[6:], config=FinetuneConfig(learning_rate=1e-3, epochs=3))
    assert len(report.held_out_nll) >= 2 and report.best_epoch >= 1
    assert report.held_out_nll[report.best_epoch] == min(report.held_out_nll)
    assert report.held_out_nll[report.best_epoch] < 0.5 * report.held_out_nll[0]
    assert reply_nll(report.model, sequences[6:]) == pytest.approx(report.held_out_nll[report.best_epoch], rel=1e-4)


def test_full_vocabulary_log_probs_move_only_the_top_k():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 50)) * 3
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    k = 5
    top = np.argsort(-log_probs, axis=1)[:, :k]
    targets = np.array([top[0, 2], top[1, 0], np.argsort(-log_probs[2])[20]])  # the last one outside the top-K
    candidates = np.concatenate([top, np.where(np.isin(targets, top[2]), 0, targets)[:, None]], axis=1)
    candidates[:2, k] = 0
    support_logprobs = np.take_along_axis(log_probs, candidates, 1).astype(np.float32)
    support_logprobs[:2, k] = -np.inf
    support = SequenceTargets(
        tokens=np.zeros(4, dtype=np.int64),
        first_target=1,
        candidate_ids=candidates,
        base_logprobs=support_logprobs,
        target_index=np.array([2, 0, k]),
    )
    rewards = rng.standard_normal((3, k + 1)).astype(np.float32)
    base, steered = full_vocabulary_logprobs(support, rewards)
    moved = log_probs.copy()  # the same by hand: the reward added to the top-K, normalized over every token
    np.put_along_axis(moved, top, np.take_along_axis(log_probs, top, 1) + rewards[:, :k], 1)
    moved -= np.log(np.exp(moved).sum(-1, keepdims=True))
    rows = np.arange(3)
    assert base == pytest.approx(log_probs[rows, targets], abs=1e-5)
    assert steered == pytest.approx(moved[rows, targets], abs=1e-5)
    assert full_vocabulary_logprobs(support, np.zeros_like(rewards))[1] == pytest.approx(base, abs=1e-6)


def test_the_probe_reads_the_shipped_facts_and_judges_whole_words(tiny_base, torch_copy):
    facts = read_facts(SHIPPED_FACTS, limit=6)
    assert len({fact.kind for fact in facts}) == 3  # the kinds interleaved: any first few cover all of them
    assert is_correct("It is Paris, of course.", "Paris") and is_correct("au, I think", "Au")
    assert not is_correct("Parisian food", "Paris") and not is_correct("Australia", "Au")
    fact = Fact("What is the capital of France?", "The capital of France is", "Paris", "capital")
    tokens, first = answer_sequence(tiny_base, fact)
    assert tiny_base.detokenize(tokens[first:]) == " Paris"
    support = reduce_to_support(tiny_base, tokens, first, 40)
    engine_side = full_vocabulary_logprobs(support, np.zeros(support.candidate_ids.shape))[1].sum()
    with torch.no_grad():
        torch_side = reply_log_probs(torch_copy, [(tokens, first)]).sum().item()
    assert torch_side == pytest.approx(engine_side, abs=0.05)  # llama.cpp keeps its KV cache in float16


def test_a_broken_fact_file_is_one_clear_error(tmp_path, tiny_gguf):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "Capital of France?", "answer": "Paris"}\n')
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": "Fine."}) for p in other_prompts(4)))
    ran = prt(
        "compare", "--model", str(tiny_gguf), "--data", str(data), "--out-dir", str(tmp_path), "--facts", str(facts)
    )
    assert_one_line_error(ran, "Each line needs prompt, lead, answer and kind")


def test_prt_compare_reports_the_three_models_on_the_same_held_out_prompts(tmp_path, tiny_gguf):
    data = tmp_path / "data.jsonl"
    lines = [{"prompt": p, "response": "Fine, thanks. And you?"} for p in other_prompts(12)]
    lines.append({"prompt": "Pick one.", "chosen": "This one.", "rejected": "That one."})
    data.write_text("\n".join(map(json.dumps, lines)))
    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        "\n".join(
            json.dumps({"prompt": f"Repeat after me: {word}", "lead": "You said", "answer": word, "kind": "echo"})
            for word in ("hello", "yes", "no")
        )
    )
    ran = prt(
        "compare",
        *("--model", str(tiny_gguf), "--ctx", "512", "--data", str(data), "--out-dir", str(tmp_path)),
        *("--facts", str(facts), "--train-examples", "8", "--finetune-epochs", "2", "--samples", "2", "--json"),
    )
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["train_examples"] == 8 and report["held_out_examples"] == 1  # 10% of 12 prompts, whole prompts
    assert report["skipped"]["by_reason"] == {"a preference pair: prt compare measures replies": 1}
    assert (tmp_path / "reward.onnx").is_file()
    nll = report["nll"]
    assert set(nll) == {"base", "steered", "torch_base", "finetuned"}
    assert nll["torch_base"] == pytest.approx(nll["base"], rel=5e-3)  # float32 weights: the copy agrees closely
    assert nll["finetuned"] < nll["base"] and report["finetune_held_out_nll"][0] == pytest.approx(
        nll["torch_base"], abs=1e-3
    )
    gain = nll["torch_base"] - nll["finetuned"]
    assert report["share_of_finetune_gain"] == pytest.approx((nll["base"] - nll["steered"]) / gain, rel=1e-3)
    parts = report["by_part"]
    assert sum(part["tokens"] for part in parts.values()) == report["held_out_tokens"]
    assert sum(part["tokens"] for part in report["by_base_rank"].values()) == report["held_out_tokens"]
    ceilings = report["top_k_ceiling"]
    assert list(ceilings) == ["40", "200", "1000"] and all(np.isfinite(list(ceilings.values())))
    knowledge = report["knowledge"]
    assert knowledge["asked"] == 3 and 0 <= knowledge["known"] <= 3
    samples = report["samples"]
    assert len(samples["prompts"]) == 1 and set(samples) == {"prompts", "data", "base", "steered", "finetuned"}
    assert samples["data"]["texts"] == ["Fine, thanks. And you?"]
    text = prt(
        "compare",
        *("--model", str(tiny_gguf), "--ctx", "512", "--data", str(data), "--out-dir", str(tmp_path)),
        *("--facts", str(facts), "--train-examples", "4", "--finetune-epochs", "1"),
    )
    assert text.returncode == 0, text.stderr
    assert "of the fine-tune's gain" in text.stdout and text.stdout.startswith("4 training examples, 1 held out")


def test_prt_eval_takes_the_same_sources_as_prt_tune(tmp_path, tiny_gguf):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "journal.md").write_text(
        "\n\n".join(f"Day {i}: I walked to the river and watched the boats. " * 6 for i in range(20))
    )
    out = tmp_path / "notes.onnx"
    tuned = prt(
        "tune",
        "--model",
        str(tiny_gguf),
        "--ctx",
        "512",
        "--documents",
        str(folder),
        "--out",
        str(out),
        "--epochs",
        "1",
    )
    assert tuned.returncode == 0, tuned.stderr
    evaluated = prt(
        "eval", "--model", str(tiny_gguf), "--ctx", "512", "--reward", str(out), "--documents", str(folder), "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["tokens"] > 0
    nothing = prt("eval", "--model", str(tiny_gguf), "--reward", str(out))
    assert_one_line_error(nothing, "No training data given")
