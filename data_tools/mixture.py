"""YAML recipe of weighted sources -> packed training dataset (see data_tools/packed_dataset.py).

A recipe (data_tools/recipes/*.yaml):
    name: prolong-stage1-64k
    seq_length: 65536          # L, tokens per sequence
    seed: 42
    num_sequences: 320000      # optional: sequences to draw, the run's steps x global batch
    total_tokens: 20e9         # optional, instead of num_sequences: total_tokens // L sequences;
                               # neither: one pass, no sequence repeated;
                               # each further pass over a source is a new permutation
    sources:
      - {name: books, path: books, weight: 0.3, long: true}       # documents >= L, cut
      - {name: fineweb, path: fineweb, weight: 0.1}                # concatenated
      - {name: books-64k, path: books, weight: 0.25, min_doc_tokens: 65536}
      - {name: prolong-books, path: book-65536, weight: 0.3, prepacked: true}  # see below
`path` is a Megatron dataset prefix, relative to --data-root (or the recipe's data_root).
`lce-data mix --train-config stage.yaml` sizes the mixture from the training run instead:
train_steps x data.global_batch sequences when the recipe names no size, and a refusal (saying
by how much it falls short) when the recipe's size is smaller than what the run trains on.

Each source's documents are shuffled (seed), packed (long: split_long, else
pack_concatenated), and its sequences shuffled; megatron-core's build_blending_indices then
interleaves sources so that every prefix of the training order follows the weights.
A `prepacked` source is stored already packed into seq_length-token sequences (ProLong's
released data, imported with `lce-data import-mds`): its documents keep their stored order
and every seq_length tokens are one sequence, so each of its packed samples is one training
sequence with its own document boundaries; only the sequences are shuffled. No document may
cross a sequence boundary (checked: the data was packed at another length otherwise).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np

from data_tools.indexed import IndexedReader, bin_path, idx_path
from data_tools.outputs import check_output_location
from data_tools.packed_dataset import METADATA_FILE, write_packed
from data_tools.packing import pack_concatenated, split_long
from data_tools.summary import DatasetTokens, MixedTokenizersError, check_one_tokenizer

SOURCE_KEYS = {"name", "path", "weight", "long", "min_doc_tokens", "prepacked"}
RECIPE_KEYS = {"name", "seq_length", "seed", "total_tokens", "num_sequences", "data_root",
               "sources", "description"}
RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


class RecipeError(ValueError):
    """A recipe that cannot be built; the message names the recipe file."""


@dataclass
class Source:
    name: str
    path: str
    weight: float
    long: bool = False
    min_doc_tokens: int = 0
    prepacked: bool = False


@dataclass
class Recipe:
    path: str
    name: str
    seq_length: int
    seed: int
    sources: list[Source]
    total_tokens: Optional[int] = None
    data_root: str = "."
    extra: dict = field(default_factory=dict)
    num_sequences: Optional[int] = None

    @property
    def sequences(self) -> Optional[int]:
        """The sequences the mixture draws, or None for one pass over the sources."""
        if self.num_sequences is not None:
            return self.num_sequences
        if self.total_tokens:
            return self.total_tokens // self.seq_length
        return None


def resolve_recipe_path(path: str) -> str:
    """A recipe file path, or the name of a shipped recipe ("prolong-stage1-64k")."""
    if os.path.exists(path):
        return path
    shipped = os.path.join(RECIPES_DIR, path if path.endswith(".yaml") else path + ".yaml")
    if os.path.exists(shipped):
        return shipped
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(RECIPES_DIR, "*.yaml")))
    raise RecipeError(f"recipe {path!r} not found: give a YAML file or one of {names}")


def _number(value, what: str, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RecipeError(f"{path}: {what} must be a number, not {value!r}")
    try:
        return float(value)
    except ValueError:
        raise RecipeError(f"{path}: {what} must be a number, not {value!r}") from None


def _integer(value, what: str, path: str, minimum: int) -> int:
    """A whole number >= minimum from a recipe value (YAML may give 2.0e+10 as a float or "20e9"
    as a string: a whole value in either form is accepted)."""
    try:
        number = _number(value, what, path)
    except RecipeError:
        raise RecipeError(f"{path}: {what} must be a whole number, not {value!r}") from None
    if not np.isfinite(number) or number != int(number):
        raise RecipeError(f"{path}: {what} must be a whole number, not {value!r}"
                          + (f"; use {int(number)} or {int(number) + 1}"
                             if np.isfinite(number) else ""))
    if number < minimum:
        raise RecipeError(f"{path}: {what} is {int(number)}; it must be at least {minimum}")
    return int(number)


def load_recipe(path: str, data_root: Optional[str] = None, seq_length: Optional[int] = None,
                seed: Optional[int] = None, total_tokens: Optional[int] = None,
                num_sequences: Optional[int] = None) -> Recipe:
    """Parse and check a recipe; keyword arguments override the file's values (either size
    given on the command line replaces both of the file's)."""
    import yaml

    path = resolve_recipe_path(path)
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise RecipeError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise RecipeError(f"{path}: a recipe is a mapping with a non-empty 'sources' list")
    unknown = set(raw) - RECIPE_KEYS
    if unknown:
        raise RecipeError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(RECIPE_KEYS)}")
    sources = []
    for i, entry in enumerate(raw["sources"]):
        if not isinstance(entry, dict) or "path" not in entry or "weight" not in entry:
            raise RecipeError(f"{path}: source {i + 1} needs at least 'path' and 'weight'")
        unknown = set(entry) - SOURCE_KEYS
        if unknown:
            raise RecipeError(f"{path}: source {i + 1} has unknown keys {sorted(unknown)}; "
                              f"known: {sorted(SOURCE_KEYS)}")
        weight = _number(entry["weight"], f"weight of source {i + 1}", path)
        if weight < 0 or not np.isfinite(weight):
            raise RecipeError(f"{path}: weight of source {i + 1} is {weight}; weights are >= 0")
        source = Source(name=str(entry.get("name", entry["path"])), path=str(entry["path"]),
                        weight=weight, long=bool(entry.get("long", False)),
                        min_doc_tokens=_integer(entry.get("min_doc_tokens", 0),
                                                f"min_doc_tokens of source {i + 1}", path, 0),
                        prepacked=bool(entry.get("prepacked", False)))
        if source.prepacked and (source.long or source.min_doc_tokens):
            raise RecipeError(f"{path}: source {i + 1} is prepacked: its sequences are stored "
                              f"as they are, so 'long' and 'min_doc_tokens' do not apply; drop "
                              f"them or 'prepacked'")
        sources.append(source)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise RecipeError(f"{path}: source names must be unique, got {names}")
    weight_sum = sum(s.weight for s in sources)
    if not weight_sum > 0:
        raise RecipeError(f"{path}: the source weights sum to {weight_sum}; they must sum to a "
                          f"positive number")
    if seq_length is not None:
        length = _integer(seq_length, "--seq-length", path, 1)
    elif "seq_length" not in raw:
        raise RecipeError(f"{path}: seq_length (tokens per sequence) is missing; add it or pass "
                          f"--seq-length")
    else:
        length = _integer(raw["seq_length"], "seq_length", path, 1)
    seed_value = (_integer(seed, "--seed", path, 0) if seed is not None
                  else _integer(raw.get("seed", 0), "seed", path, 0))
    if raw.get("total_tokens") is not None and raw.get("num_sequences") is not None:
        raise RecipeError(f"{path}: give the mixture's size once: num_sequences or "
                          f"total_tokens, not both")
    total = count = None
    if total_tokens is not None and num_sequences is not None:
        raise RecipeError(f"{path}: give --total-tokens or --num-sequences, not both")
    if total_tokens is not None:
        total = _integer(total_tokens, "--total-tokens", path, length)
    elif num_sequences is not None:
        count = _integer(num_sequences, "--num-sequences", path, 1)
    elif raw.get("total_tokens") is not None:
        total = _integer(raw["total_tokens"], "total_tokens", path, length)
    elif raw.get("num_sequences") is not None:
        count = _integer(raw["num_sequences"], "num_sequences", path, 1)
    root = data_root or raw.get("data_root") or "."
    return Recipe(path=os.path.abspath(path), name=str(raw.get("name", os.path.basename(path))),
                  seq_length=length, seed=seed_value, sources=sources, total_tokens=total,
                  data_root=os.path.abspath(root), num_sequences=count)


def fit_to_run(recipe: Recipe, train_steps: int, global_batch: int, where: str) -> Recipe:
    """The recipe sized for a training run of train_steps x global_batch sequences.

    A recipe without a size draws exactly that many (ProLong's epoch is steps x batch); one
    whose size is smaller is refused, since the trainer would read its start a second time.
    `where` names the training config in messages.
    """
    needed = train_steps * global_batch
    have = recipe.sequences
    if have is None:
        return replace(recipe, num_sequences=needed, total_tokens=None)
    if have < needed:
        short = needed - have
        raise RecipeError(
            f"{recipe.path}: the mixture holds {have:,} sequences of {recipe.seq_length:,} "
            f"tokens, but {where} trains on {train_steps:,} steps x {global_batch:,} = "
            f"{needed:,}: {short:,} sequences ({short * recipe.seq_length:,} tokens, "
            f"{short / needed:.1%} of the run) short, which the run would see twice. Set "
            f"num_sequences: {needed} in the recipe (and drop total_tokens), or pass "
            f"--num-sequences {needed}")
    return recipe


def source_prefix(recipe: Recipe, source: Source) -> str:
    return os.path.normpath(os.path.join(recipe.data_root, source.path))


def _file_identity(path: str) -> dict:
    # Size, mtime and a hash of the first and last MiB: cheap for 100 GB inputs, and any
    # rewrite of an .idx changes its size, its header or its tail.
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if stat.st_size > 1 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read())
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def recipe_hash(recipe: Recipe) -> str:
    """Hash of everything the built index depends on: the recipe and each input's identity."""
    inputs = {}
    for source in recipe.sources:
        prefix = source_prefix(recipe, source)
        for path in (idx_path(prefix), bin_path(prefix)):
            if not os.path.exists(path):
                raise RecipeError(f"{recipe.path}: source {source.name!r}: {path} does not "
                                  f"exist (set --data-root or the recipe's data_root)")
        inputs[source.name] = {"idx": _file_identity(idx_path(prefix)),
                               "bin_bytes": os.path.getsize(bin_path(prefix))}
    key = {"sources": [asdict(s) for s in recipe.sources], "inputs": inputs,
           "seq_length": recipe.seq_length, "seed": recipe.seed,
           "total_tokens": recipe.total_tokens,
           # Only when given, so that the hashes of recipes sized by total_tokens stay as
           # they were (and their built indexes are reused).
           **({"num_sequences": recipe.num_sequences} if recipe.num_sequences is not None
              else {}),
           # 2: later epochs reshuffled; 3: tokenizer, max_token_id and prepacked sources
           "version": 3}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _megatron_helpers():
    """megatron-core's compiled dataset helpers, loaded from their file.

    `import megatron.core.datasets.helpers_cpp` would run megatron/core/__init__.py, which
    imports torch and optimizer code for seconds; the extension itself needs none of it.
    """
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("megatron-core is not installed: pip install 'megatron-core>=0.16.1'")
    for root in spec.submodule_search_locations:
        found = glob.glob(os.path.join(root, "core", "datasets", "helpers_cpp*.so"))
        if found:
            loader = importlib.machinery.ExtensionFileLoader("helpers_cpp", found[0])
            module = importlib.util.module_from_spec(
                importlib.util.spec_from_loader("helpers_cpp", loader))
            loader.exec_module(module)
            return module
    raise ImportError("megatron-core is installed without its compiled helpers_cpp extension")


def blend(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, running sample count within that source) for `size` training samples."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    source_index = np.zeros(size, dtype=np.int16)
    source_sample = np.zeros(size, dtype=np.int64)
    _megatron_helpers().build_blending_indices(source_index, source_sample, weights,
                                               len(weights), size, False)
    return source_index, source_sample


def _source_rng(seed: int, name: str, epoch: int = 0) -> np.random.Generator:
    # Keyed by name, so adding or reordering sources does not reshuffle the others.
    key = [seed, zlib.crc32(name.encode())] + ([epoch] if epoch else [])
    return np.random.default_rng(key)


def epoch_sequence_order(first_epoch: np.ndarray, draws: np.ndarray, seed: int,
                         name: str) -> np.ndarray:
    """The source sequence for each of a source's draws (0, 1, 2, ...).

    The first pass follows `first_epoch`; every later pass over the source is a new permutation
    (keyed by seed, source name and pass), as Megatron's GPTDataset does across epochs, so that a
    repeated source does not show the model the same sequence order twice.
    """
    count = len(first_epoch)
    if count == 0:
        return np.zeros(len(draws), dtype=np.int64)
    epochs, within = np.divmod(np.asarray(draws, dtype=np.int64), count)
    result = np.empty(len(draws), dtype=np.int64)
    for epoch in np.unique(epochs):
        permutation = (first_epoch if epoch == 0
                       else _source_rng(seed, name, int(epoch)).permutation(count))
        selected = epochs == epoch
        result[selected] = permutation[within[selected]]
    return result


def _check_prepacked(recipe: Recipe, source: Source, prefix: str, lengths: np.ndarray,
                     packed) -> None:
    """Every sequence boundary of a prepacked source falls between two documents."""
    boundaries = packed.sequences[:, 0]
    at = np.searchsorted(packed.starts, boundaries)
    crossing = np.flatnonzero(packed.starts[np.minimum(at, len(packed.starts) - 1)] != boundaries)
    if len(crossing):
        position = int(boundaries[crossing[0]])
        document = int(np.searchsorted(packed.starts, position, side="right")) - 1
        raise RecipeError(
            f"{recipe.path}: source {source.name!r} ({prefix}) is prepacked, but its document "
            f"{document} ({int(lengths[document]):,} tokens) crosses token {position:,}, a "
            f"boundary of {recipe.seq_length:,}-token sequences: it was packed at another "
            f"length (ProLong's data: 65,536 or 524,288). Set seq_length to that length, or "
            f"drop 'prepacked'")


def build_mixture(recipe: Recipe, output: str, log=print) -> dict:
    """Build (or reuse, when its hash matches) the packed dataset of `recipe` in `output`.

    Returns the metadata, with "reused": True when the cached index was kept. Raises
    RecipeError, before writing anything, for an output that cannot be written, a source that
    is missing or yields no sequence, or sources of different tokenizers.
    """
    check_output_location(output, "--output")
    key = recipe_hash(recipe)
    datasets = [DatasetTokens.of(source_prefix(recipe, s), f"source {s.name!r}")
                for s in recipe.sources]
    try:
        tokenizer = check_one_tokenizer(datasets, "Mix")
    except MixedTokenizersError as error:
        raise RecipeError(f"{recipe.path}: {error}") from None
    metadata_path = os.path.join(output, METADATA_FILE)
    if os.path.exists(metadata_path):
        with open(metadata_path) as f:
            cached = json.load(f)
        if cached.get("hash") == key:
            log(f"reusing the packed index in {output} (hash {key})")
            return {**cached, "reused": True}
    start = time.perf_counter()
    L = recipe.seq_length
    built = []
    for source in recipe.sources:
        prefix = source_prefix(recipe, source)
        reader = IndexedReader(prefix)
        lengths = np.asarray(reader.lengths, dtype=np.int64)
        rng = _source_rng(recipe.seed, source.name)
        if source.prepacked:
            candidates = documents = np.arange(len(lengths))
            packed = pack_concatenated(lengths, L)
            _check_prepacked(recipe, source, prefix, lengths, packed)
        else:
            if source.long:
                candidates = np.flatnonzero(lengths >= L)
            else:
                candidates = np.flatnonzero(lengths >= max(source.min_doc_tokens, 1))
            documents = rng.permutation(candidates)
            packed = (split_long if source.long else pack_concatenated)(lengths[documents], L)
        order = rng.permutation(len(packed.sequences))
        built.append((source, prefix, documents, packed, order, len(lengths) - len(candidates),
                      int(lengths.sum() - lengths[candidates].sum())))
    weights = np.array([s.weight for s in recipe.sources])
    available = np.array([len(b[3].sequences) for b in built])
    for (source, prefix, *_), count in zip(built, available):
        if source.weight > 0 and count == 0:
            raise RecipeError(
                f"{recipe.path}: source {source.name!r} ({prefix}) yields no sequence of {L} "
                f"tokens{' (no document is that long)' if source.long else ''}")
    if recipe.sequences is not None:
        size = recipe.sequences
    else:  # one pass: stop when the first source would have to repeat a sequence
        share = weights / weights.sum()
        size = int(min(available[share > 0] / share[share > 0]))
    source_index, source_sample = blend(weights, size)
    order = np.empty((size, 2), dtype=np.int64)
    order[:, 0] = source_index
    infos = []
    for k, (source, prefix, documents, packed, seq_order, filtered_docs, filtered_tokens) in enumerate(built):
        mine = source_index == k
        order[mine, 1] = epoch_sequence_order(seq_order, source_sample[mine], recipe.seed,
                                              source.name)
        drawn = int(mine.sum())
        infos.append({
            "name": source.name, "prefix": prefix, "weight": source.weight, "long": source.long,
            "min_doc_tokens": source.min_doc_tokens, "prepacked": source.prepacked, "documents_in_input": int(len(IndexedReader(prefix))),
            "documents_packed": int(len(packed.kept) - packed.dropped_documents),
            "documents_filtered": filtered_docs, "tokens_filtered": filtered_tokens,
            "tokens_dropped_by_packing": packed.dropped_tokens,
            "sequences_available": int(len(packed.sequences)), "sequences_drawn": drawn,
            "tokens_drawn": drawn * L,
            "epochs": round(drawn / max(len(packed.sequences), 1), 4),
        })
    # The sources' largest ids: every document of a dataset comes from its one tokenizer, so
    # this is what the model's vocabulary must cover (mix sequences hold no padding).
    drawn_max = [d.largest_token_id() for d, info in zip(datasets, infos)
                 if info["sequences_drawn"]]
    drawn_max = [m for m in drawn_max if m is not None]
    metadata = {
        "recipe": recipe.name, "recipe_path": recipe.path, "hash": key,
        "seq_length": L, "seed": recipe.seed, "num_sequences": size,
        "total_tokens": size * L, "pad_id": 0, "tokenizer": tokenizer,
        "max_token_id": max(drawn_max) if drawn_max else None,
        "tokens_per_source": {info["name"]: info["tokens_drawn"] for info in infos},
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    write_packed(output, metadata, [(info, b[2], b[3]) for info, b in zip(infos, built)], order)
    log(f"built {size:,} sequences of {L:,} tokens in {output} ({metadata['build_seconds']} s)")
    return {**metadata, "sources": infos, "reused": False}
