"""The recall suite's generators with the real Llama-3 tokenizer: exact lengths, depths, seeds,
values absent from the haystack, the user's documents as haystacks, and bad input."""
import os
import re
import time

import numpy as np
import pytest

from data_tools.indexed import IndexedWriter
from data_tools.preprocess import PreprocessOptions, preprocess
from data_tools.tokenizer import load_tokenizer
from engine.evaluate import (TASKS, DocumentHaystack, EvaluationError, NoiseHaystack, RecallSuite,
                             check_tokenizer_vocabulary, depth_sweep, load_haystack)
from tests.engine.evaluate_helpers import LLAMA3_VOCAB, llama3_tokenizer_dir

SAMPLE_DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "data_tools", "sample",
                           "docs.jsonl.gz")
NEEDLE = re.compile(r"^One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.$")
CHAIN = re.compile(r"^VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d{5}))\.$")
RECORD = re.compile(r'^"([0-9a-f-]{36})": "([0-9a-f-]{36})"[,}]$')
ANSWER_PREFIX = {"niah_single": "mentioned in the provided text is",
                 "niah_multikey": "mentioned in the provided text is",
                 "niah_multivalue": "mentioned in the provided text are",
                 "niah_multiquery": "mentioned in the provided text are",
                 "json_kv": "Corresponding value:", "variable_tracking": "they are:"}


def depth_error_tokens(example):
    """|haystack tokens before the first needle - depth x haystack tokens|, from the spans."""
    start, end = example.context_span
    needles = example.needle_spans
    anchor = needles[0][0]
    haystack = end - start - sum(b - a for a, b in needles)
    before = anchor - start - sum(b - a for a, b in needles if a < anchor)
    return abs(before - example.depth * haystack)


def needle_texts(tokenizer, example):
    return [tokenizer.decode(example.prompt_ids[a:b]).strip() for a, b in example.needle_spans]


def check_example(tokenizer, example):
    """Everything an example promises, checked from its token ids and spans alone."""
    task, length = example.task, example.length
    assert example.prompt_ids.dtype == np.int32 and example.answer_ids.dtype == np.int32
    assert len(example.prompt_ids) == length
    assert example.prompt_ids[0] == tokenizer.bos_id
    assert tokenizer.bos_id not in example.prompt_ids[1:].tolist()
    prompt_text = tokenizer.decode(example.prompt_ids)
    assert prompt_text.endswith(ANSWER_PREFIX[task])
    # The canonical answer holds every gold value, each exactly from answer_value_ends on.
    answer = tokenizer.decode(example.answer_ids)
    for value, end in zip(example.gold, example.answer_value_ends):
        assert value in tokenizer.decode(example.answer_ids[:end])
        assert value not in tokenizer.decode(example.answer_ids[:end - 1])
    assert all(value in answer for value in example.gold)
    # The needles are where the spans say, and the one placed at depth is the queried one.
    texts = needle_texts(tokenizer, example)
    context = tokenizer.decode(example.prompt_ids[slice(*example.context_span)])
    if task == "json_kv":
        (key, value), = [RECORD.match(t).groups() for t in texts]
        assert example.gold == (value,) and prompt_text.endswith(f'Key: "{key}"\n' + ANSWER_PREFIX[task])
        assert context.count(key) == 1 and context.count(value) == 1
        return
    if task == "variable_tracking":
        chain = [CHAIN.match(t).groups() for t in texts]
        assert [c[0] for c in chain] == list(example.gold)  # in chain order, first at depth
        number = chain[0][2]
        assert [c[1] for c in chain[1:]] == list(example.gold[:-1])
        assert f"assigned the value {number}, they are:" in prompt_text[-200:]
        assert context.count(number) == 1
        assert [context.count(v) for v in example.gold] == [2, 2, 2, 2, 1]
        return
    needles = [NEEDLE.match(t).groups() for t in texts]
    question = prompt_text[prompt_text.rindex("\nWhat"):]
    anchor_key, anchor_value = needles[0]
    assert anchor_key in question and anchor_value in example.gold
    if task == "niah_multivalue":  # the values of the one key, in the order the text has them
        in_text = sorted(zip(example.needle_positions, (v for _, v in needles)))
        assert example.gold == tuple(v for _, v in in_text)
    else:  # the first queried key's value is the needle at depth
        assert anchor_value == example.gold[0]
    assert len(needles) == {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4,
                            "niah_multiquery": 4}[task]
    for key, value in needles:
        assert context.count(value) == 1  # the value occurs only in its needle
        assert context.count(key) == sum(k == key for k, _ in needles)
    queried_values = {v for k, v in needles if k in question}
    assert set(example.gold) == queried_values


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_the_exact_length_and_the_needle_at_its_depth(llama3, task):
    suite = RecallSuite(llama3, seed=0, vocab_size=LLAMA3_VOCAB)
    for length in (1024, 4096, 32768):
        for depth in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
            example = suite.example(task, length, depth)
            check_example(llama3, example)
            bound = 40 if task == "json_kv" and length < 4096 else 0.01 * length
            assert depth_error_tokens(example) <= bound, (task, length, depth)


def test_noise_prompts_are_the_tokenizers_own_encoding_with_needles_at_boundaries(llama3):
    suite = RecallSuite(llama3, seed=3)
    for task in TASKS:
        for length in (1000, 1024, 1500):
            for depth in depth_sweep(6):
                example = suite.example(task, length, depth)
                ids = example.prompt_ids[1:].tolist()
                assert llama3.encode(llama3.decode(ids)) == ids, (task, length, depth)
                if task == "json_kv":
                    continue
                for start, end in example.needle_spans:
                    before = llama3.decode(example.prompt_ids[start - 1:start])
                    needle = llama3.decode(example.prompt_ids[start:end])
                    # After a line end as a line of its own, or after a sentence end after a space.
                    assert (before.endswith("\n") and needle.endswith("\n")
                            or before.endswith(".") and needle.startswith(" ")), (before, needle)


def test_512k_prompts_are_exact_and_fast(llama3):
    suite = RecallSuite(llama3, seed=0)
    started = time.perf_counter()
    for task in TASKS:
        example = suite.example(task, 524288, 0.5)
        assert len(example.prompt_ids) == 524288
        assert depth_error_tokens(example) <= 0.01 * 524288
    elapsed = time.perf_counter() - started
    assert elapsed < 20, f"six 512K prompts took {elapsed:.1f} s"
    check_example(llama3, example)


def _fields(example):
    return (example.task, example.length, example.depth, example.index, example.prompt_ids.tobytes(),
            example.answer_ids.tobytes(), example.gold, example.answer_value_ends,
            example.needle_spans, example.context_span)


def test_same_seed_gives_bitwise_the_same_examples_in_any_order(llama3):
    cells = dict(tasks=TASKS, lengths=(1024, 2048), depths=depth_sweep(3), per_cell=2)
    first = [_fields(e) for e in RecallSuite(llama3, seed=7).examples(**cells)]
    again = RecallSuite(llama3, seed=7)
    alone = [_fields(again.example(*f[:4])) for f in reversed(first)][::-1]
    assert alone == first
    other = list(RecallSuite(llama3, seed=8).examples(**cells))
    assert len(first) == len(other) == 6 * 2 * 3 * 2
    for mine, theirs in zip(first, other):
        assert mine[4] != theirs.prompt_ids.tobytes() and mine[6] != theirs.gold
    # Two examples of one cell differ too.
    assert first[0][4] != first[1][4] and first[0][6] != first[1][6]


def test_hugging_face_tokenizer_json_gives_the_same_examples(llama3):
    hf = load_tokenizer(llama3_tokenizer_dir())  # tokenizer.json: 128,257 tokens with <|image|>
    assert hf.kind == "huggingface" and hf.vocab_size == LLAMA3_VOCAB + 1
    ours = RecallSuite(llama3, seed=1, vocab_size=LLAMA3_VOCAB)
    theirs = RecallSuite(hf, seed=1, vocab_size=LLAMA3_VOCAB)
    for task in TASKS:
        assert _fields(ours.example(task, 2048, 0.4)) == _fields(theirs.example(task, 2048, 0.4))


def test_sentencepiece_tokenizer(tmp_path, llama3):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    lines = [llama3.decode(RecallSuite(llama3, seed=s).example(t, 1024, 0.5).prompt_ids[1:])
             for s in range(3) for t in TASKS]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, byte_fallback=True, minloglevel=2)
    sp = load_tokenizer(str(tmp_path / "sp.model"))
    assert sp.kind == "sentencepiece"
    suite = RecallSuite(sp, seed=0, vocab_size=sp.vocab_size)
    for task in TASKS:
        example = suite.example(task, 2048, 0.3)
        assert len(example.prompt_ids) == 2048 and example.prompt_ids[0] == sp.bos_id
        assert all(v in sp.decode(example.answer_ids) for v in example.gold)
        bound = 0.01 * 2048 if task != "json_kv" else 60  # records are longer in a 400-token vocabulary
        assert depth_error_tokens(example) <= bound


def test_needle_values_found_in_the_haystack_are_drawn_again(llama3, tmp_path):
    """The same seed, task, length, depth and index draw the same first values whatever the
    haystack; a haystack that holds them must make the generator draw others."""
    for task in ("niah_single", "niah_multikey", "variable_tracking"):
        noise = RecallSuite(llama3, seed=5).example(task, 4096, 0.5)
        first_draw = list(noise.gold)
        if task == "niah_multikey":
            first_draw.append(NEEDLE.match(needle_texts(llama3, noise)[0]).group(1))  # its key
        folder = tmp_path / task
        folder.mkdir()
        sentence = " ".join(f"The code {value} appears here." for value in first_draw)
        for i in range(4):
            (folder / f"doc{i}.txt").write_text((sentence + "\n") * 120, encoding="utf-8")
        haystack = load_haystack(str(folder), llama3)
        assert isinstance(haystack, DocumentHaystack) and haystack.kind == "text"
        example = RecallSuite(llama3, haystack, seed=5).example(task, 4096, 0.5)
        check_example(llama3, example)
        context = llama3.decode(example.prompt_ids[slice(*example.context_span)])
        assert all(context.count(v) == (2 if task == "variable_tracking" and v != example.gold[-1]
                                         else 1) for v in example.gold)
        assert not set(first_draw) & set(example.gold), (first_draw, example.gold)


@pytest.fixture(scope="module")
def sample_docs_dataset(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("evaluate_docs") / "docs")
    model = os.path.join(llama3_tokenizer_dir(), "tokenizer.model")
    preprocess([SAMPLE_DOCS], prefix, model, PreprocessOptions(progress=False))
    return prefix


def test_indexed_dataset_haystack_uses_its_token_ids(llama3, sample_docs_dataset):
    from data_tools.indexed import IndexedReader

    haystack = load_haystack(sample_docs_dataset, llama3)
    assert haystack.kind == "indexed" and haystack.describe()["documents"] == 79
    stream = np.asarray(IndexedReader(sample_docs_dataset).tokens, dtype=np.int64)
    suite = RecallSuite(llama3, haystack, seed=2, vocab_size=LLAMA3_VOCAB)
    for task in TASKS:
        for depth in (0.25, 0.75):
            example = suite.example(task, 8192, depth)
            check_example(llama3, example)
            assert depth_error_tokens(example) <= 0.01 * 8192
            if task == "json_kv":
                continue
            # The context's first stretch (a document's start) is the dataset's own ids.
            first_needle = min(example.needle_positions)
            start = example.context_span[0]
            piece = example.prompt_ids[start:min(first_needle, start + 16)].astype(np.int64)
            assert len(piece) == 16 or depth < 0.5
            windows = np.lib.stride_tricks.sliding_window_view(stream, len(piece))
            assert (windows == piece).all(axis=1).any()
            assert llama3.eos_id not in example.prompt_ids.tolist()


def test_haystack_too_small_unknown_task_and_bad_arguments(llama3, tmp_path):
    (tmp_path / "a.txt").write_text("A short document. It has two sentences.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Another one.\n", encoding="utf-8")
    small = RecallSuite(llama3, load_haystack(str(tmp_path), llama3))
    with pytest.raises(EvaluationError, match=r"holds \d+ tokens in 2 documents, but "
                                              r"niah_single at length 4096 needs 4,0\d\d haystack"):
        small.example("niah_single", 4096, 0.5)
    suite = RecallSuite(llama3)
    with pytest.raises(EvaluationError, match="unknown task 'niah_singel'; choose from niah_single"):
        suite.example("niah_singel", 4096, 0.5)
    with pytest.raises(EvaluationError, match="unknown task 'ruler'"):
        next(suite.examples(["niah_single", "ruler"]))
    with pytest.raises(EvaluationError, match="length 96 is too short for niah_multivalue"):
        suite.example("niah_multivalue", 96, 0.5)
    with pytest.raises(EvaluationError, match="length 64 is too short for json_kv"):
        suite.example("json_kv", 64, 0.5)
    with pytest.raises(EvaluationError, match=r"depth 1\.5 for niah_single"):
        suite.example("niah_single", 4096, 1.5)
    with pytest.raises(EvaluationError, match="haystack 'no/such/folder' does not exist"):
        load_haystack("no/such/folder", llama3)
    with pytest.raises(EvaluationError, match="another tokenizer object"):
        RecallSuite(load_tokenizer(llama3.path), NoiseHaystack(llama3))


def test_tokenizer_that_does_not_match_the_vocabulary(llama3, sample_docs_dataset, tmp_path):
    check_tokenizer_vocabulary(llama3, LLAMA3_VOCAB)
    check_tokenizer_vocabulary(llama3, LLAMA3_VOCAB + 128)  # a vocabulary padded for TP
    with pytest.raises(EvaluationError, match=r"has 128,256 tokens .* a 32,000-token vocabulary"):
        check_tokenizer_vocabulary(llama3, 32000)
    with pytest.raises(EvaluationError, match="32,000-token vocabulary"):
        RecallSuite(llama3, vocab_size=32000)
    # An indexed dataset made with another tokenizer (its summary says so) ...
    prefix = str(tmp_path / "other")
    for suffix in (".bin", ".idx"):
        with open(sample_docs_dataset + suffix, "rb") as f, open(prefix + suffix, "wb") as g:
            g.write(f.read())
    with open(prefix + ".summary.json", "w") as f:
        f.write('{"tokenizer": {"path": "llama2/tokenizer.model", "vocab_size": 32000}}')
    with pytest.raises(EvaluationError, match=r"tokenized with 'llama2/tokenizer.model' "
                                              r"\(32,000 tokens.*has 128,256"):
        load_haystack(prefix, llama3)
    # ... or holding ids beyond the vocabulary, without a summary.
    bad = str(tmp_path / "bad")
    with IndexedWriter(bad) as writer:
        writer.add_documents(np.full(9000, 200_000, dtype=np.int32), np.array([9000]))
    with pytest.raises(EvaluationError, match="token id 200000, outside the tokenizer's "
                                              "128,256-token vocabulary"):
        RecallSuite(llama3, load_haystack(bad, llama3)).example("niah_single", 4096, 0.5)
