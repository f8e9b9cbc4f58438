"""RULER's protocol: each task's prompt against one written out by hand from RULER's published
templates (scripts/data/synthetic/constants.py and the task generators) for the same keys,
values and haystack; the length accounting (prompt without BOS + tokens_to_generate fits the
length, as RULER counts); the metrics; and the user-supplied haystack files."""
import json
import random
import re

import pytest

from engine.evaluate.errors import EvaluationError
from engine.evaluate.ruler import (NIAH_TASKS, RulerSources, build_ruler_example, niah_text,
                                   string_match_all, string_match_part, vt_text)

# RULER's published strings, written out here by hand (not imported from the module under test).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SINGLE_HEAD = ("A special magic number is hidden within the following text. Make sure to memorize "
               "it. I will quiz you about the number afterwards.\n")
SINGLE_TAIL = ("\nWhat is the special magic number for {key} mentioned in the provided text? The "
               "special magic number for {key} mentioned in the provided text is")
UUID_HEAD = ("A special magic uuid is hidden within the following text. Make sure to memorize "
             "it. I will quiz you about the uuid afterwards.\n")
UUID_TAIL = ("\nWhat is the special magic uuid for {key} mentioned in the provided text? The "
             "special magic uuid for {key} mentioned in the provided text is")
MANY_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to "
             "memorize it. I will quiz you about the numbers afterwards.\n")
VT_HEAD = ("Memorize and track the chain(s) of variable assignment hidden in the following "
           "text.\n\n")
VT_TAIL = ("\nQuestion: Find all variables that are assigned the value {value} in the text above."
           " Answer: According to the chain(s) of variable assignment in the text above, 5 "
           "variables are assigned the value {value}, they are: ")
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")


@pytest.fixture(scope="module")
def tokenizer():
    import os

    from data_tools.tokenizer import load_tokenizer
    from tests.engine.evaluate_helpers import llama3_tokenizer_dir

    return load_tokenizer(os.path.join(llama3_tokenizer_dir(), "tokenizer.model"))


def _sentences(text):
    return re.split(r"(?<=[.!?]) ", text)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ruler")
    essay = folder / "PaulGrahamEssays.json"
    essay.write_text(json.dumps({"text": "Startups  grow fast.\n\nMost fail early. Some do not!\n" * 300}))
    squad = folder / "squad.json"
    squad.write_text(json.dumps({"data": [{"paragraphs": [
        {"context": "Paris is in France.", "qas": [
            {"question": "Where is Paris?", "answers": [{"text": "France"}, {"text": "in France"}],
             "is_impossible": False},
            {"question": "Where is Atlantis?", "answers": [], "is_impossible": True}]},
        {"context": "Rome is in Italy.", "qas": []}]},
        {"paragraphs": [{"context": f"Filler paragraph {i}.", "qas": []} for i in range(400)]}]}))
    return RulerSources(essay_file=str(essay), squad_file=str(squad),
                        sentence_splitter=_sentences)


def test_niah_single_1_is_rulers_template_with_the_needle_on_its_own_line(sources):
    text, answers = niah_text(NIAH_TASKS["niah_single_1"], 7, random.Random(3), sources)
    key = re.search(r"for (\S+) mentioned", text).group(1)
    needle = f"One of the special magic numbers for {key} is: {answers[0]}."
    lines = text[len(SINGLE_HEAD):].split("\n")[:-1]
    at = lines.index(needle)
    expected = (SINGLE_HEAD + "\n".join([NOISE] * at + [needle] + [NOISE] * (7 - at))
                + SINGLE_TAIL.format(key=key))
    assert text == expected
    assert re.fullmatch(r"\d{7}", answers[0])


def test_needle_haystack_tasks_are_all_distractor_needles(sources):
    for task, kind in (("niah_multikey_2", "numbers"), ("niah_multikey_3", "uuids")):
        text, answers = niah_text(NIAH_TASKS[task], 9, random.Random(5), sources)
        head = SINGLE_HEAD if kind == "numbers" else UUID_HEAD
        tail = SINGLE_TAIL if kind == "numbers" else UUID_TAIL
        assert text.startswith(head)
        key = re.search(r"for (\S+) mentioned in the provided text\?", text).group(1)
        body = text[len(head):text.index(tail.format(key=key))]
        lines = body.split("\n")
        assert len(lines) == 10 and all(NEEDLE.fullmatch(line) for line in lines)
        assert {NEEDLE.fullmatch(line).group(1) for line in lines} == {kind}
        queried = [line for line in lines if f" for {key} is: " in line]
        assert queried == [f"One of the special magic {kind} for {key} is: {answers[0]}."]
        if task == "niah_multikey_3":
            uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
            assert re.fullmatch(uuid, key) and re.fullmatch(uuid, answers[0])
        assert text == head + body + tail.format(key=key)


def test_essay_haystack_puts_needles_between_sentences(sources):
    text, answers = niah_text(NIAH_TASKS["niah_multivalue"], 40, random.Random(1), sources)
    assert text.startswith(MANY_HEAD)
    assert "Startups grow fast. Most fail early." in text  # whitespace collapsed
    key = re.search(r"for (\S+) mentioned", text).group(1)
    context = text[len(MANY_HEAD):text.index("\nWhat are all the special magic numbers for")]
    needles = [f"One of the special magic numbers for {key} is: {value}." for value in answers]
    # Without the needles, the context is the first 40 essay words again, sentence by sentence.
    pieces = [p for p in re.split("|".join(map(re.escape, needles)), context)]
    words = " ".join(("Startups grow fast. Most fail early. Some do not! " * 10).split(" ")[:40])
    assert " ".join(p.strip() for p in pieces if p.strip()) == words
    assert len(answers) == 4 and all(n in context for n in needles)
    assert text.endswith(f"for {key} mentioned in the provided text? The special magic numbers "
                         f"for {key} mentioned in the provided text are")


def test_vt_lines_have_no_period_and_the_answer_prefix_a_trailing_space():
    text, names = vt_text(6, random.Random(2))
    value = re.search(r"VAR [A-Z]{5} = (\d{5})\n", text).group(1)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]} "
                                             for i in range(4)]
    lines = text[len(VT_HEAD):text.index("\nQuestion:")].split("\n")
    assert [line for line in lines if line != NOISE] == chain
    assert len(lines) == 11
    assert text == VT_HEAD + "\n".join(lines) + VT_TAIL.format(value=value)


def test_vt_prompt_starts_with_the_one_shot_example(tokenizer):
    example = build_ruler_example("vt", tokenizer, 4096, index=0, seed=1)
    shot, rest = example.input.split("\n" + VT_HEAD, 1)
    assert shot.startswith(VT_HEAD)
    # The example's answer: its five renamed 3-letter variables after "they are: ".
    assert re.search(r"they are:  [A-Z]{3}( [A-Z]{3}){4}$", shot)
    assert "12345" not in shot
    assert example.answer_prefix.endswith("they are: ")
    assert len(example.outputs) == 5


def test_qa_builds_rulers_document_blocks(tokenizer, sources):
    example = build_ruler_example("qa_1", tokenizer, 4096, index=0, seed=0, sources=sources)
    assert example.input.startswith(
        "Answer the question based on the given documents. Only give me the answer and do not "
        "output any other words.\n\nThe following are given documents.\n\nDocument 1:\n")
    assert example.input.endswith("\n\nQuestion: Where is Paris?")
    assert example.answer_prefix == " Answer:"
    assert "Paris is in France." in example.input and "Rome is in Italy." in example.input
    blocks = example.input.split("The following are given documents.\n\n")[1].split(
        "\n\nAnswer the question")[0].split("\n\n")
    assert [b.split(":\n")[0] for b in blocks] == [f"Document {i + 1}" for i in range(len(blocks))]
    assert example.outputs == ["France", "in France"] and example.metric == "string_match_part"


@pytest.mark.parametrize("task, budget", [
    ("niah_single_1", 128), ("niah_single_2", 128), ("niah_multikey_3", 128), ("vt", 30),
    ("fwe", 50), ("qa_1", 32)])
def test_prompt_plus_budget_fits_the_length_as_ruler_counts(tokenizer, sources, task, budget):
    example = build_ruler_example(task, tokenizer, 4096, index=1, seed=7, sources=sources)
    assert example.tokens_to_generate == budget
    assert example.prompt_tokens == len(tokenizer.encode(example.prompt))  # no BOS
    assert example.prompt_tokens + budget <= 4096
    if task in ("niah_single_1", "vt"):
        # The noise haystack fills the length up to one increment of lines (25 or 10).
        line = len(tokenizer.encode(NOISE + "\n"))
        assert example.counted_length > 4096 - 2 * 25 * line
    if task == "niah_single_1":
        assert not example.input.endswith(" ") and example.input.split("\n")[-2] in (NOISE,)


def test_metrics_are_rulers():
    assert string_match_all(["The numbers are 123 and 999"], [["123", "456"]]) == 50.0
    assert string_match_all(["ABC def"], [["abc", "DEF"]]) == 100.0
    assert string_match_part(["in FRANCE"], [["France", "Italy"]]) == 100.0
    assert string_match_part(["no"], [["France"]]) == 0.0


def test_bad_input_names_the_file_and_the_fix(tokenizer, tmp_path):
    with pytest.raises(EvaluationError, match="download_paulgraham_essay.py"):
        build_ruler_example("niah_single_2", tokenizer, 4096, sources=RulerSources())
    wrong = tmp_path / "essays.json"
    wrong.write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(EvaluationError, match=r"essays.json: expected RULER's PaulGrahamEssays"):
        build_ruler_example("niah_single_2", tokenizer, 4096,
                            sources=RulerSources(essay_file=str(wrong)))
    bad_squad = tmp_path / "squad.json"
    bad_squad.write_text(json.dumps({"data": [{"title": "x"}]}))
    with pytest.raises(EvaluationError, match="squad.json lacks SQuAD v2's fields"):
        build_ruler_example("qa_1", tokenizer, 4096, sources=RulerSources(squad_file=str(bad_squad)))
    with pytest.raises(EvaluationError, match="unknown RULER task 'niah_single'"):
        build_ruler_example("niah_single", tokenizer, 4096)
    with pytest.raises(EvaluationError, match="too short for RULER's niah_single_1.*at least"):
        build_ruler_example("niah_single_1", tokenizer, 300)


def test_chat_template_wraps_the_task_and_keeps_the_answer_prefix_in_the_reply(tokenizer):
    from engine.evaluate.ruler import chat_template_for, encode_prompt

    chat = chat_template_for(tokenizer)  # a Llama-3 tokenizer.model: Llama-3's header format
    example = build_ruler_example("niah_single_1", tokenizer, 4096, seed=3, chat=chat)
    head = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    tail = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert example.input.startswith(head + SINGLE_HEAD + NOISE + "\n")
    assert example.input.endswith(" mentioned in the provided text?" + tail)
    assert example.answer_prefix.startswith(" The special magic number for ")
    ids = encode_prompt(tokenizer, example.prompt)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.token_id("<|eot_id|>")) == 1
    assert example.prompt_tokens == len(ids) and example.counted_length <= 4096
    vt = build_ruler_example("vt", tokenizer, 4096, seed=3, chat=chat)
    assert vt.input.startswith(head + VT_HEAD)  # the one-shot example right after the header
    assert vt.input.count(VT_HEAD) == 2 and vt.input.endswith(tail)


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer):
    import os

    from data_tools.tokenizer import load_tokenizer
    from engine.evaluate.ruler import chat_template_for

    folder = load_tokenizer(os.path.dirname(tokenizer.path))  # tokenizer.json, no chat_template
    if folder.kind != "huggingface":
        pytest.skip("the folder loads as another kind of tokenizer")
    with pytest.raises(EvaluationError, match="has no chat template.*drop --chat-template"):
        chat_template_for(folder)


CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often.\n")
CWE_TAIL = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 "
            "words that appear most often in the list are:")


def test_cwe_is_one_solved_example_then_the_list(tokenizer, tmp_path):
    from collections import Counter

    short = [f"w{i}" for i in range(300)]
    long_words = tmp_path / "english_words.json"
    long_words.write_text(json.dumps({f"k{i}": f"word{i}" for i in range(5000)}))
    sources = RulerSources(short_words=short, words_file=str(long_words))
    example = build_ruler_example("cwe", tokenizer, 4096, index=0, seed=1, sources=sources)
    prompt = example.prompt
    shot, task = prompt.split("\n" + CWE_HEAD)
    assert shot.startswith(CWE_HEAD) and task.endswith(CWE_TAIL)
    shot_list, shot_answer = shot[len(CWE_HEAD):].split(CWE_TAIL + " ")
    shot_words = Counter(re.findall(r"\d+\. (\S+)", shot_list))
    assert sorted(shot_words.values()) == [3] * 30 + [10] * 10  # 40 words: 10 common x10
    assert re.findall(r"\d+\. (\S+)", shot_answer) and all(
        shot_words[w] == 10 for w in re.findall(r"\d+\. (\S+)", shot_answer))
    entries = re.findall(r"(\d+)\. (\S+)", task[:-len(CWE_TAIL)])
    assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(w for _, w in entries)
    assert {w for w, c in counts.items() if c == 30} == set(example.outputs)
    assert set(counts.values()) == {30, 3} and len(example.outputs) == 10
    assert example.tokens_to_generate == 120
    assert example.prompt_tokens == len(tokenizer.encode(prompt)) and example.counted_length <= 4096
    with pytest.raises(EvaluationError, match="english_words.json"):
        build_ruler_example("cwe", tokenizer, 4096, sources=RulerSources(short_words=short))


def test_key_pool_is_rulers_sorted_adjective_noun_set():
    """AdjectiveNounPairs indexes sorted(set(f"{a}-{n}")) without building it: checked in full on
    lists with RULER's hard cases (an adjective that extends another, "blue" and "blue-eyed";
    two pairs spelling one key, "a" + "b-c" and "a-b" + "c"; capitals; spaces; duplicates)."""
    from engine.evaluate.words import AdjectiveNounPairs

    adjectives = ["blue", "blue-eyed", "blue-eyedx", "a", "a-b", "Early", "ad hoc", "x",
                  "x-rated", "zesty", "blue", "bluer"]
    nouns = ["cat", "eyed-cat", "b-c", "c", "ATM", "contact lens", "zebra", "cat", "a"]
    expected = sorted({f"{a}-{n}" for a in adjectives for n in nouns})
    pool = AdjectiveNounPairs(adjectives, nouns)
    assert len(pool) == len(expected)
    assert [pool[i] for i in range(len(pool))] == expected
    assert pool[-1] == expected[-1]
    with pytest.raises(IndexError):
        pool[len(expected)]
    # random.choice draws what RULER's random.choice(words) draws from the same state.
    ours, rulers = random.Random(11), random.Random(11)
    assert [ours.choice(pool) for _ in range(50)] == [rulers.choice(expected) for _ in range(50)]


def test_niah_keys_come_from_wonderwords_lists_as_ruler_draws_them():
    from importlib.resources import files

    from engine.evaluate.ruler import RulerSources

    pool = RulerSources().key_words()
    # RULER's pool from wonderwords 2.x's lists (910 adjectives x 6,786 nouns, deduplicated),
    # as RULER builds it: measured once with sorted(set(...)) over the whole product.
    assert len(pool) == 6_175_260
    # Read as wonderwords reads them (each line right-stripped: "blue-eyed " is "blue-eyed").
    adjectives, nouns = ([line.rstrip() for line in (files("wonderwords.assets") / name)
                          .read_text().splitlines()] for name in ("adjectivelist.txt",
                                                                  "nounlist.txt"))
    adjective_set, noun_set = set(adjectives), set(nouns)

    def is_pair(key: str) -> bool:  # "a-n" for some adjective a and noun n (either may hold "-")
        return any(key[:k] in adjective_set and key[k + 1:] in noun_set
                   for k, char in enumerate(key) if char == "-")

    # Strictly increasing, every element a pair, and as many as the set holds: the sorted set.
    # Sampled here (the whole pool takes a minute); the full check runs on the hard cases above.
    rng = random.Random(0)
    sample = sorted({0, len(pool) - 2, *(rng.randrange(len(pool) - 1) for _ in range(3000))})
    for i in sample:
        assert pool[i] < pool[i + 1] and is_pair(pool[i]) and is_pair(pool[i + 1]), i
    # Increasing across the whole pool too, not only within one adjective's block.
    values = [pool[i] for i in sample]
    assert values == sorted(values)
    text, _ = niah_text(NIAH_TASKS["niah_single_1"], 3, random.Random(2),
                        RulerSources(key_words=["only-key"]))
    assert "for only-key mentioned" in text
