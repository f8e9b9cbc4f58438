"""mix: recipes, PackedDataset contents, determinism, caching, windows for context parallelism."""
import os
from pathlib import Path

import numpy as np
import pytest

from data_tools_helpers import (PROLONG_512K_FOLDERS, PROLONG_64K_FOLDERS,
                                expected_stream_tokens, write_recipe)
from data_tools.indexed import IndexedReader, IndexedWriter
from data_tools.mixture import RecipeError, build_mixture, load_recipe
from data_tools.packed_dataset import PackedDataset

L = 2048


def _sources():
    return [{"name": "code", "path": "code", "weight": 0.6, "long": True},
            {"name": "docs", "path": "docs", "weight": 0.4}]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, sample_datasets):
    root = tmp_path_factory.mktemp("mix")
    recipe = load_recipe(write_recipe(root / "r.yaml", L, _sources()),
                         data_root=sample_datasets["root"])
    metadata = build_mixture(recipe, str(root / "packed"), log=lambda *_: None)
    return recipe, metadata, PackedDataset(str(root / "packed"))


def test_every_sequence_is_l_tokens_with_boundaries_and_matches_the_source_stream(mixed,
                                                                                  sample_datasets):
    recipe, metadata, ds = mixed
    assert ds.seq_length == L and len(ds) == metadata["num_sequences"] > 0
    code, docs = IndexedReader(sample_datasets["code"]), IndexedReader(sample_datasets["docs"])
    documents = {name: np.load(os.path.join(ds.path, f"source{k}.documents.npy"))
                 for k, name in enumerate(("code", "docs"))}
    streams = {"docs": expected_stream_tokens(docs, documents["docs"])}
    for i in range(len(ds)):
        seq = ds[i]
        assert seq.tokens.shape == (L,) and seq.loss_mask is None
        assert seq.doc_lengths.dtype == np.int32 and seq.doc_lengths.sum() == L
        source = ds.source_of(i)
        if source == "code":  # a long document: one piece, cut at a multiple of L
            assert seq.doc_lengths.tolist() == [L]
            assert any(_is_aligned_piece(code, d, seq.tokens) for d in documents["code"])
        else:
            j = int(ds._order[i, 1])
            assert np.array_equal(seq.tokens, streams["docs"][j * L:(j + 1) * L])
            # boundaries are where EOS (128001) ends a document
            ends = np.cumsum(seq.doc_lengths)[:-1] - 1
            assert np.all(seq.tokens[ends] == 128001)


def _is_aligned_piece(reader, doc, tokens):
    full = np.asarray(reader[int(doc)])
    return any(np.array_equal(full[k:k + L], tokens) for k in range(0, len(full) - L + 1, L))


def test_weights_and_metadata(mixed):
    recipe, metadata, ds = mixed
    counts = {name: sum(ds.source_of(i) == name for i in range(len(ds))) for name in ("code", "docs")}
    assert abs(counts["code"] / len(ds) - 0.6) < 1.0 / len(ds) + 1e-9
    assert ds.metadata["tokens_per_source"] == {k: v * L for k, v in counts.items()}
    assert ds.metadata["seed"] == 1 and ds.metadata["recipe"] == "test"
    # one pass by default: the scarcer source (docs) is used exactly once, nothing repeats
    docs_info = ds.metadata["sources"][1]
    assert docs_info["sequences_drawn"] == docs_info["sequences_available"]
    pairs = {tuple(row) for row in np.asarray(ds._order)}
    assert len(pairs) == len(ds)


def test_windows_read_only_their_tokens_and_clip_boundaries(mixed):
    _, _, ds = mixed
    i = next(i for i in range(len(ds)) if len(ds[i].doc_lengths) > 3)
    full = ds[i]
    for start, end in ((0, L), (0, 512), (512, 1536), (L - 1, L), (700, 700)):
        window = ds.get(i, start, end)
        assert np.array_equal(window.tokens, full.tokens[start:end])
        bounds = np.concatenate([[0], np.cumsum(full.doc_lengths)])
        cuts = np.unique(np.clip(bounds, start, end)) - start
        assert window.doc_lengths.tolist() == np.diff(cuts).tolist()
    with pytest.raises(IndexError):
        ds.get(i, 10, L + 1)


def test_deterministic_for_a_seed_cached_and_rebuilt_when_inputs_change(tmp_path,
                                                                        sample_datasets, mixed):
    _, _, first = mixed
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", L, _sources()),
                         data_root=sample_datasets["root"])
    build_mixture(recipe, str(tmp_path / "a"), log=lambda *_: None)
    again = PackedDataset(str(tmp_path / "a"))
    assert len(again) == len(first)
    assert all(np.array_equal(again[i].tokens, first[i].tokens) for i in range(len(first)))
    assert build_mixture(recipe, str(tmp_path / "a"), log=lambda *_: None)["reused"] is True
    other = load_recipe(write_recipe(tmp_path / "r2.yaml", L, _sources(), seed=2),
                        data_root=sample_datasets["root"])
    assert build_mixture(other, str(tmp_path / "a"), log=lambda *_: None)["reused"] is False
    reseeded = PackedDataset(str(tmp_path / "a"))
    assert not all(np.array_equal(reseeded[i].tokens, first[i].tokens) for i in range(len(first)))


def test_total_tokens_repeats_sources_in_proportion(tmp_path, sample_datasets):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", L, _sources(), total_tokens=300 * L),
                         data_root=sample_datasets["root"])
    metadata = build_mixture(recipe, str(tmp_path / "p"), log=lambda *_: None)
    assert metadata["num_sequences"] == 300
    assert metadata["tokens_per_source"] == {"code": 180 * L, "docs": 120 * L}
    assert len(PackedDataset(str(tmp_path / "p"))) == 300


def test_each_pass_over_a_repeated_source_is_a_new_permutation(tmp_path, sample_datasets):
    # docs (the short source) is drawn ~3 times over: each pass holds every one of its sequences
    # exactly once, and no two passes share an order; rebuilding gives the same order again.
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", L, _sources(), total_tokens=600 * L),
                         data_root=sample_datasets["root"])
    metadata = build_mixture(recipe, str(tmp_path / "p"), log=lambda *_: None)
    docs = next(s for s in metadata["sources"] if s["name"] == "docs")
    count = docs["sequences_available"]
    assert docs["epochs"] > 2
    order = np.load(str(tmp_path / "p" / "order.npy"))
    k = [s["name"] for s in metadata["sources"]].index("docs")
    drawn = order[order[:, 0] == k, 1]
    passes = [drawn[i:i + count] for i in range(0, 2 * count + 1, count)][:3]
    for one in passes[:2]:
        assert sorted(one.tolist()) == list(range(count))
    assert not np.array_equal(passes[0], passes[1])
    third = passes[2]
    assert len(set(third.tolist())) == len(third)
    assert len(third) < 2 or not np.array_equal(third, passes[1][:len(third)])
    build_mixture(recipe, str(tmp_path / "q"), log=lambda *_: None)
    assert np.array_equal(np.load(str(tmp_path / "q" / "order.npy")), order)


def test_recipe_errors_name_the_file(tmp_path, sample_datasets):
    zero = [{"path": "code", "weight": 0}, {"path": "docs", "weight": 0.0}]
    path = write_recipe(tmp_path / "zero.yaml", L, zero)
    with pytest.raises(RecipeError, match=r"zero.yaml: the source weights sum to 0.0"):
        load_recipe(path)
    path = write_recipe(tmp_path / "neg.yaml", L, [{"path": "code", "weight": -1}])
    with pytest.raises(RecipeError, match="neg.yaml: weight of source 1 is -1.0"):
        load_recipe(path)
    path = write_recipe(tmp_path / "missing.yaml", L, [{"path": "nowhere", "weight": 1}])
    with pytest.raises(RecipeError, match="missing.yaml: source 'nowhere'.*does not exist"):
        build_mixture(load_recipe(path, data_root=str(tmp_path)), str(tmp_path / "o"))
    path = write_recipe(tmp_path / "long.yaml", 10 ** 6, [{"path": "code", "weight": 1,
                                                           "long": True}])
    with pytest.raises(RecipeError, match="long.yaml: source 'code'.*no document is that long"):
        build_mixture(load_recipe(path, data_root=sample_datasets["root"]), str(tmp_path / "o"))


def _stage_config(path, train_steps, global_batch):
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump({"train_steps": train_steps, "data": {"global_batch": global_batch}}, f)
    return str(path)


def test_mixture_built_from_a_stage_config_holds_steps_times_batch(tmp_path, sample_datasets):
    """No size in the recipe: --train-config draws exactly train_steps x global_batch
    sequences (more than one pass here, so the count is not the one-pass default)."""
    from data_tools.cli import main

    config = _stage_config(tmp_path / "stage.yaml", 37, 8)
    recipe = write_recipe(tmp_path / "r.yaml", L, _sources())
    out = tmp_path / "packed"
    assert main(["mix", recipe, "--output", str(out), "--data-root", sample_datasets["root"],
                 "--train-config", config]) == 0
    assert len(PackedDataset(str(out))) == 37 * 8
    one_pass = build_mixture(load_recipe(recipe, data_root=sample_datasets["root"]),
                             str(tmp_path / "one"), log=lambda *_: None)
    assert one_pass["num_sequences"] < 37 * 8


def test_mix_refuses_a_recipe_smaller_than_the_run(tmp_path, sample_datasets, capsys):
    from data_tools.cli import main

    config = _stage_config(tmp_path / "stage.yaml", 10, 8)
    recipe = write_recipe(tmp_path / "r.yaml", L, _sources(), total_tokens=75 * L)
    out = tmp_path / "packed"
    assert main(["mix", recipe, "--output", str(out), "--data-root", sample_datasets["root"],
                 "--train-config", config]) == 2
    err = capsys.readouterr().err
    assert "holds 75 sequences" in err and "10 steps x 8 = 80: 5 sequences" in err
    assert "num_sequences: 80" in err and not out.exists()
    # A recipe at least as large as the run is kept as it is.
    big = write_recipe(tmp_path / "big.yaml", L, _sources(), num_sequences=90)
    assert main(["mix", big, "--output", str(out), "--data-root", sample_datasets["root"],
                 "--train-config", config]) == 0
    assert len(PackedDataset(str(out))) == 90


def test_recipe_size_is_given_once(tmp_path):
    both = write_recipe(tmp_path / "both.yaml", L, _sources(), total_tokens=10 * L,
                        num_sequences=10)
    with pytest.raises(RecipeError, match="both.yaml: give the mixture's size once"):
        load_recipe(both)


@pytest.mark.parametrize("recipe, config", [
    ("prolong-stage1-64k", "prolong-stage1-64k"), ("prolong-stage1-64k-raw", "prolong-stage1-64k"),
    ("prolong-stage2-512k", "prolong-stage2-512k"),
    ("prolong-stage2-512k-raw", "prolong-stage2-512k")])
def test_shipped_recipes_draw_what_their_stage_trains(recipe, config):
    """ProLong's epoch is steps x batch: the shipped recipes draw exactly that, so no sequence
    of a stage is read twice and none is built for nothing."""
    from data_tools.mixture import fit_to_run
    from engine.training.config import load_config

    configs = Path(__file__).resolve().parents[2] / "engine" / "configs"
    stage = load_config([str(configs / f"{config}.yaml")])
    loaded = load_recipe(recipe)
    assert loaded.sequences == stage.train_steps * stage.data.global_batch
    assert fit_to_run(loaded, stage.train_steps, stage.data.global_batch, config) is loaded


def test_shipped_prolong_recipes():
    stage1 = load_recipe("prolong-stage1-64k")
    assert stage1.seq_length == 65536 and stage1.num_sequences == 5000 * 64
    weights = {s.name: s.weight for s in stage1.sources}
    assert weights == {"stack-repos": 0.3, "books": 0.3, "fineweb-edu": 0.1, "fineweb": 0.1,
                       "stackexchange": 0.04, "wikipedia": 0.04, "tulu-v2": 0.03, "arxiv": 0.03,
                       "openwebmath": 0.03, "textbooks": 0.03}
    assert {s.name: s.path for s in stage1.sources} == PROLONG_64K_FOLDERS
    stage2 = load_recipe("prolong-stage2-512k")
    assert stage2.seq_length == 524288
    w2 = {s.name: s.weight for s in stage2.sources}
    assert (w2["stack-repos-512k"], w2["stack-repos-64k"], w2["books-512k"], w2["books-64k"]) == \
        (0.15, 0.15, 0.05, 0.25)
    assert abs(sum(w2.values()) - 1.0) < 1e-9
    assert {s.name: s.path for s in stage2.sources} == PROLONG_512K_FOLDERS
    # ProLong's release is filtered and packed already: every source is taken as stored.
    for source in stage1.sources + stage2.sources:
        assert source.prepacked and not source.long and source.min_doc_tokens == 0


def test_shipped_raw_recipes_keep_the_weights_and_filter_long_sources():
    """The -raw recipes: the same weights over sources a user tokenized, long ones cut at L."""
    for stage in ("stage1-64k", "stage2-512k"):
        raw, released = load_recipe(f"prolong-{stage}-raw"), load_recipe(f"prolong-{stage}")
        assert raw.seq_length == released.seq_length
        assert {s.name: s.weight for s in raw.sources} == {
            s.name: s.weight for s in released.sources}
        assert not any(s.prepacked for s in raw.sources)
        assert {s.name for s in raw.sources if s.long or s.min_doc_tokens} >= {
            "stack-repos" if stage == "stage1-64k" else "stack-repos-512k"}


def test_prepacked_source_keeps_stored_sequences(tmp_path):
    """Each stored L-token run of documents is one sequence, with its document boundaries."""
    L = 12
    lengths = [5, 7, 12, 1, 4, 7, 12, 3, 9]  # three-by-three: each group sums to L
    tokens = np.arange(sum(lengths), dtype=np.int32) % 1000
    with IndexedWriter(str(tmp_path / "packed-src"), np.int32) as writer:
        writer.add_documents(tokens, np.array(lengths))
    path = write_recipe(tmp_path / "r.yaml", L, [{"name": "p", "path": "packed-src", "weight": 1,
                                                  "prepacked": True}])
    build_mixture(load_recipe(path, data_root=str(tmp_path)), str(tmp_path / "out"),
                  log=lambda *_: None)
    ds = PackedDataset(str(tmp_path / "out"))
    stored = {tuple(tokens[i * L:(i + 1) * L]) for i in range(5)}
    seen = {tuple(ds[i].tokens.tolist()): ds[i].doc_lengths.tolist() for i in range(len(ds))}
    assert len(ds) == 5 and set(seen) == stored
    assert sorted(seen.values()) == sorted([[5, 7], [12], [1, 4, 7], [12], [3, 9]])

    path = write_recipe(tmp_path / "bad.yaml", 10, [{"name": "p", "path": "packed-src",
                                                     "weight": 1, "prepacked": True}])
    with pytest.raises(RecipeError, match=r"bad.yaml: source 'p' .*is prepacked, but its document "
                                          r"1 \(7 tokens\) crosses token 10.*Set seq_length"):
        build_mixture(load_recipe(path, data_root=str(tmp_path)), str(tmp_path / "o2"))
    path = write_recipe(tmp_path / "both.yaml", L, [{"path": "packed-src", "weight": 1,
                                                     "prepacked": True, "long": True}])
    with pytest.raises(RecipeError, match="both.yaml: source 1 is prepacked.*'long'"):
        load_recipe(path)
