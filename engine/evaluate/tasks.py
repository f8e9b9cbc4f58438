"""The recall suite: RULER's and HELMET's synthetic retrieval tasks at exact token lengths.

    suite = RecallSuite(load_tokenizer("tokenizer.model"), haystack=None, seed=0, vocab_size=128256)
    example = suite.example("niah_single", length=32768, depth=0.5, index=0)
    for example in suite.examples(TASKS, lengths=(4096, 32768), depths=depth_sweep(5), per_cell=2):
        ...

`RecallExample` holds the prompt token ids (int32, exactly `length` tokens: BOS when the tokenizer
has one, the instructions, the context with its needles, the question and the answer prefix),
the canonical answer to teacher-force (`answer_ids`, no BOS), the gold values, how many answer
tokens each value needs (`answer_value_ends`, see engine.evaluate.scoring), and where the
needles are (`needle_spans`, prompt token positions [start, end); `needle_spans[0]` is the needle
placed at `depth`).

Tasks (formats from RULER, NVIDIA, arXiv 2404.06654, and HELMET, Princeton, arXiv 2410.02694):
- `niah_single`: one needle "One of the special magic numbers for {key} is: {value}." (key an
  adjective-noun word pair, value a random 7-digit number); question "What is the special magic
  number for {key} mentioned in the provided text?"; answer prefix "The special magic number for
  {key} mentioned in the provided text is"; answer " {value}.".
- `niah_multikey`: 4 needles with different keys, one queried (3 distractors).
- `niah_multivalue`: 4 needles with one key; all 4 values must be recalled (answer: the values
  in the order they appear, ", "-separated).
- `niah_multiquery`: 4 keys, all queried ("for a, b, c, and d"); answer in query order.
- `json_kv`: HELMET's JSON key-value retrieval: "Extract the value corresponding to the specified
  key in the JSON object below." over a JSON object of random UUID keys and values (one record a
  line) that fills the context; question 'Key: "{key}"', answer prefix "Corresponding value:",
  answer " {value}". The haystack is the JSON object itself.
- `variable_tracking`: RULER's chain "VAR X1 = 12345.", "VAR X2 = VAR X1.", ... (4 hops, five
  variables of 5 capital letters); the answer lists the five variables in chain order.
Plural wording (RULER's "What are all the special magic numbers ...") is used when more than one
value is asked for. Not included: RULER's few-shot example for variable tracking and HELMET's
2 demonstrations for JSON KV (the prompts are zero-shot), and chat templates.

Lengths and depths. The prompt is assembled from token ids piece by piece (never by re-tokenizing
a long string), so 512K-token prompts take well under a second. The context is what the
instructions, question and answer prefix leave of `length`; its H haystack tokens are the context
without the needles. A needle at depth d goes after round(d x H) haystack tokens (for one needle:
at context offset d x (C - n)), moved to the nearest sentence end or line start within 0.5% of
`length` when there is one (as a line of its own after a newline, as a sentence after a sentence
end), else inserted right there; so it sits within 1% of `length` of its target
(`RecallExample.placed_depth` is where it went). The other needles (distractors, further values
and keys, the later links of a variable chain, which keep their order after the first) sit at
random depths. JSON records cannot be split, so in `json_kv` the queried record is as close to
its target as whole records allow: within half a record (~75 Llama-3 tokens a record, so under
40 tokens), which is within 1% of `length` from 4K tokens on. The context ends with a haystack
token that the question's first token does not merge with, so with RULER's noise the prompt ids
are exactly the tokenizer's own encoding of the prompt's text (tested with Llama-3); joints
between a user's documents keep the documents' ids as they are.

Values and keys never occur in the haystack by accident: after assembly the decoded context must
hold each of them exactly as often as the needles put them there, else they are drawn again.
Every example comes from its own random stream seeded by (seed, task, length, depth, index), so
the same seed gives bitwise the same examples in any order, and one example can be regenerated
alone. Bad input (unknown task, a length too short for a task, a haystack too small, a
tokenizer whose vocabulary does not fit the model) raises EvaluationError naming the value and
the fix.
"""
from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from data_tools.tokenizer import TextTokenizer
from engine.evaluate.errors import EvaluationError
from engine.evaluate.haystack import Haystack, HaystackWindow, NoiseHaystack
from engine.evaluate.scoring import answer_value_ends
from engine.evaluate.words import ADJECTIVES, NOUNS

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "json_kv",
         "variable_tracking")
# RULER's needle counts: (keys, values per key, keys queried).
NIAH_SHAPES = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1),
               "niah_multivalue": (1, 4, 1), "niah_multiquery": (4, 1, 4)}
VARIABLE_TRACKING_HOPS = 4
# A needle moves to a sentence or line boundary at most this fraction of the length away.
SNAP_FRACTION = 0.005
# A tokenizer may differ from the model's vocabulary by padding or a few added special tokens.
VOCAB_SLACK_FRACTION = 0.01
_MAX_DRAWS = 64

NEEDLE = "One of the special magic numbers for {key} is: {value}."
_NIAH_ONE = ("A special magic number is hidden within the following text. Make sure to memorize "
             "it. I will quiz you about the number afterwards.\n",
             "\nWhat is the special magic number for {query} mentioned in the provided text?"
             " The special magic number for {query} mentioned in the provided text is")
_NIAH_MANY = ("Some special magic numbers are hidden within the following text. Make sure to "
              "memorize it. I will quiz you about the numbers afterwards.\n",
              "\nWhat are all the special magic numbers for {query} mentioned in the provided "
              "text? The special magic numbers for {query} mentioned in the provided text are")
_VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_VT_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text "
                "above. Answer: According to the chain(s) of variable assignment in the text "
                "above, {count} variables are assigned the value {value}, they are:")
_JSON_HEAD = ("Extract the value corresponding to the specified key in the JSON object below."
              "\n\nJSON data:\n{")
_JSON_RECORD = ' "{key}": "{value}",\n'
_JSON_LAST_RECORD = ' "{key}": "{value}"}}\n\n'
_JSON_QUESTION = 'Key: "{key}"\nCorresponding value:'


@dataclass(eq=False)
class RecallExample:
    """One prompt of the suite; see the module docstring. Token positions index `prompt_ids`."""
    task: str
    length: int
    depth: float
    index: int
    seed: int
    prompt_ids: np.ndarray                      # int32 [length]
    answer_ids: np.ndarray                      # int32 [A], the canonical continuation
    gold: tuple[str, ...]
    answer_value_ends: tuple[int, ...]          # answer tokens needed for each gold value
    needle_spans: tuple[tuple[int, int], ...]   # [start, end); [0] is the one placed at depth
    context_span: tuple[int, int]               # [start, end) of the context (haystack + needles)

    @property
    def needle_positions(self) -> tuple[int, ...]:
        return tuple(start for start, _ in self.needle_spans)

    @property
    def haystack_tokens(self) -> int:
        """Tokens of the context that belong to no needle."""
        return self.context_span[1] - self.context_span[0] - sum(b - a for a, b in self.needle_spans)

    @property
    def placed_depth(self) -> float:
        """Fraction of the haystack tokens before the first needle (the one placed at `depth`)."""
        anchor = self.needle_spans[0][0]
        before = anchor - self.context_span[0] - sum(b - a for a, b in self.needle_spans if a < anchor)
        return before / max(1, self.haystack_tokens)

    def with_answer(self, tokenizer: TextTokenizer, answer_ids, gold: Sequence[str]) -> "RecallExample":
        """A copy with another answer to teacher-force and score (e.g. a model's own output)."""
        answer_ids = np.asarray(answer_ids, dtype=np.int32)
        return RecallExample(self.task, self.length, self.depth, self.index, self.seed,
                             self.prompt_ids, answer_ids, tuple(gold),
                             answer_value_ends(tokenizer, answer_ids, gold), self.needle_spans,
                             self.context_span)


def depth_sweep(count: int) -> list[float]:
    """`count` depths evenly from 0 to 1, both included (one depth: 0.5)."""
    if count < 1:
        raise EvaluationError(f"depth count {count}; ask for at least 1 depth")
    return [round(float(d), 6) for d in np.linspace(0.0, 1.0, count)] if count > 1 else [0.5]


def check_tokenizer_vocabulary(tokenizer: TextTokenizer, vocab_size: int,
                               what: str = "the model") -> None:
    """Raise EvaluationError when `tokenizer` cannot be the tokenizer of a model whose embedding
    has `vocab_size` rows: its vocabulary differs by more than 1% (padding and a few added
    special tokens stay well within that), or its BOS/EOS ids fall outside the embedding."""
    specials = [t for t in (tokenizer.bos_id, tokenizer.eos_id) if t is not None]
    off = abs(tokenizer.vocab_size - vocab_size) > VOCAB_SLACK_FRACTION * vocab_size
    if off or any(t >= vocab_size for t in specials):
        raise EvaluationError(
            f"tokenizer {tokenizer.path!r} has {tokenizer.vocab_size:,} tokens (BOS/EOS ids "
            f"{specials}), but {what} has a {vocab_size:,}-token vocabulary: it is another "
            f"model's tokenizer; pass the tokenizer the model was trained with")


@dataclass
class _Draft:
    """A needle task's drawn content before placement. Needles are listed in text order."""
    head: str
    needles: list[str]
    depths: list[float]
    anchor: int                 # the needle placed at the requested depth
    question: str               # question and answer prefix
    answer: str
    gold: tuple[str, ...]
    counts: dict[str, int]      # how often each key/value must occur in the context


class RecallSuite:
    """Generates `RecallExample`s with one tokenizer, one haystack and one seed.

    `haystack`: a Haystack (engine.evaluate.haystack; default RULER's noise). `vocab_size`: the
    model's vocabulary; when given, the tokenizer is checked against it."""

    def __init__(self, tokenizer: TextTokenizer, haystack: Optional[Haystack] = None,
                 seed: int = 0, vocab_size: Optional[int] = None):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise EvaluationError(f"seed {seed!r}; give a non-negative integer")
        if vocab_size is not None:
            check_tokenizer_vocabulary(tokenizer, vocab_size)
        if haystack is not None and haystack.tokenizer is not tokenizer:
            raise EvaluationError("the haystack was loaded with another tokenizer object; load "
                                  "it with the suite's tokenizer")
        self.tokenizer = tokenizer
        self.haystack = haystack if haystack is not None else NoiseHaystack(tokenizer)
        self.seed = int(seed)
        self.vocab_size = vocab_size if vocab_size is not None else tokenizer.vocab_size
        self._bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []

    def describe(self) -> dict:
        return {"seed": self.seed, "tokenizer": self.tokenizer.describe(),
                "haystack": self.haystack.describe()}

    def examples(self, tasks: Iterable[str] = TASKS, lengths: Iterable[int] = (4096,),
                 depths: Iterable[float] = (0.5,), per_cell: int = 1) -> Iterator[RecallExample]:
        """Every (task, length, depth, index < per_cell), generated lazily in that order."""
        tasks, lengths, depths = list(tasks), list(lengths), list(depths)
        for task in tasks:
            self._check_task(task)
        for task in tasks:
            for length in lengths:
                for depth in depths:
                    for index in range(per_cell):
                        yield self.example(task, length, depth, index)

    def example(self, task: str, length: int, depth: float, index: int = 0) -> RecallExample:
        """One example; the same arguments and seed always give the same token ids."""
        self._check_task(task)
        if not isinstance(length, (int, np.integer)) or length < 1:
            raise EvaluationError(f"length {length!r}; give a positive number of tokens")
        if not 0.0 <= depth <= 1.0:
            raise EvaluationError(f"depth {depth!r} for {task}; give a depth in [0, 1]")
        if index < 0:
            raise EvaluationError(f"example index {index}; give an index >= 0")
        length, depth = int(length), round(float(depth), 6)
        rng = np.random.default_rng([self.seed, zlib.crc32(task.encode()), length,
                                     int(round(depth * 1e6)), int(index)])
        if task == "json_kv":
            example = self._json_kv(length, depth, index, rng)
        else:
            example = self._needle_task(task, length, depth, index, rng)
        top = int(example.prompt_ids.max())
        if top >= self.vocab_size:
            raise EvaluationError(f"{task} at length {length} holds token id {top}, outside the "
                                  f"model's {self.vocab_size:,}-token vocabulary; pass the "
                                  f"model's own tokenizer and haystack")
        return example

    @staticmethod
    def _check_task(task: str) -> None:
        if task not in TASKS:
            raise EvaluationError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")

    def _encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.tokenizer.encode_batch(list(texts))]

    def _ending_quality(self, token: int, question: str) -> int:
        """0 when `token` followed by `question` is not how the tokenizer encodes their text
        (the two would merge), 2 when it is and `token` starts with a space, else 1."""
        text = self.tokenizer.decode([token])
        joined = self.tokenizer.encode(text + question)
        if joined[:1] != [token] or len(joined) != 1 + len(self.tokenizer.encode(question)):
            return 0
        return 2 if text[:1] == " " else 1

    def _too_short(self, task: str, length: int, needed: int) -> EvaluationError:
        return EvaluationError(f"length {length} is too short for {task}: its instructions, "
                               f"question and needles alone take {needed} tokens; give a "
                               f"length well above that (the suite is meant for 1K and more)")

    # Needle tasks: niah_* and variable_tracking.

    def _needle_task(self, task, length, depth, index, rng) -> RecallExample:
        window: Optional[HaystackWindow] = None
        tolerance = max(1, int(SNAP_FRACTION * length))
        for _ in range(_MAX_DRAWS):
            draft = (_draw_variable_tracking(rng, depth) if task == "variable_tracking"
                     else _draw_niah(rng, NIAH_SHAPES[task], depth))
            head, question, answer = self._encode([draft.head, draft.question, draft.answer])
            forms = self._encode([" " + s for s in draft.needles] + [s + "\n" for s in draft.needles])
            forms = list(zip(forms[:len(draft.needles)], forms[len(draft.needles):]))
            prefix = len(self._bos) + len(head)
            context_tokens = length - prefix - len(question)
            needle_tokens = sum(max(len(a), len(b)) for a, b in forms)
            if context_tokens - needle_tokens < 1:
                raise self._too_short(task, length, prefix + len(question) + needle_tokens)
            if window is None or len(window.ids) < context_tokens:
                window = self.haystack.window(context_tokens, rng, f"{task} at length {length}")
            context, spans = _place_needles(
                window, forms, draft.depths, draft.anchor, context_tokens, tolerance,
                lambda token: self._ending_quality(token, draft.question))
            text = self.tokenizer.decode(context)
            if all(text.count(s) == n for s, n in draft.counts.items()):
                break
        else:
            raise EvaluationError(f"{task} at length {length}: no needle values absent from the "
                                  f"haystack after {_MAX_DRAWS} draws; use another haystack")
        order = [draft.anchor] + [j for j in range(len(spans)) if j != draft.anchor]
        return self._example(task, length, depth, index, head, context, question, answer,
                             draft.gold, [spans[j] for j in order])

    def _example(self, task, length, depth, index, head, context, question, answer, gold,
                 spans) -> RecallExample:
        prompt = np.concatenate([np.asarray(self._bos, dtype=np.int32), head, context, question])
        if len(prompt) != length:  # the assembly is exact by construction
            raise AssertionError(f"{task}: built {len(prompt)} tokens for length {length}")
        start = len(self._bos) + len(head)
        return RecallExample(
            task, length, depth, index, self.seed, prompt.astype(np.int32), answer, tuple(gold),
            answer_value_ends(self.tokenizer, answer, gold),
            tuple((start + a, start + b) for a, b in spans), (start, start + len(context)))

    # json_kv

    def _json_kv(self, length, depth, index, rng) -> RecallExample:
        used: set[str] = set()
        key, value = _uuid(rng, used), _uuid(rng, used)
        head, question, answer, gold_mid, gold_last = self._encode([
            _JSON_HEAD, _JSON_QUESTION.format(key=key), " " + value,
            _JSON_RECORD.format(key=key, value=value), _JSON_LAST_RECORD.format(key=key, value=value)])
        context_tokens = length - len(self._bos) - len(head) - len(question)
        records = _JsonRecords(self, rng, used)
        minimum = len(gold_mid) + records.typical_length()
        if context_tokens < minimum:
            raise self._too_short("json_kv", length, length - context_tokens + minimum)
        target = round(depth * (context_tokens - len(gold_mid)))
        if target > context_tokens - len(gold_last) - records.typical_length() // 2:
            # Closer to the end than half a record: the queried record closes the object.
            before = records.fill_exact(context_tokens - len(gold_last), closing=False)
            gold, after = gold_last, []
        else:
            body = records.fill_exact(context_tokens - len(gold_mid), closing=True)
            before, after = _split_near(body[:-1], target, rng)
            gold, after = gold_mid, after + body[-1:]
        context = np.concatenate(before + [gold] + after)
        offset = sum(len(r) for r in before)
        text = self.tokenizer.decode(context)
        if text.count(key) != 1 or text.count(value) != 1:
            raise AssertionError("json_kv: a UUID occurs twice although all are distinct")
        return self._example("json_kv", length, depth, index, head, context, question, answer,
                             (value,), [(offset, offset + len(gold))])


def _draw_niah(rng, shape, depth) -> _Draft:
    num_keys, num_values, num_queries = shape
    keys = _draw_keys(rng, num_keys)
    numbers = rng.choice(9_000_000, size=num_keys * num_values, replace=False) + 1_000_000
    values = [[str(numbers[k * num_values + v]) for v in range(num_values)] for k in range(num_keys)]
    queried = [int(q) for q in rng.permutation(num_keys)[:num_queries]]
    # (key, value) per needle; the first queried key's first value is placed at `depth`.
    needles = [(k, v) for k in range(num_keys) for v in range(num_values)]
    anchor = needles.index((queried[0], 0))
    depths = [depth if j == anchor else float(rng.uniform()) for j in range(len(needles))]
    order = sorted(range(len(needles)), key=lambda j: (depths[j], j != anchor, j))
    text_rank = {needles[j]: rank for rank, j in enumerate(order)}
    gold = tuple(values[k][v] for k in queried
                 for v in sorted(range(num_values), key=lambda v: text_rank[(k, v)]))
    query = keys[queried[0]] if num_queries == 1 else (
        ", ".join(keys[k] for k in queried[:-1]) + ", and " + keys[queried[-1]])
    head, question = _NIAH_ONE if num_queries * num_values == 1 else _NIAH_MANY
    counts = {keys[k]: num_values for k in range(num_keys)}
    counts.update({value: 1 for row in values for value in row})
    return _Draft(head, [NEEDLE.format(key=keys[needles[j][0]], value=values[needles[j][0]][needles[j][1]])
                         for j in order],
                  [depths[j] for j in order], order.index(anchor), question.format(query=query),
                  " " + ", ".join(gold) + ".", gold, counts)


def _draw_keys(rng, count: int) -> list[str]:
    """`count` distinct adjective-noun keys, none a substring of another ("icy-x", "spicy-x")."""
    keys: list[str] = []
    while len(keys) < count:
        key = f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"
        if not any(key in other or other in key for other in keys):
            keys.append(key)
    return keys


def _draw_variable_tracking(rng, depth) -> _Draft:
    names: list[str] = []
    while len(names) < VARIABLE_TRACKING_HOPS + 1:
        name = "".join(chr(ord("A") + int(c)) for c in rng.integers(26, size=5))
        if name not in names:
            names.append(name)
    value = str(int(rng.integers(10000, 100000)))
    statements = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(VARIABLE_TRACKING_HOPS)]
    # The chain keeps its order: the first assignment at `depth`, later links after it.
    depths = [depth] + sorted(float(d) for d in rng.uniform(depth, 1.0, VARIABLE_TRACKING_HOPS))
    counts = {name: 2 for name in names[:-1]}
    counts.update({names[-1]: 1, value: 1})
    question = _VT_QUESTION.format(value=value, count=len(names))
    return _Draft(_VT_HEAD, statements, depths, 0, question, " " + " ".join(names),
                  tuple(names), counts)


def _place_needles(window: HaystackWindow, forms, depths, anchor: int, context_tokens: int,
                   tolerance: int, ending_quality: Callable[[int], int]):
    """Insert needles (in text order; `forms[j]` = (ids as " sentence", ids as "sentence\\n"))
    into the haystack, needle j after about depths[j] x H of the H haystack tokens, so that the
    context is exactly `context_tokens` long. The `anchor` needle is placed first; the others
    keep to their side of it, so they never push it off its depth.

    The context ends with at least one haystack token, one that joins the question cleanly
    (`ending_quality` > 0: a "." before the question's "\\n" would be one ".\\n" token in the
    tokenizer's own encoding of the text); a later token of the window takes the last place if
    needed, preferably one that starts with a space (quality 2).
    Returns (context ids, [(start, end)] of each needle in context offsets)."""
    lengths = [len(inline) for inline, _ in forms]
    for _ in range(4):  # forms differ in length only for some tokenizers; settles in 1-2 rounds
        haystack_tokens = context_tokens - sum(lengths)
        last = haystack_tokens - 1  # a haystack token always follows the last needle
        starts, as_line = [0] * len(forms), [False] * len(forms)
        starts[anchor], as_line[anchor] = _snap(
            window, min(round(depths[anchor] * haystack_tokens), last), 0, last, tolerance)
        previous = 0
        for j, depth in enumerate(depths):
            if j != anchor:
                low, high = (previous, starts[anchor]) if j < anchor else (previous, last)
                wanted = min(max(round(depth * haystack_tokens), low), high)
                starts[j], as_line[j] = _snap(window, wanted, low, high, tolerance)
            previous = starts[j]
        chosen = [line if newline else inline for (inline, line), newline in zip(forms, as_line)]
        if [len(f) for f in chosen] == lengths:
            break
        lengths = [len(f) for f in chosen]
    haystack_tokens = context_tokens - sum(len(f) for f in chosen)
    starts = [min(s, haystack_tokens - 1) for s in starts]
    pieces, spans, cursor, position = [], [], 0, 0
    for start, form in zip(starts, chosen):
        pieces.append(window.ids[cursor:start])
        position += start - cursor
        spans.append((position, position + len(form)))
        pieces.append(form)
        position += len(form)
        cursor = start
    ending = window.ids[cursor:haystack_tokens]
    if ending_quality(int(ending[-1])) == 0:
        spares = [int(t) for t in window.ids[haystack_tokens:haystack_tokens + 64]]
        qualities = [ending_quality(t) for t in spares]
        if max(qualities, default=0) > 0:
            ending = np.append(ending[:-1], spares[int(np.argmax(qualities))])
    pieces.append(ending)
    return np.concatenate(pieces).astype(np.int32), spans


def _snap(window: HaystackWindow, offset: int, low: int, high: int, tolerance: int):
    """The boundary in [low, high] nearest `offset` if within `tolerance` -> (it, after a
    newline?); else (offset, False): inserted mid-sentence."""
    first = int(np.searchsorted(window.boundaries, low, side="left"))
    last = int(np.searchsorted(window.boundaries, high, side="right"))
    candidates = window.boundaries[first:last]
    if len(candidates):
        i = int(np.searchsorted(candidates, offset))
        best = min((j for j in (i - 1, i) if 0 <= j < len(candidates)),
                   key=lambda j: abs(int(candidates[j]) - offset))
        if abs(int(candidates[best]) - offset) <= tolerance:
            return int(candidates[best]), bool(window.after_newline[first + best])
    return offset, False


def _uuid(rng, used: set) -> str:
    while True:
        value = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        if value not in used:
            used.add(value)
            return value


class _JsonRecords:
    """Draws JSON records (distinct random UUID keys and values) as token ids and picks sets of
    them that fill a token budget exactly."""

    BATCH = 256
    POOL = 48

    def __init__(self, suite: RecallSuite, rng, used: set):
        self.suite, self.rng, self.used = suite, rng, used
        self._pending: list[np.ndarray] = []
        self._typical = None
        self._subset_records = 64

    def _draw(self, count: int, closing: bool = False) -> list[np.ndarray]:
        template = _JSON_LAST_RECORD if closing else _JSON_RECORD
        return self.suite._encode([template.format(key=_uuid(self.rng, self.used),
                                                   value=_uuid(self.rng, self.used))
                                   for _ in range(count)])

    def _next(self) -> np.ndarray:
        if not self._pending:
            self._pending = self._draw(self.BATCH)[::-1]
        return self._pending.pop()

    def typical_length(self) -> int:
        if self._typical is None:
            self._pending = self._draw(self.BATCH)[::-1]
            lengths = [len(r) for r in self._pending]
            self._typical = int(np.median(lengths))
            # Sums of k records cover about [k short, k long]; consecutive k overlap once
            # k >= short / (long - short), so the subset sum needs that many records to choose
            # from (short and long: the 10th and 90th percentiles, extremes are rare).
            short, long = (int(x) for x in np.percentile(lengths, [10, 90]))
            self._subset_records = min(64, -(-short // (long - short)) + 3 if long > short else 64)
        return self._typical

    def fill_exact(self, budget: int, closing: bool) -> list[np.ndarray]:
        """Records whose lengths sum to exactly `budget` tokens; with `closing`, the last one
        closes the object."""
        self.typical_length()
        records, left = [], budget
        # Whole records while far from the end; the last ones by subset sum over a fresh pool.
        while left > self._subset_records * self._typical:
            records.append(self._next())
            left -= len(records[-1])
        for _ in range(_MAX_DRAWS // 8):
            pool = [self._next() for _ in range(2 * left // self._typical + self.POOL)]
            closer = self._draw(1, closing=True)[0] if closing else None
            chosen = _subset_sum([len(r) for r in pool], left - (len(closer) if closing else 0),
                                 exact=True)
            if chosen is not None:
                return records + [pool[i] for i in chosen] + ([closer] if closing else [])
        raise EvaluationError(f"json_kv: no set of whole records fills {budget} tokens exactly "
                              f"with this tokenizer; give a slightly different length")


def _split_near(records: list[np.ndarray], target: int, rng) -> tuple[list, list]:
    """Split `records` (any order is valid JSON) into (before, after) with `before`'s token count
    as close to `target` as a subset allows."""
    order = [int(i) for i in rng.permutation(len(records))]
    lengths = [len(records[i]) for i in order]
    before, total = [], 0
    longest = max(lengths, default=0)
    cursor = 0
    while cursor < len(order) and total + lengths[cursor] <= target - 12 * longest:
        before.append(order[cursor])
        total += lengths[cursor]
        cursor += 1
    rest = order[cursor:]
    pool = rest[:_JsonRecords.POOL + 16]
    chosen = _subset_sum([len(records[i]) for i in pool], target - total, exact=False)
    before += [pool[i] for i in chosen]
    taken = set(before)
    return [records[i] for i in before], [records[i] for i in order if i not in taken]


def _subset_sum(lengths: Sequence[int], target: int, exact: bool) -> Optional[list[int]]:
    """Indices of a subset of `lengths` summing to `target` (exact), or as near it as possible
    (not exact; never None). None when no exact subset exists."""
    if target < 0:
        return None if exact else []
    limit = target + (max(lengths, default=0) if not exact else 0)
    first_item = np.full(limit + 1, -1, dtype=np.int64)  # the item that first reached a sum
    reached = np.zeros(limit + 1, dtype=bool)
    reached[0] = True
    for item, n in enumerate(lengths):
        if n > limit or n <= 0:
            continue
        new = np.zeros_like(reached)
        new[n:] = reached[:-n] & ~reached[n:]
        first_item[new] = item
        reached |= new
    if exact:
        if not reached[target]:
            return None
        best = target
    else:
        sums = np.flatnonzero(reached)
        best = int(sums[np.argmin(np.abs(sums - target))])
    chosen = []
    while best > 0:  # each sum was first reached from a sum reached by earlier items only
        item = int(first_item[best])
        chosen.append(item)
        best -= lengths[item]
    return chosen[::-1]
