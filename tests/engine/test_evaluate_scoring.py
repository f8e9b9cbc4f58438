"""Scoring: RULER's metric on known outputs, teacher-forced greedy scoring, and teacher-forced
against real greedy generation on a tiny random transformers Llama with the Llama-3 vocabulary."""
import json

import numpy as np
import pytest

from engine.evaluate import (EvaluationError, ExampleResult, RecallSuite, answer_token_losses,
                             recall_cells, score_generation, score_teacher_forced)
from tests.engine.evaluate_helpers import LLAMA3_VOCAB, tiny_llama


def test_score_generation_grades_known_outputs():
    assert score_generation(" 4659959.", ["4659959"]).score == 1.0
    assert score_generation(" 4659958.", ["4659959"]).score == 0.0
    assert score_generation("", ["4659959"]).score == 0.0
    buried = "Sure! Having read the text, I believe the number is 4659959, as stated near the end."
    assert score_generation(buried, ["4659959"]).found == (True,)
    partial = score_generation(" 1803720, 9999999, 2454371 and then I forget.",
                               ["1803720", "1104705", "2454371", "6293017"])
    assert partial.found == (True, False, True, False) and partial.score == 0.5
    # RULER's match ignores case (variable names, UUIDs in capitals).
    assert score_generation("they are: qwert asdfg", ["QWERT", "ASDFG", "ZXCVB"]).score == pytest.approx(2 / 3)
    assert score_generation("A3F2-...", ["a3f2"]).score == 1.0


def test_score_teacher_forced_counts_a_value_only_after_a_correct_prefix(llama3):
    example = RecallSuite(llama3, seed=0).example("niah_multivalue", 1024, 0.5)
    answer = example.answer_ids
    assert example.answer_value_ends == (4, 9, 14, 19)  # " 3956160," = " ", "395", "616", "0"
    assert score_teacher_forced(example, answer).score == 1.0
    assert score_teacher_forced(example, answer).correct_prefix == len(answer)
    wrong = answer.copy()
    wrong[11] += 1  # inside the third value
    scored = score_teacher_forced(example, wrong)
    assert scored.found == (True, True, False, False) and scored.score == 0.5
    assert scored.correct_prefix == 11
    wrong = answer.copy()
    wrong[-1] += 1  # the final "." after the last value: every value is still produced
    assert score_teacher_forced(example, wrong).score == 1.0
    wrong = answer.copy()
    wrong[0] += 1
    assert score_teacher_forced(example, wrong).score == 0.0
    with pytest.raises(EvaluationError, match="3 predicted ids for an answer of 20 tokens"):
        score_teacher_forced(example, answer[:3])


def test_answer_token_losses_from_logits_and_log_probs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 11)) * 4 + 1000.0  # an offset that breaks a naive softmax
    answer = rng.integers(0, 11, 5)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(5), answer]
    np.testing.assert_allclose(answer_token_losses(answer, logits=logits), expected, rtol=1e-12)
    np.testing.assert_allclose(answer_token_losses(answer, log_probs=log_probs), expected, rtol=1e-12)
    with pytest.raises(EvaluationError, match="exactly one of"):
        answer_token_losses(answer)
    with pytest.raises(EvaluationError, match=r"scores of shape \(4, 11\) for 5 answer tokens"):
        answer_token_losses(answer, logits=logits[:4])


def test_recall_cells_average_per_task_length_and_depth():
    results = [ExampleResult("niah_single", 4096, 0.5, i, found) for i, found in
               enumerate([(True,), (False,), (True,)])]
    results += [ExampleResult("niah_multivalue", 4096, 0.0, 0, (True, False, False, False), 2.0),
                ExampleResult("niah_multivalue", 4096, 0.0, 1, (True, True, True, True), 4.0)]
    cells = recall_cells(results)
    assert [(c.task, c.length, c.depth, c.examples) for c in cells] == [
        ("niah_multivalue", 4096, 0.0, 2), ("niah_single", 4096, 0.5, 3)]
    assert cells[0].score == pytest.approx(0.625) and cells[0].answer_loss == pytest.approx(3.0)
    assert cells[1].score == pytest.approx(2 / 3) and cells[1].answer_loss is None


@pytest.fixture(scope="module")
def model():
    """fp64, so that no argmax of the one-pass forward and the KV-cached decoding can differ by
    rounding; one thread: these matrices are too small to gain from more on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_llama(LLAMA3_VOCAB, seed=0, dtype="float64")
    torch.set_num_threads(threads)


def _chunks_as_gold(tokenizer, answer, parts=3):
    """Gold values: the text of each of `parts` runs of answer tokens that decodes cleanly."""
    bounds = np.linspace(0, len(answer), parts + 1).astype(int)
    full = tokenizer.decode(answer)
    values = [tokenizer.decode(answer[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [v for v in values if v.strip() and "\ufffd" not in v and v in full]


def test_reference_teacher_forcing_matches_a_plain_forward(model, llama3):
    import torch

    from engine.evaluate.hf_model import teacher_forced_reference

    example = RecallSuite(llama3, seed=1).example("niah_multikey", 512, 0.3)
    output = teacher_forced_reference(model, example)
    tokens = np.concatenate([example.prompt_ids, example.answer_ids[:-1]]).astype(np.int64)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens)[None]).logits[0, -len(example.answer_ids):]
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(
        example.answer_ids.astype(np.int64)), reduction="none").numpy()
    np.testing.assert_array_equal(output.predicted_ids, logits.argmax(-1).numpy())
    np.testing.assert_allclose(output.token_losses, expected, rtol=1e-10)
    assert output.token_losses.mean() > 5  # a random model does not know the needle


def test_own_greedy_continuation_scores_one_and_a_changed_token_less(model, llama3):
    from engine.evaluate.hf_model import (evaluate_generation, greedy_generate,
                                          teacher_forced_reference)

    suite = RecallSuite(llama3, seed=2)
    checked = 0
    for task in ("niah_single", "variable_tracking", "json_kv"):
        example = suite.example(task, 512, 0.5)
        continuation = greedy_generate(model, [example.prompt_ids], 12)[0]
        assert len(continuation) == 12
        gold = _chunks_as_gold(llama3, continuation)
        if len(gold) < 2:
            continue
        own = example.with_answer(llama3, continuation, gold)
        output = teacher_forced_reference(model, own)
        np.testing.assert_array_equal(output.predicted_ids, continuation)
        assert output.score(own).score == 1.0
        assert evaluate_generation(model, llama3, [own], progress=False)[0].score == 1.0
        changed = continuation.copy()
        the, a = llama3.encode(" the the a")[1:]
        changed[-1] = the if changed[-1] != the else a
        changed_example = own.with_answer(llama3, changed, _chunks_as_gold(llama3, changed))
        scored = teacher_forced_reference(model, changed_example).score(changed_example)
        assert scored.score < 1.0 and scored.correct_prefix == 11
        checked += 1
    assert checked >= 2


def test_teacher_forced_never_finds_what_generation_misses(model, llama3):
    """Over many examples and answers (the suite's canonical answers, the model's own
    continuation, and that continuation with one token changed at each place), every gold value
    found teacher-forced is found by real greedy generation."""
    from engine.evaluate.hf_model import (evaluate_generation, evaluate_teacher_forced,
                                          greedy_generate)

    suite = RecallSuite(llama3, seed=4)
    base = [suite.example(task, 768, depth) for task in ("niah_single", "niah_multivalue",
                                                          "variable_tracking", "json_kv")
            for depth in (0.0, 0.6)]
    continuations = greedy_generate(model, [e.prompt_ids for e in base], 10)
    rng = np.random.default_rng(0)
    examples = list(base)
    for example, continuation in zip(base, continuations):
        for answer in [continuation] + [np.where(np.arange(10) == p, rng.integers(0, 128000),
                                                 continuation) for p in (2, 5, 8)]:
            gold = _chunks_as_gold(llama3, answer, parts=4)
            if gold:
                examples.append(example.with_answer(llama3, answer, gold))
    generated = evaluate_generation(model, llama3, examples, batch_size=8, progress=False)
    forced = evaluate_teacher_forced(model, examples, progress=False)
    found_both = found_only_by_generation = 0
    for example, g, f in zip(examples, generated, forced):
        for j, value in enumerate(example.gold):
            assert g.found[j] or not f.found[j], (example.task, value, g.output)
            found_both += g.found[j] and f.found[j]
            found_only_by_generation += g.found[j] and not f.found[j]
    assert len(examples) >= 30
    assert found_both > 30  # the subset relation is tested on values actually found
    assert found_only_by_generation > 0  # and teacher-forced is stricter, not equal by accident
    assert all(r.score == 0.0 for r in generated[:len(base)])  # random weights know no needle


def test_load_hf_model_takes_the_dtype_of_its_config(tmp_path):
    import torch

    from engine.evaluate.hf_model import load_hf_model

    folder = tmp_path / "hf"
    tiny_llama(vocab_size=512, dtype="bfloat16").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert (config.get("torch_dtype") or config.get("dtype")) == "bfloat16"
    model = load_hf_model(str(folder))
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert next(load_hf_model(str(folder), dtype="float32").parameters()).dtype == torch.float32
    with pytest.raises(EvaluationError, match="holds no config.json"):
        load_hf_model(str(tmp_path))


def test_generation_refuses_a_tokenizer_of_another_vocabulary(llama3):
    from engine.evaluate.hf_model import evaluate_generation

    small = tiny_llama(vocab_size=32000)
    example = RecallSuite(llama3).example("niah_single", 256, 0.5)
    with pytest.raises(EvaluationError, match="128,256 tokens .* a 32,000-token vocabulary"):
        evaluate_generation(small, llama3, [example], progress=False)


def test_suite_to_report_with_both_scoring_modes(model, llama3, tmp_path):
    """What the evaluation command does on a Hugging Face model, end to end on a tiny one."""
    import torch

    from engine.evaluate import (CheckpointReport, EvaluationReport, MeanLossAccumulator,
                                 PositionLossAccumulator, depth_sweep, write_report)
    from engine.evaluate.hf_model import evaluate_generation, evaluate_teacher_forced

    suite = RecallSuite(llama3, seed=0, vocab_size=model.config.vocab_size)
    examples = list(suite.examples(["niah_single", "variable_tracking"], lengths=(256, 512),
                                   depths=depth_sweep(2), per_cell=1))
    document = torch.from_numpy(suite.example("niah_single", 512, 0.5).prompt_ids.astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=document[None]).logits[0, :-1]
    token_losses = torch.nn.functional.cross_entropy(logits, document[1:], reduction="none").numpy()
    buckets = PositionLossAccumulator(512)
    buckets.add(token_losses)
    short = MeanLossAccumulator()
    short.add(token_losses[:100])
    checkpoints = []
    for scoring, results in (("teacher_forced", evaluate_teacher_forced(model, examples, progress=False)),
                             ("generation", evaluate_generation(model, llama3, examples, progress=False))):
        assert [(r.task, r.length, r.depth) for r in results] == [
            (e.task, e.length, e.depth) for e in examples]
        checkpoints.append(CheckpointReport(
            f"tiny ({scoring})", "tiny-random", scoring, llama3.describe(), suite.seed,
            suite.haystack.describe(), recall_cells(results), buckets.buckets(), short.result()))
    written = write_report(EvaluationReport(checkpoints), str(tmp_path))
    assert sorted(written) == ["loss_vs_position.png", "recall_heatmap_niah_single.png",
                               "recall_heatmap_variable_tracking.png", "recall_vs_length.png",
                               "report.json", "report.md"]
    data = json.loads(open(written["report.json"]).read())
    forced, generated = data["checkpoints"]
    assert forced["recall"]["average"] == 0.0 == generated["recall"]["average"]  # random weights
    assert all(c["answer_loss"] > 5 for c in forced["recall"]["cells"])
    assert forced["position_loss"][-1] == {"start": 256, "end": 512, "tokens": 255,
                                           "loss": pytest.approx(token_losses[256:].mean())}
    assert forced["haystack"]["kind"] == "noise" and forced["tokenizer"]["vocab_size"] == LLAMA3_VOCAB

