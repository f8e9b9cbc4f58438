"""import-mds: ProLong's released data (MDS shards, mosaicml-streaming) -> indexed dataset.

The fixtures under fixtures/mds were written by the library's own MDSWriter
(fixtures/make_mds_fixtures.py); expected.json holds the arrays it was given.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_tools.cli import main
from data_tools.indexed import IndexedReader
from data_tools.packed_dataset import PackedDataset
from data_tools.tokenizer import LLAMA3_VOCABULARY_FINGERPRINT, llama3_vocabulary
from data_tools_helpers import (PROLONG_512K_FOLDERS, PROLONG_64K_FOLDERS, write_mds_part,
                                write_recipe)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mds")
SCRIPT = os.path.join(os.path.dirname(FIXTURES), "make_mds_fixtures.py")
SAMPLE_TOKENS = 128

with open(os.path.join(FIXTURES, "expected.json")) as _f:
    EXPECTED = json.load(_f)


def expected_documents(samples):
    """The token ids of every non-empty [start, end) range, in sample order."""
    return [sample["input_ids"][start:end] for sample in samples
            for start, end in sample["indices"] if end > start]


def documents_of(prefix):
    reader = IndexedReader(str(prefix))
    return [np.asarray(reader[i]).tolist() for i in range(len(reader))]


def run_import(capsys, source, prefix, *extra):
    code = main(["import-mds", str(source), "--output-prefix", str(prefix), "--quiet", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_two_part_source_imports_every_range_in_part_order(tmp_path, capsys):
    code, out, _ = run_import(capsys, os.path.join(FIXTURES, "fineweb-edu"), tmp_path / "fw")
    assert code == 0
    parts = EXPECTED["fineweb-edu"]
    samples = parts["proc00-64"] + parts["proc01-64"]
    expected = expected_documents(samples)
    assert documents_of(tmp_path / "fw") == expected
    assert len(expected) == 46 and sum(map(len, expected)) == 14 * SAMPLE_TOKENS
    reader = IndexedReader(str(tmp_path / "fw"))
    assert np.dtype(reader.dtype) == np.int32
    assert 128255 in np.asarray(reader.tokens) and 65536 in np.asarray(reader.tokens)
    summary = json.load(open(tmp_path / "fw.summary.json"))
    assert summary["documents"] == 46 and summary["tokens"] == 14 * SAMPLE_TOKENS
    assert summary["parts"] == ["proc00-64", "proc01-64"]
    assert summary["shards"] == 7 and summary["samples"] == 14
    assert summary["sample_tokens"] == {"min": SAMPLE_TOKENS, "max": SAMPLE_TOKENS}
    assert summary["empty_ranges"] == 0 and summary["uncovered_tokens"] == 0
    assert summary["domains"] == {"fixture": 14} and summary["dtype"] == "int32"
    assert summary["tokenizer"] == {"kind": "llama3", "path": None, "vocab_size": 128256,
                                    "bos_id": 128000, "eos_id": 128001,
                                    **llama3_vocabulary()}
    assert summary["tokenizer"]["vocabulary_fingerprint"] == LLAMA3_VOCABULARY_FINGERPRINT
    assert summary["columns"] == {"domain": "str", "indices": "ndarray:uint32",
                                  "input_ids": "ndarray:uint32", "length": "int"}
    assert summary["seconds"] >= 0
    assert "wrote 46 documents, 1,792 tokens" in out and "7 shards, 14 samples" in out


def test_one_part_folder(tmp_path, capsys):
    code, _, _ = run_import(capsys, os.path.join(FIXTURES, "fineweb-edu", "proc01-64"),
                            tmp_path / "p1")
    assert code == 0
    assert documents_of(tmp_path / "p1") == expected_documents(EXPECTED["fineweb-edu"]["proc01-64"])
    summary = json.load(open(tmp_path / "p1.summary.json"))
    assert summary["parts"] == ["proc01-64"] and summary["shards"] == 3


def test_parts_are_read_in_numeric_order(tmp_path, capsys):
    # proc2 before proc10, which a name sort would put first.
    source = tmp_path / "src"
    shutil.copytree(os.path.join(FIXTURES, "fineweb-edu", "proc01-64"), source / "proc2-16")
    shutil.copytree(os.path.join(FIXTURES, "fineweb-edu", "proc00-64"), source / "proc10-16")
    (source / "notes").mkdir()  # not a part: ignored
    code, _, _ = run_import(capsys, source, tmp_path / "o")
    assert code == 0
    parts = EXPECTED["fineweb-edu"]
    assert documents_of(tmp_path / "o") == expected_documents(parts["proc01-64"] +
                                                              parts["proc00-64"])
    assert json.load(open(tmp_path / "o.summary.json"))["parts"] == ["proc2-16", "proc10-16"]


def test_gaps_empty_ranges_and_no_length_column(tmp_path, capsys):
    code, _, _ = run_import(capsys, os.path.join(FIXTURES, "part-without-length"), tmp_path / "g")
    assert code == 0
    samples = EXPECTED["part-without-length"]["part-without-length"]
    assert documents_of(tmp_path / "g") == expected_documents(samples)
    summary = json.load(open(tmp_path / "g.summary.json"))
    # (0,10) (20,60) (60,60) (70,100) of 100 | (5,37) of 37 | (0,1) (3,4) (10,63) of 64
    assert summary["documents"] == 7 and summary["empty_ranges"] == 1
    assert summary["uncovered_tokens"] == (10 + 10) + 5 + (2 + 6 + 1)
    assert summary["tokens"] == 201 - summary["uncovered_tokens"]
    assert summary["shards"] == 4 and summary["samples"] == 3  # MDSWriter left shard 0 empty
    assert summary["sample_tokens"] == {"min": 37, "max": 100}


def test_other_column_encodings(tmp_path, capsys):
    """A static shape, a per-sample dtype (int64 indices), a uint32 length, skipped columns."""
    code, _, _ = run_import(capsys, os.path.join(FIXTURES, "other-encodings"), tmp_path / "e")
    assert code == 0
    assert documents_of(tmp_path / "e") == expected_documents(
        EXPECTED["other-encodings"]["other-encodings"])


def test_tokenizer_is_recorded_for_inspect(tmp_path, capsys, llama3_model):
    code, _, _ = run_import(capsys, os.path.join(FIXTURES, "fineweb-edu", "proc01-64"),
                            tmp_path / "t", "--tokenizer", llama3_model)
    assert code == 0
    summary = json.load(open(tmp_path / "t.summary.json"))
    assert summary["tokenizer"]["path"] == os.path.abspath(llama3_model)
    assert summary["tokenizer"]["vocab_size"] == 128256
    assert main(["inspect", str(tmp_path / "t"), "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    first_document = expected_documents(EXPECTED["fineweb-edu"]["proc01-64"])[1]
    assert shown["ids"] == first_document[:16] and shown["text"].startswith("<|begin_of_text|>")


# --- bad input: exit code 2, the message names the shard (and sample) and the fix, no output --

def _copy_source(tmp_path):
    source = tmp_path / "fineweb-edu"
    shutil.copytree(os.path.join(FIXTURES, "fineweb-edu"), source)
    return source


def _edit_index(part, edit):
    path = part / "index.json"
    index = json.load(open(path))
    edit(index["shards"])
    json.dump(index, open(path, "w"))


def _replace_bytes(path, old, new):
    data = path.read_bytes()
    assert data.count(old) == 1, "the pattern must locate one place in the shard"
    path.write_bytes(data.replace(old, new))


def _truncate(source):
    shard = source / "proc01-64" / "shard.00001.mds"
    shard.write_bytes(shard.read_bytes()[:-100])


def _truncate_and_fix_index(source):
    # index.json agrees with the cut file: the shard's own offsets give it away.
    shard = source / "proc01-64" / "shard.00001.mds"
    shard.write_bytes(shard.read_bytes()[:-100])
    _edit_index(source / "proc01-64", lambda shards: shards[1]["raw_data"].update(
        bytes=shard.stat().st_size))


def _drop_indices_column(source):
    def edit(shards):
        entry = shards[2]
        at = entry["column_names"].index("indices")
        for key in ("column_names", "column_encodings", "column_sizes"):
            del entry[key][at]
    _edit_index(source / "proc00-64", edit)


def _wrong_size(source):
    _edit_index(source / "proc00-64", lambda shards: shards[1]["raw_data"].update(
        bytes=shards[1]["raw_data"]["bytes"] + 8))


def _wrong_sample_count(source):
    _edit_index(source / "proc01-64", lambda shards: shards[0].update(samples=3))


def _wrong_encoding(source):
    # index.json says int32 ids, the shard's own settings say uint32.
    _edit_index(source / "proc01-64", lambda shards: shards[2]["column_encodings"].__setitem__(
        2, "ndarray:int32"))


def _range_past_the_end(source):
    # proc00-64 sample 3 (shard 1, its sample 1): ranges (0,30) (30,64) (64,127) (127,128).
    ranges = np.array(EXPECTED["fineweb-edu"]["proc00-64"][3]["indices"], np.uint32)
    bad = ranges.copy()
    bad[-1, 1] = SAMPLE_TOKENS + 5
    _replace_bytes(source / "proc00-64" / "shard.00001.mds", ranges.tobytes(), bad.tobytes())


def _overlapping_ranges(source):
    ranges = np.array(EXPECTED["fineweb-edu"]["proc00-64"][3]["indices"], np.uint32)
    bad = ranges.copy()
    bad[2, 0] = 60  # starts before the previous range ends at 64
    _replace_bytes(source / "proc00-64" / "shard.00001.mds", ranges.tobytes(), bad.tobytes())


def _id_outside_vocabulary(source):
    ids = np.array(EXPECTED["fineweb-edu"]["proc01-64"][4]["input_ids"], np.uint32)
    bad = ids.copy()
    bad[7] = 200_000
    _replace_bytes(source / "proc01-64" / "shard.00002.mds", ids.tobytes(), bad.tobytes())


def _part_without_index(source):
    (source / "proc01-64" / "index.json").unlink()


def _index_version_1(source):
    path = source / "proc00-64" / "index.json"
    index = json.load(open(path))
    index["version"] = 1
    json.dump(index, open(path, "w"))


def _compressed(source):
    _edit_index(source / "proc00-64", lambda shards: shards[0].update(compression="zstd:7"))


def _missing_shard(source):
    (source / "proc01-64" / "shard.00000.mds").unlink()


BAD_INPUTS = {
    "truncated shard": (_truncate, ["proc01-64/shard.00001.mds:", "truncated",
                                    "Download this part again"]),
    "truncated shard, index.json updated": (_truncate_and_fix_index, [
        "proc01-64/shard.00001.mds: its samples end at byte 1,419, the file is 1,319 bytes"]),
    "missing column": (_drop_indices_column, ["proc00-64/index.json: shard 2 (shard.00002.mds)",
                                              "no column indices"]),
    "size differs from index.json": (_wrong_size, ["proc00-64/shard.00001.mds:", "but shard 1 of",
                                                   "Download this part again"]),
    "sample count differs": (_wrong_sample_count, ["proc01-64/shard.00000.mds: holds 2 samples",
                                                   "says 3"]),
    "columns differ from the shard's": (_wrong_encoding, ["proc01-64/shard.00002.mds: holds "
                                                          "columns", "does not belong"]),
    "range past the end": (_range_past_the_end, ["proc00-64/shard.00001.mds: sample 1: document "
                                                 "3 has the range [127, 133)", "[0, 128]"]),
    "overlapping ranges": (_overlapping_ranges, ["proc00-64/shard.00001.mds: sample 1: document 2 "
                                                 "starts at 60, before document 1 ends at 64"]),
    "id outside the vocabulary": (_id_outside_vocabulary, ["proc01-64/shard.00002.mds: sample 0: "
                                                           "input_ids[7] is 200000",
                                                           "128,256 ids"]),
    "part without index.json": (_part_without_index, ["proc01-64: part folder without index.json"]),
    "index version": (_index_version_1, ["proc00-64/index.json: index version 1"]),
    "compressed shard": (_compressed, ["proc00-64/index.json: shard 0 (shard.00000.mds): "
                                       "compressed (zstd:7)"]),
    "missing shard": (_missing_shard, ["proc01-64/shard.00000.mds: missing"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_naming_the_shard_and_leaves_no_output(tmp_path, capsys, case):
    source = _copy_source(tmp_path)
    damage, expected = BAD_INPUTS[case]
    damage(source)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_import(capsys, source, out / "fw")
    assert code == 2
    assert err.startswith("lce-data import-mds: error: ")
    for text in expected:
        assert text in err, (text, err)
    assert sorted(os.listdir(out)) == []  # no .bin/.idx, no temporary files, no summary


def test_not_a_source_folder(tmp_path, capsys):
    code, _, err = run_import(capsys, FIXTURES, tmp_path / "o")  # holds three sources
    assert code == 2 and "no index.json and no procNN-MM/ part folders" in err
    assert "import each one separately" in err
    code, _, err = run_import(capsys, tmp_path / "nowhere", tmp_path / "o")
    assert code == 2 and "nowhere: no such folder" in err


# --- imported data mixes back into ProLong's own sequences ----------------------------------

def _sample_sequences(samples):
    """{tokens of a sample: its document lengths}."""
    return {tuple(s["input_ids"]): [e - b for b, e in s["indices"]] for s in samples}


def _mixed_sequences(folder):
    ds = PackedDataset(str(folder))
    return ds, [(tuple(ds[i].tokens.tolist()), ds[i].doc_lengths.tolist())
                for i in range(len(ds))]


def test_prepacked_mix_trains_on_the_stored_samples(tmp_path, capsys):
    assert run_import(capsys, os.path.join(FIXTURES, "fineweb-edu"), tmp_path / "fw")[0] == 0
    recipe = write_recipe(tmp_path / "r.yaml", SAMPLE_TOKENS, [
        {"name": "fw", "path": "fw", "weight": 1.0, "prepacked": True}])
    assert main(["mix", recipe, "--output", str(tmp_path / "packed"),
                 "--data-root", str(tmp_path)]) == 0
    ds, sequences = _mixed_sequences(tmp_path / "packed")
    parts = EXPECTED["fineweb-edu"]
    stored = _sample_sequences(parts["proc00-64"] + parts["proc01-64"])
    assert len(sequences) == 14 and {tokens for tokens, _ in sequences} == set(stored)
    assert all(stored[tokens] == lengths for tokens, lengths in sequences)
    assert ds.metadata["sources"][0]["tokens_dropped_by_packing"] == 0


@pytest.mark.parametrize("recipe, folders", [("prolong-stage1-64k", PROLONG_64K_FOLDERS),
                                             ("prolong-stage2-512k", PROLONG_512K_FOLDERS)])
def test_shipped_recipes_mix_imported_release_folders(tmp_path, capsys, recipe, folders):
    """Each release folder imported to --data-root/<folder name>, then the shipped recipe."""
    root = tmp_path / "data"
    for folder in set(folders.values()):
        assert run_import(capsys, os.path.join(FIXTURES, "fineweb-edu"), root / folder)[0] == 0
    assert main(["mix", recipe, "--output", str(tmp_path / "packed"), "--data-root", str(root),
                 "--seq-length", str(SAMPLE_TOKENS),
                 "--total-tokens", str(40 * SAMPLE_TOKENS)]) == 0
    ds, sequences = _mixed_sequences(tmp_path / "packed")
    parts = EXPECTED["fineweb-edu"]
    stored = _sample_sequences(parts["proc00-64"] + parts["proc01-64"])
    assert len(sequences) == 40
    assert all(stored[tokens] == lengths for tokens, lengths in sequences)
    assert set(ds.metadata["tokens_per_source"]) == set(folders)


# --- the library itself, where it is installed ----------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("streaming") is None,
                    reason="mosaicml-streaming is not installed "
                           "(see fixtures/make_mds_fixtures.py)")
def test_mdswriter_live_writes_the_committed_fixtures(tmp_path, capsys):
    result = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    committed = sorted(os.path.relpath(os.path.join(d, n), FIXTURES)
                       for d, _, names in os.walk(FIXTURES) for n in names)
    written = sorted(os.path.relpath(os.path.join(d, n), tmp_path)
                     for d, _, names in os.walk(tmp_path) for n in names)
    assert written == committed
    for name in committed:
        with open(os.path.join(FIXTURES, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    assert run_import(capsys, tmp_path / "fineweb-edu", tmp_path / "fw")[0] == 0
    parts = EXPECTED["fineweb-edu"]
    assert documents_of(tmp_path / "fw") == expected_documents(parts["proc00-64"] +
                                                               parts["proc01-64"])


# --- id and column dtypes as ProLong's releases store them (shards written here, byte by byte) --

def _prolong_sample(ids, id_encoding="ndarray:uint32:8"):
    return ({"input_ids": ids, "indices": [[0, 3], [3, 8]], "length": len(ids),
             "mask": np.ones(len(ids), np.uint8), "domain": 7},
            {"input_ids": id_encoding, "indices": "ndarray:uint32:2,2", "length": "uint64",
             "mask": "ndarray:uint8:8", "domain": "int64"})


def test_uint32_ids_uint64_lengths_and_a_uint8_mask_import(tmp_path, capsys):
    ids = [128000, 1, 2, 128255, 5, 6, 7, 2 ** 16 + 3]
    sample, encodings = _prolong_sample(ids)
    write_mds_part(tmp_path / "src", [sample, sample], encodings)
    code, _, err = run_import(capsys, tmp_path / "src", tmp_path / "out")
    assert code == 0, err
    assert documents_of(tmp_path / "out") == [ids[:3], ids[3:]] * 2


@pytest.mark.parametrize("ids, encoding, message", [
    ([1, 2, 3, 4, 5, 6, 2 ** 31 + 5, 8], "ndarray:uint32:8",
     "sample 0: input_ids[6] is 2147483653, outside the vocabulary of 128,256 ids"),
    ([1, 2, 3, 4, 5, 6, 2 ** 32 + 7, 8], "ndarray:int64:8",
     "sample 0: input_ids[6] is 4294967303, outside the vocabulary of 128,256 ids"),
    ([1, 2, 3, -1, 5, 6, 7, 8], "ndarray:int64:8",
     "sample 0: input_ids[3] is -1, outside the vocabulary of 128,256 ids"),
    ([1, 2, 3, 4, 5, 6, 7, 8], "ndarray:float32:8",
     "sample 0: input_ids is float32 of shape (8,), not a 1-D integer array"),
], ids=["uint32_above_int32", "int64_above_uint32", "int64_negative", "float32"])
def test_ids_are_checked_in_their_stored_dtype(tmp_path, capsys, ids, encoding, message):
    """The vocabulary check sees the ids as stored: a cast to int32 first would report
    2^31+5 as negative, wrap an int64 id into the vocabulary, and accept float ids."""
    sample, encodings = _prolong_sample(ids, encoding)
    write_mds_part(tmp_path / "src", [sample], encodings)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_import(capsys, tmp_path / "src", out / "ids")
    assert code == 2, f"ids {ids} stored as {encoding} were imported"
    assert message in err, f"expected {message!r} in {err!r}"
    assert os.listdir(out) == []


def test_a_failed_import_onto_an_existing_dataset_leaves_it_whole(tmp_path, capsys, monkeypatch):
    """The new .bin/.idx are published only once the new summary is written and the old one is
    gone: here the old summary cannot be removed, and the old dataset stays byte for byte."""
    import errno

    import data_tools.mds as mds

    prefix = tmp_path / "fw"
    assert run_import(capsys, os.path.join(FIXTURES, "fineweb-edu", "proc01-64"), prefix)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def cannot_remove(output_prefix):
        raise PermissionError(errno.EACCES, "Permission denied", f"{output_prefix}.summary.json")

    monkeypatch.setattr(mds, "remove_stale_summary", cannot_remove)
    code, _, err = run_import(capsys, os.path.join(FIXTURES, "fineweb-edu"), prefix)
    assert code == 2 and f"{prefix}.summary.json" in err and "Permission denied" in err, err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(after) == sorted(before), f"left behind: {sorted(set(after) - set(before))}"
    for name in before:
        assert after[name] == before[name], f"{name} was replaced by a failed import"


def test_a_file_size_limit_names_the_file_and_leaves_nothing(tmp_path):
    """`ulimit -f` (a full disk looks the same to the writer): exit 2, the .bin named with the
    fix, no traceback, no temporary file."""
    out = tmp_path / "out"
    out.mkdir()
    command = (f"ulimit -f 1; exec {sys.executable} -m data_tools import-mds "
               f"{os.path.join(FIXTURES, 'fineweb-edu')} --output-prefix {out / 'fw'} --quiet")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                            cwd=os.path.join(os.path.dirname(FIXTURES), "..", "..", ".."))
    assert result.returncode == 2, result.stderr
    assert (f"cannot write {out / 'fw'}.bin: File too large; raise the file-size limit "
            f"(ulimit -f) or write elsewhere") in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and os.listdir(out) == []


def test_an_import_without_tokenizer_records_llama3s_fingerprint(tmp_path, capsys, llama3_model):
    """The fingerprint recorded without --tokenizer is that of Llama-3's real tokenizer.model:
    the import merges with data preprocessed by that file, and is refused beside data of
    another vocabulary of the same size (merge, and inspect with that tokenizer)."""
    from data_tools.tokenizer import tokenizer_fingerprint

    assert tokenizer_fingerprint(llama3_model) == LLAMA3_VOCABULARY_FINGERPRINT
    part = os.path.join(FIXTURES, "fineweb-edu", "proc01-64")
    assert run_import(capsys, part, tmp_path / "plain")[0] == 0
    assert run_import(capsys, part, tmp_path / "named", "--tokenizer", llama3_model)[0] == 0
    assert main(["merge", "--output-prefix", str(tmp_path / "both"), str(tmp_path / "plain"),
                 str(tmp_path / "named")]) == 0
    # Another tokenizer of the same size (say, renamed special tokens).
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{tmp_path / 'named'}{suffix}", f"{tmp_path / 'other'}{suffix}")
    summary = json.load(open(f"{tmp_path / 'named'}.summary.json"))
    summary["tokenizer"]["vocabulary_fingerprint"] = "sha256:0123456789abcdef"
    json.dump(summary, open(f"{tmp_path / 'other'}.summary.json", "w"))
    capsys.readouterr()
    assert main(["merge", "--output-prefix", str(tmp_path / "mixed"), str(tmp_path / "plain"),
                 str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert (f"vocabulary {LLAMA3_VOCABULARY_FINGERPRINT}) vs tiktoken tokenizer.model (128,256 "
            f"ids, vocabulary sha256:0123456789abcdef)") in err, err
    assert not list(tmp_path.glob("mixed*"))
    assert main(["inspect", str(tmp_path / "other"), "0", "--tokenizer", llama3_model]) == 2
    err = capsys.readouterr().err
    assert (f"tokenizer {llama3_model} is tiktoken tokenizer.model (128,256 ids, vocabulary "
            f"{LLAMA3_VOCABULARY_FINGERPRINT}), but {tmp_path / 'other'} was built with tiktoken "
            f"tokenizer.model (128,256 ids, vocabulary sha256:0123456789abcdef)") in err, err
