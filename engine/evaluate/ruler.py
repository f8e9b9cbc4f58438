"""RULER's protocol (NVIDIA, arXiv 2404.06654): its tasks under their own names, built as RULER's
`scripts/data/synthetic/` builds them, so that scores can be put beside published RULER tables.

    sources = RulerSources(essay_file="PaulGrahamEssays.json", squad_file="squad.json")
    example = build_ruler_example("niah_single_2", tokenizer, length=32768, index=0, seed=42,
                                  sources=sources)
    example.prompt            # the text fed to the model: input + answer prefix
    ruler_score(example.task, [generated_text], [example.outputs])

What matches RULER (read side by side with its generators):
- Templates: each task family's template and answer prefix, concatenated (the prompt ends with
  the answer prefix); the singular wording of one-needle-one-value tasks is derived from the
  plural template by RULER's own word replacements ("Some" -> "A", "are" -> "is", ...).
- Haystacks. "noise": the five-sentence line "The grass is green. ... There and back again."
  repeated, one copy a line, each needle (or variable assignment) inserted as a line of its own,
  lines joined by newlines. "essay": the words of Paul Graham's essays (RULER's download, a JSON
  object {"text": ...}; whitespace collapsed to single spaces) cut to N words, split into
  sentences by NLTK's `sent_tokenize`, needles inserted between sentences at depths drawn from
  RULER's 40 depths, everything joined by spaces. "needle": N distractor needles with random
  keys and values of the task's types, one a line.
- Needles: "One of the special magic {numbers|uuids} for {key} is: {value}."; keys are
  adjective-noun words or UUIDs, values 7-digit numbers or UUIDs.
- vt: one chain of 4 hops over 5-letter variables, "VAR X = 12345" then "VAR Y = VAR X " (a
  trailing space, no period), each its own line in the noise haystack, after a one-shot example
  (built at 500 tokens with 3-letter variables and value 12345, then renamed and revalued as
  RULER's randomize_icl does) and a newline.
- cwe: a numbered list where 10 common words appear 30 times and the others 3 (6 and 1 below
  4096 tokens), after one solved example of 40 words (20 below 4096); words from wonderwords'
  lists, and from RULER's english_words.json when more are needed (both user-supplied).
- fwe: coded 6-letter words drawn with Zipf (alpha 2) counts, the most frequent replaced by
  "...", the answer the next three. qa_1/qa_2: SQuAD v2 (answerable questions) / HotpotQA
  (distractor dev set) documents as "Document i:\\n..." blocks joined by blank lines, the gold
  documents first, then the article's other paragraphs (SQuAD), then random others, shuffled.
- Length accounting: the prompt's tokens (no BOS, as RULER's `text_to_tokens` counts) plus the
  task's `tokens_to_generate` (niah 128, vt 30, fwe 50, qa 32) fit `length`. The haystack size
  is found as RULER finds it: a binary search on one draw, then, per example, lowered by RULER's
  increment until that example fits.
- Metric: string_match_all (the fraction of gold strings found, case-insensitive, in the
  prediction) for niah/vt/fwe; string_match_part (any gold string) for qa; x 100.

What differs: random draws come from Python's `random` seeded per (seed, task, length, index),
not from RULER's one global stream, so the same seed does not give RULER's exact samples (their
distribution is the same). The key words are RULER's: its sorted adjective-noun pool of the
wonderwords package's lists, drawn with ``random.choice`` as RULER draws them.
"""
from __future__ import annotations

import importlib.resources
import json
import math
import os
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from data_tools.tokenizer import TextTokenizer
from engine.evaluate.errors import EvaluationError
from engine.evaluate.words import AdjectiveNounPairs

# Task families: template, answer prefix, tokens to generate (RULER's constants).
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are "
    "all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = (" The special magic {type_needle_v} for {query} mentioned in the provided "
                      "text are")
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
    "above.")
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text "
                    "above, {num_v} variables are assigned the value {query}, they are: ")
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?")
FWE_ANSWER_PREFIX = (" Answer: According to the coded text above, the three most frequently "
                     "appeared words are:")
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the "
    "question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nQuestion: {query}")
QA_ANSWER_PREFIX = " Answer:"
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most "
    "common words in the above list?")
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
CWE_COMMON = 10
QA_DOCUMENT = "Document {i}:\n{document}"

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE_LINE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
              "back again.")
TOKENS_TO_GENERATE = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                      "freq_words_extraction": 50, "qa": 32}
# RULER's 40 insertion depths for the essay haystack, in percent: round(linspace(0, 100, 40)).
ESSAY_DEPTHS = [int(round(100 * i / 39)) for i in range(40)]


@dataclass(frozen=True)
class NiahShape:
    haystack: str       # noise | essay | needle
    key_type: str       # words | uuids
    value_type: str     # numbers | uuids
    keys: int = 1
    values: int = 1
    queries: int = 1


# RULER's synthetic.yaml, task by task.
NIAH_TASKS = {
    "niah_single_1": NiahShape("noise", "words", "numbers"),
    "niah_single_2": NiahShape("essay", "words", "numbers"),
    "niah_single_3": NiahShape("essay", "words", "uuids"),
    "niah_multikey_1": NiahShape("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NiahShape("needle", "words", "numbers"),
    "niah_multikey_3": NiahShape("needle", "uuids", "uuids"),
    "niah_multivalue": NiahShape("essay", "words", "numbers", values=4),
    "niah_multiquery": NiahShape("essay", "words", "numbers", keys=4, queries=4),
}
FAMILY = {**{name: "niah" for name in NIAH_TASKS}, "vt": "variable_tracking",
          "cwe": "common_words_extraction", "fwe": "freq_words_extraction", "qa_1": "qa", "qa_2": "qa"}
RULER_TASKS = tuple(FAMILY)
VT_HOPS = 4
FWE_ALPHA = 2.0
# Riemann zeta(2) = pi^2 / 6 (RULER: scipy.special.zeta(2.0), the same double).
ZETA_OF_ALPHA = math.pi ** 2 / 6
FWE_WORD_LENGTH = 6

ESSAY_HELP = ("RULER's essay haystack: run RULER's scripts/data/synthetic/json/"
              "download_paulgraham_essay.py, which writes PaulGrahamEssays.json, and pass it "
              "with --ruler-essays")
SQUAD_HELP = ("SQuAD v2 dev set (https://rajpurkar.github.io/SQuAD-explorer/dataset/"
              "dev-v2.0.json, RULER's squad.json), passed with --ruler-squad")
HOTPOT_HELP = ("HotpotQA distractor dev set (http://curtis.ml.cmu.edu/datasets/hotpot/"
               "hotpot_dev_distractor_v1.json, RULER's hotpotqa.json), passed with --ruler-hotpotqa")
WORDS_HELP = ("cwe draws words as RULER does: wonderwords' noun, adjective and verb lists (pip "
              "install wonderwords) and, for long prompts, RULER's scripts/data/synthetic/json/"
              "english_words.json, passed with --ruler-words")
NLTK_HELP = ("the essay haystack is split into sentences by NLTK's sent_tokenize, as RULER does: "
             "pip install nltk and download its punkt_tab data beforehand (python -m "
             "nltk.downloader punkt_tab; offline: copy nltk_data and set NLTK_DATA)")


@dataclass
class RulerExample:
    task: str
    length: int
    index: int
    input: str                  # the prompt before the answer prefix
    answer_prefix: str
    outputs: list[str]          # gold strings
    tokens_to_generate: int
    prompt_tokens: int          # tokens of input + answer_prefix, no BOS (RULER's count)
    haystack_size: int          # noise lines, essay words, needles, coded words or documents
    metric: str = field(default="string_match_all")

    @property
    def prompt(self) -> str:
        """What the model is given: RULER feeds input + answer_prefix."""
        return self.input + self.answer_prefix

    @property
    def counted_length(self) -> int:
        """RULER's `length`: the prompt's tokens plus the generation budget (<= `length`)."""
        return self.prompt_tokens + self.tokens_to_generate


LLAMA3_CHAT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
_SENTINEL = "\u2063TASK\u2063"
_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template as RULER applies one: the text before the task's template and after it
    (the answer prefix follows, in the assistant's turn)."""
    before: str
    after: str
    source: str

    def wrap(self, text: str, answer_prefix: str) -> str:
        cut = text.rfind(answer_prefix[:10])
        return self.before + text[:cut] + self.after + text[cut:]


def chat_template_for(tokenizer: TextTokenizer) -> ChatTemplate:
    """The tokenizer's own chat template for one user turn and the assistant's reply: the
    `chat_template` of its tokenizer_config.json (rendered by transformers), or, for a Llama-3
    tokenizer.model, Llama-3's header format (RULER's meta-llama3 template)."""
    path = tokenizer.path
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    if config.get("chat_template") and (os.path.isdir(path) or tokenizer.kind == "huggingface"):
        from transformers import AutoTokenizer

        rendered = AutoTokenizer.from_pretrained(folder).apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True)
        before, _, after = rendered.partition(_SENTINEL)
        return ChatTemplate(before, after, config_path)
    if tokenizer.kind == "tiktoken":
        try:
            for special in _SPECIAL.findall("".join(LLAMA3_CHAT)):
                tokenizer.token_id(special)
        except (KeyError, ValueError):
            pass
        else:
            return ChatTemplate(*LLAMA3_CHAT, "Llama-3 header format")
    raise EvaluationError(
        f"tokenizer {path} has no chat template (no chat_template in {config_path}, and it is "
        f"not a Llama-3 tokenizer.model); drop --chat-template for a base model, or pass the "
        f"instruct model's tokenizer folder")


def encode_prompt(tokenizer: TextTokenizer, text: str) -> list[int]:
    """Token ids of a prompt whose chat markers ("<|eot_id|>", ...) are one special token each,
    as Hugging Face tokenizers read them; the text between them is encoded as plain text."""
    ids: list[int] = []
    cursor = 0
    for match in _SPECIAL.finditer(text):
        try:
            special = tokenizer.token_id(match.group(0))
        except (KeyError, ValueError):
            continue
        ids += tokenizer.encode(text[cursor:match.start()]) + [special]
        cursor = match.end()
    return ids + tokenizer.encode(text[cursor:])


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's metric: per example the fraction of gold strings in the prediction
    (case-insensitive), averaged, x 100, rounded to 2 places."""
    scores = [sum(r.lower() in p.lower() for r in refs) / len(refs)
              for p, refs in zip(predictions, references)]
    return round(100 * sum(scores) / len(scores), 2)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's QA metric: 1 when any gold string is in the prediction (case-insensitive)."""
    scores = [max(float(r.lower() in p.lower()) for r in refs)
              for p, refs in zip(predictions, references)]
    return round(100 * sum(scores) / len(scores), 2)


def example_score(metric: str, prediction: str, references: Sequence[str]) -> float:
    """One example's score in [0, 1] under RULER's metric."""
    return (string_match_part if metric == "string_match_part" else string_match_all)(
        [prediction], [references]) / 100


def clean_prediction(text: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def _wonderwords_list(name: str) -> list[str]:
    """One of the wonderwords package's word lists, a word a line, as RULER reads it."""
    try:
        text = (importlib.resources.files("wonderwords.assets") / name).read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        raise EvaluationError(f"wonderwords' {name} is not installed: RULER draws its needle keys "
                              f"and cwe's words from wonderwords' lists; pip install "
                              f"'wonderwords>=2.2,<3'") from None
    return [line.rstrip() for line in text.splitlines(keepends=True)]


class RulerSources:
    """The haystacks RULER downloads and we cannot ship, read from the user's files on first use."""

    def __init__(self, essay_file: Optional[str] = None, squad_file: Optional[str] = None,
                 hotpotqa_file: Optional[str] = None,
                 sentence_splitter: Optional[Callable[[str], list[str]]] = None,
                 words_file: Optional[str] = None,
                 short_words: Optional[list[str]] = None,
                 key_words: Optional[Sequence[str]] = None):
        self.essay_file, self.squad_file, self.hotpotqa_file = essay_file, squad_file, hotpotqa_file
        self.words_file = words_file
        self._short_words = short_words
        self._key_words = key_words
        self._long_words: Optional[list[str]] = None
        self._splitter = sentence_splitter
        self._essay: Optional[list[str]] = None
        self._qa: dict[str, tuple[list[dict], list[str]]] = {}

    def essay_words(self) -> list[str]:
        if self._essay is None:
            data = _read_json(self.essay_file, "essay", ESSAY_HELP)
            if not isinstance(data, dict) or not isinstance(data.get("text"), str):
                raise EvaluationError(f"essay file {self.essay_file}: expected RULER's "
                                      f"PaulGrahamEssays.json, a JSON object {{\"text\": ...}}; "
                                      f"get it with {ESSAY_HELP}")
            self._essay = re.sub(r"\s+", " ", data["text"]).split(" ")
        return self._essay

    def split_sentences(self, text: str) -> list[str]:
        if self._splitter is None:
            try:
                from nltk.tokenize import sent_tokenize
            except ImportError:
                raise EvaluationError(f"nltk is not installed: {NLTK_HELP}") from None
            self._splitter = sent_tokenize
        try:
            return self._splitter(text)
        except LookupError:
            raise EvaluationError(f"NLTK's punkt_tab data is missing: {NLTK_HELP}") from None

    def key_words(self) -> Sequence[str]:
        """RULER's needle keys: every "adjective-noun" of wonderwords' adjective and noun lists,
        deduplicated and sorted (engine.evaluate.words.AdjectiveNounPairs)."""
        if self._key_words is None:
            self._key_words = AdjectiveNounPairs(_wonderwords_list("adjectivelist.txt"),
                                                 _wonderwords_list("nounlist.txt"))
        return self._key_words

    def short_words(self) -> list[str]:
        """wonderwords' nouns + adjectives + verbs, deduplicated and sorted (RULER's `words`)."""
        if self._short_words is None:
            words = []
            for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"):
                words += _wonderwords_list(name)
            self._short_words = sorted(set(words))
        return self._short_words

    def long_words(self) -> list[str]:
        """RULER's english_words.json: a JSON object whose values are the words."""
        if self._long_words is None:
            data = _read_json(self.words_file, "english words", WORDS_HELP)
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise EvaluationError(f"english words file {self.words_file}: expected RULER's "
                                      f"english_words.json, a JSON object of words; "
                                      f"{WORDS_HELP}")
            self._long_words = list(data.values())
        return self._long_words

    def qa(self, dataset: str) -> tuple[list[dict], list[str]]:
        """(questions, documents) as RULER's read_squad / read_hotpotqa give them."""
        if dataset not in self._qa:
            if dataset == "squad":
                self._qa[dataset] = _read_squad(self.squad_file)
            else:
                self._qa[dataset] = _read_hotpotqa(self.hotpotqa_file)
        return self._qa[dataset]


def _read_json(path: Optional[str], what: str, help_text: str):
    if not path:
        raise EvaluationError(f"no {what} file given: {help_text}")
    if not os.path.isfile(path):
        raise EvaluationError(f"{what} file {path} does not exist: {help_text}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvaluationError(f"{what} file {path} is not JSON ({error}); expected {help_text}"
                              ) from None


def _read_squad(path: Optional[str]) -> tuple[list[dict], list[str]]:
    data = _read_json(path, "SQuAD", SQUAD_HELP)
    try:
        documents = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        number = {c: i for i, c in enumerate(documents)}
        questions = []
        for article in data["data"]:
            siblings = [number[p["context"]] for p in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                own = number[paragraph["context"]]
                for qa in paragraph["qas"]:
                    if not qa["is_impossible"]:
                        questions.append({"query": qa["question"],
                                          "outputs": [a["text"] for a in qa["answers"]],
                                          "context": [own],
                                          "more_context": [i for i in siblings if i != own]})
    except (KeyError, TypeError) as error:
        raise EvaluationError(f"SQuAD file {path} lacks SQuAD v2's fields ({error!r}); expected "
                              f"the {SQUAD_HELP}") from None
    return questions, documents


def _read_hotpotqa(path: Optional[str]) -> tuple[list[dict], list[str]]:
    data = _read_json(path, "HotpotQA", HOTPOT_HELP)
    try:
        def document(title, sentences):
            return f"{title}\n{''.join(sentences)}"
        documents = sorted({document(t, p) for d in data for t, p in d["context"]})
        number = {c: i for i, c in enumerate(documents)}
        questions = [{"query": d["question"], "outputs": [d["answer"]],
                      "context": [number[document(t, p)] for t, p in d["context"]]}
                     for d in data]
    except (KeyError, TypeError, ValueError) as error:
        raise EvaluationError(f"HotpotQA file {path} lacks HotpotQA's fields ({error!r}); "
                              f"expected the {HOTPOT_HELP}") from None
    return questions, documents


def niah_template(shape: NiahShape) -> tuple[str, str]:
    """(template + answer prefix with {context} and {query}, type word): RULER's plural wording,
    made singular by its own replacements when one value is asked for."""
    template = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX
    type_word = shape.value_type
    if shape.queries * shape.values == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        type_word = type_word[:-1]
    return template, type_word


def _draw(rng: random.Random, kind: str, sources: RulerSources) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return rng.choice(sources.key_words())
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def niah_text(shape: NiahShape, size: int, rng: random.Random, sources: RulerSources
              ) -> tuple[str, list[str]]:
    """RULER's generate_input_output for a needle task with `size` haystack units."""
    keys, values, needles = [], [], []
    for _ in range(max(shape.keys, shape.queries)):
        keys.append(_draw(rng, shape.key_type, sources))
        values.append([])
        for _ in range(shape.values):
            values[-1].append(_draw(rng, shape.value_type, sources))
            needles.append(NEEDLE.format(type_needle_v=shape.value_type, key=keys[-1],
                                         value=values[-1][-1]))
    rng.shuffle(needles)
    if shape.haystack == "essay":
        words = sources.essay_words()
        repeats = -(-size // len(words))
        text = " ".join((words * repeats)[:size])
        sentences = sources.split_sentences(text.strip())
        cuts = ([0] + sorted(int(len(sentences) * (d / 100))
                             for d in rng.sample(ESSAY_DEPTHS, len(needles)))
                + [len(sentences)])
        pieces = []
        for i in range(1, len(cuts)):
            pieces.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                pieces.append(needles[i - 1])
        context = " ".join(pieces)
    else:
        if shape.haystack == "noise":
            lines = [NOISE_LINE] * size
        else:
            lines = [NEEDLE.format(type_needle_v=shape.value_type, key=_draw(rng, shape.key_type, sources),
                                   value=_draw(rng, shape.value_type, sources)) for _ in range(size)]
        at = sorted(rng.sample(range(size), len(needles)), reverse=True)
        for position, needle in zip(at, needles):
            lines.insert(position, needle)
        context = "\n".join(lines)
    queried = rng.sample(range(len(keys)), shape.queries)
    query_keys = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]
    query = (", ".join(query_keys[:-1]) + ", and " + query_keys[-1] if len(query_keys) > 1
             else query_keys[0])
    template, type_word = niah_template(shape)
    return template.format(type_needle_v=type_word, context=context, query=query), answers


def vt_chain(rng: random.Random, hops: int, example: bool) -> tuple[list[str], list[str]]:
    """(variable names, statements) of one chain, as RULER's generate_chains."""
    letters = 3 if example else 5
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = "12345" if example else str(rng.randint(10000, 99998))
    statements = [f"VAR {names[0]} = {value}"] + [
        f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, statements


def vt_text(size: int, rng: random.Random, example: bool = False) -> tuple[str, list[str]]:
    """RULER's variable tracking over the noise haystack with `size` lines (no one-shot)."""
    names, chain = vt_chain(rng, VT_HOPS, example)
    value = chain[0].split("=")[-1].strip()
    lines = [NOISE_LINE] * size
    for offset, position in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
        lines.insert(position + offset, chain[offset])
    context = "\n".join(lines).replace(". \n", ".\n")
    return (VT_TEMPLATE + VT_ANSWER_PREFIX).format(context=context, query=value,
                                                   num_v=VT_HOPS + 1), names


def vt_one_shot(tokenizer: TextTokenizer, rng: random.Random) -> str:
    """RULER's in-context example: the largest noise size whose prompt fits 500 tokens (step 5),
    with its answer, before renaming (see `randomize_one_shot`)."""
    def build(size):
        return vt_text(size, random.Random(rng.random()), example=True)

    def tokens(size):
        return len(tokenizer.encode(build(size)[0]))
    size = _search(lambda n: tokens(n) <= 500, 500, 5, tokens(5) / 5)
    while True:
        text, names = build(size)
        if len(tokenizer.encode(text)) <= 500 or size <= 5:
            return text + " " + " ".join(names) + "\n"


def randomize_one_shot(example: str, rng: random.Random) -> str:
    """RULER's randomize_icl: new names for the example's variables, a new value for 12345."""
    for name in example.strip().split()[-VT_HOPS - 1:]:
        example = example.replace(name, "".join(rng.choices(string.ascii_uppercase,
                                                            k=len(name))))
    return example.replace("12345", str(rng.randint(10000, 99998)))


def cwe_text(num_words: int, length: int, rng: random.Random, sources: RulerSources,
             template: str) -> tuple[str, list[str]]:
    """RULER's common words extraction: one solved example, then the list to solve. `template`
    is the task template + answer prefix (chat-wrapped when a chat template applies: RULER
    formats the example with the same template)."""
    words = list(sources.short_words())
    rng.shuffle(words)

    def example(count, common_repeats, uncommon_repeats):
        pool = words if count <= len(words) else sources.long_words()
        if count > len(pool):
            raise EvaluationError(f"cwe needs {count} distinct words; {WORDS_HELP}")
        drawn = rng.sample(pool, count)
        common, uncommon = drawn[:CWE_COMMON], drawn[CWE_COMMON:]
        listed = common * common_repeats + uncommon * uncommon_repeats
        rng.shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common

    if length < 4096:
        shot_context, shot_answer = example(20, 3, 1)
        context, answer = example(num_words, 6, 1)
    else:
        shot_context, shot_answer = example(40, 10, 3)
        context, answer = example(num_words, 30, 3)
    shot = (template.format(context=shot_context) + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer)))
    return shot + "\n" + template.format(context=context), answer


def fwe_text(num_words: int, vocab_size: int, rng_seed: int) -> tuple[str, list[str]]:
    """RULER's frequent words extraction: Zipf-distributed coded words."""
    rng = random.Random(rng_seed)
    vocab = [''.join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH))
             for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append(''.join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH)))
    vocab = sorted(set(vocab))
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent is noise
    counts = [int(num_words * (k ** -FWE_ALPHA) / ZETA_OF_ALPHA) for k in range(1, len(vocab) + 1)]
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    random.Random(rng_seed + 1).shuffle(words)
    return (FWE_TEMPLATE + FWE_ANSWER_PREFIX).format(context=" ".join(words)), vocab[1:4]


def qa_text(dataset: str, question: int, size: int, rng: random.Random,
            sources: RulerSources) -> tuple[str, list[str]]:
    """RULER's QA prompt for question number `question` with `size` documents."""
    questions, documents = sources.qa(dataset)
    if not questions:
        raise EvaluationError(f"the {dataset} file holds no answerable question")
    qa = questions[question % len(questions)]
    gold, more = qa["context"], qa.get("more_context", [])
    if size < len(documents):
        if size - len(gold) > len(more):
            others = [i for i in range(len(documents)) if i not in gold + more]
            chosen = gold + more + rng.sample(others, max(0, size - len(gold) - len(more)))
        else:
            chosen = gold + rng.sample(more, size - len(gold))
        picked = [documents[i] for i in chosen]
    else:
        picked = (documents * -(-size // len(documents)))[:size]
    rng.shuffle(picked)
    context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(picked))
    return (QA_TEMPLATE + QA_ANSWER_PREFIX).format(context=context, query=qa["query"]), \
        list(qa["outputs"])


def _search(fits: Callable[[int], bool], length: int, increment: int, per_unit: float) -> int:
    """RULER's binary search: the largest size in [increment, 3 x length / per_unit] that
    `fits` (`increment` when none does)."""
    low, high = increment, max(int(length / per_unit * 3), increment * 2)
    best = None
    while low <= high:
        middle = (low + high) // 2
        if fits(middle):
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return best if best is not None else increment


def _increment(task: str, length: int, shape: Optional[NiahShape]) -> int:
    if shape is not None and shape.haystack == "essay":
        return 500
    if task == "qa_1" or task == "qa_2":
        return 10
    base = 25 if shape is not None else 10
    return 5 if length < 4096 else base


def _rng(seed: int, task: str, length: int, what) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and platforms.
    return random.Random(f"{seed}:{task}:{length}:{what}")


def build_ruler_example(task: str, tokenizer: TextTokenizer, length: int, index: int = 0,
                        seed: int = 42, sources: Optional[RulerSources] = None,
                        chat: Optional[ChatTemplate] = None) -> RulerExample:
    """One RULER example of `task` whose prompt plus generation budget fits `length` tokens;
    with `chat`, the task's template is wrapped in it and the answer prefix follows (RULER's
    model templates), its markers counted as the special tokens they are."""
    if task not in FAMILY:
        raise EvaluationError(f"unknown RULER task {task!r}; choose from {', '.join(RULER_TASKS)}")
    sources = sources or RulerSources()
    family = FAMILY[task]
    budget = TOKENS_TO_GENERATE[family]
    room = length - budget

    def tokens(text: str) -> int:
        return len(encode_prompt(tokenizer, text))

    prefix = {"variable_tracking": VT_ANSWER_PREFIX, "qa": QA_ANSWER_PREFIX,
              "freq_words_extraction": FWE_ANSWER_PREFIX}.get(family, NIAH_ANSWER_PREFIX)

    def wrapped(text: str) -> str:
        return chat.wrap(text, prefix) if chat is not None else text

    if family == "freq_words_extraction":
        return _fwe_example(task, tokenizer, length, index, seed, budget, wrapped)
    if family == "common_words_extraction":
        return _cwe_example(task, tokenizer, length, index, seed, budget, sources, chat, tokens)
    shape = NIAH_TASKS.get(task)
    step = _increment(task, length, shape)
    one_shot, shot_tokens = "", 0
    if family == "niah":
        def make(size, rng):
            return niah_text(shape, size, rng, sources)
    elif family == "variable_tracking":
        one_shot = vt_one_shot(tokenizer, _rng(seed, task, length, "one-shot"))
        shot_tokens = tokens(one_shot)

        def make(size, rng):
            return vt_text(size, rng)
    else:
        dataset = "squad" if task == "qa_1" else "hotpotqa"

        def make(size, rng, question):
            return qa_text(dataset, question, size, rng, sources)

    def draw(size, what):
        rng = _rng(seed, task, length, what)
        # QA: RULER sizes the context on question 0, then asks question `index`.
        text, outputs = (make(size, rng, 0 if what == "search" else index) if family == "qa"
                         else make(size, rng))
        return wrapped(text), outputs

    first = tokens(draw(step, "search")[0])
    if first + shot_tokens > room:
        raise EvaluationError(
            f"length {length} is too short for RULER's {task}: its smallest prompt takes "
            f"{first + shot_tokens} tokens and the task generates {budget}; give a length of at "
            f"least {first + shot_tokens + budget} (RULER's tables start at 4096)")
    size = _search(lambda n: tokens(draw(n, "search")[0]) + shot_tokens <= room, length, step,
                   first / step)
    while True:
        text, outputs = draw(size, index)
        if one_shot:
            shot = randomize_one_shot(one_shot, _rng(seed, task, length, f"shot-{index}"))
            cut = text.index(VT_TEMPLATE[:20])
            text = text[:cut] + shot + "\n" + text[cut:]
        count = tokens(text)
        if count + budget <= length or size <= step:
            break
        size -= step
    if count + budget > length:
        raise EvaluationError(f"length {length} is too short for RULER's {task}: the prompt "
                              f"takes {count} tokens and {budget} are generated")
    cut = text.rfind(prefix[:10])
    return RulerExample(task, length, index, text[:cut], text[cut:], outputs, budget, count, size,
                        "string_match_part" if family == "qa" else "string_match_all")


def _cwe_example(task, tokenizer, length, index, seed, budget, sources, chat,
                 tokens) -> RulerExample:
    """RULER's sys_word_pair_random: the word count by binary search (step 10) from a
    4096-word estimate, lowered by 10 per example until it fits."""
    template = (chat.before + CWE_TEMPLATE + chat.after if chat is not None
                else CWE_TEMPLATE) + CWE_ANSWER_PREFIX

    def draw(count, what):
        return cwe_text(count, length, _rng(seed, task, length, what), sources, template)
    per_word = tokens(draw(4096, "estimate")[0]) / 4096
    upper = max(int(length // per_word) * 2, 20)
    low, best = 10, None
    while low <= upper:
        middle = (low + upper) // 2
        if tokens(draw(middle, "search")[0]) + budget <= length:
            best, low = middle, middle + 1
        else:
            upper = middle - 1
    size = best if best is not None else 10
    while True:
        text, outputs = draw(size, index)
        count = tokens(text)
        if count + budget <= length or size <= 10:
            break
        size -= 10
    if count + budget > length:
        raise EvaluationError(f"length {length} is too short for RULER's cwe: the prompt takes "
                              f"{count} tokens and {budget} are generated")
    cut = text.rfind(CWE_ANSWER_PREFIX[:10])
    return RulerExample(task, length, index, text[:cut], text[cut:], outputs, budget, count, size)


def _fwe_example(task, tokenizer, length, index, seed, budget, wrapped) -> RulerExample:
    """RULER's sys_kwext: vocabulary (length - budget) // 50 words; the word count grows by
    room // 32 from room // 6 until the prompt exceeds room, then steps back once."""
    room = length - budget
    vocab_size = room // 50
    step = max(room // 32, 1)
    example_seed = _rng(seed, task, length, index).getrandbits(32)

    def text_of(n):
        text, outputs = fwe_text(n, vocab_size, example_seed)
        return wrapped(text), outputs

    def count(n):
        return len(encode_prompt(tokenizer, text_of(n)[0]))
    num_words = room // FWE_WORD_LENGTH
    while count(num_words) < room:
        num_words += step
    num_words -= step
    while num_words > step and count(num_words) > room:
        num_words -= step
    text, outputs = text_of(num_words)
    tokens = len(encode_prompt(tokenizer, text))
    if vocab_size < 4 or tokens > room:
        raise EvaluationError(f"length {length} is too short for RULER's fwe; give at least 4096")
    cut = text.rfind(FWE_ANSWER_PREFIX[:10])
    return RulerExample(task, length, index, text[:cut], text[cut:], outputs, budget, tokens,
                        num_words)
