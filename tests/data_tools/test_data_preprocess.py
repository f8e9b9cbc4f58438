"""preprocess: every input format, grouping, filters, workers, and bad input."""
import gzip
import json
import os

import numpy as np
import pytest
import zstandard

from data_tools.cli import main
from data_tools.indexed import IndexedReader
from data_tools.inputs import InputError
from data_tools.preprocess import PreprocessOptions, preprocess


def _jsonl_bytes(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _write_input(folder, fmt, records):
    """The same records in one input format; returns the path to give preprocess."""
    if fmt == "jsonl":
        path = folder / "data.jsonl"
        path.write_bytes(_jsonl_bytes(records))
    elif fmt == "gz":
        path = folder / "data.jsonl.gz"
        path.write_bytes(gzip.compress(_jsonl_bytes(records)))
    elif fmt == "zst":
        path = folder / "data.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(records)))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "data.parquet"
        pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=7)
    else:  # a plain-text folder: one file per document, read in sorted order
        path = folder / "texts"
        path.mkdir()
        for i, record in enumerate(records):
            (path / f"{i:04d}.txt").write_text(record["text"], encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "gz", "zst", "parquet", "text"])
def test_each_format_gives_the_tokens_of_every_document_plus_eos(tmp_path, fmt, doc_records,
                                                                 llama3, llama3_model):
    records = doc_records[:25]
    path = _write_input(tmp_path, fmt, records)
    summary = preprocess([path], str(tmp_path / "out"), llama3_model,
                         PreprocessOptions(progress=False))
    expected = [llama3.encode(r["text"]) + [llama3.eos_id] for r in records]
    reader = IndexedReader(str(tmp_path / "out"))
    assert reader.dtype == np.int32
    assert summary["documents"] == len(reader) == 25
    assert summary["tokens"] == reader.num_tokens == sum(map(len, expected))
    assert reader.lengths.tolist() == [len(e) for e in expected]
    assert np.array_equal(reader.tokens, np.concatenate(expected))
    with open(str(tmp_path / "out") + ".summary.json") as f:
        assert json.load(f)["tokens"] == summary["tokens"]


def test_group_by_repository_concatenates_files_in_order(tmp_path, code_records, llama3,
                                                         sample_datasets):
    reader = IndexedReader(sample_datasets["code"])
    repos = list(dict.fromkeys(r["repo"] for r in code_records))
    assert len(reader) == len(repos) == 18
    for i in (0, 5, 17):
        files = [r["text"] for r in code_records if r["repo"] == repos[i]]
        expected = sum((llama3.encode(t) for t in files), []) + [llama3.eos_id]
        assert reader[i].tolist() == expected


def test_plain_text_folders_group_by_repository_folder(tmp_path, llama3, llama3_model):
    # A checked-out repository per top-level folder: with --group-by, each becomes one document,
    # its files (however deep) concatenated in sorted path order; loose files group together.
    files = {"repo_a/src/x.py": "def x():\n    return 1\n", "repo_a/a.py": "import x\n",
             "repo_b/readme.txt": "beta", "repo_a/src/y.py": "y = 2\n", "loose.txt": "loose",
             "other.txt": "other"}
    for name, text in files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text, encoding="utf-8")
    summary = preprocess([str(tmp_path / "in")], str(tmp_path / "out"), llama3_model,
                         PreprocessOptions(group_by="repo", progress=False))
    reader = IndexedReader(str(tmp_path / "out"))
    # Files are read in sorted path order; groups keep the order of their first file.
    groups = [["loose.txt", "other.txt"], ["repo_a/a.py", "repo_a/src/x.py", "repo_a/src/y.py"],
              ["repo_b/readme.txt"]]
    expected = [sum((llama3.encode(files[n]) for n in g), []) + [llama3.eos_id] for g in groups]
    assert summary["groups"] == 3
    assert [reader[i].tolist() for i in range(len(reader))] == expected


def test_interleaved_groups_bos_eos_and_min_tokens(tmp_path, llama3, llama3_model):
    records = [{"repo": "a", "text": "alpha one"}, {"repo": "b", "text": "beta"},
               {"repo": "a", "text": " alpha two"}, {"repo": "c", "text": "x" * 5000}]
    path = _write_input(tmp_path, "jsonl", records)
    summary = preprocess([path], str(tmp_path / "out"), llama3_model, PreprocessOptions(
        group_by="repo", prepend_bos=True, min_tokens=5, progress=False))
    reader = IndexedReader(str(tmp_path / "out"))
    a = [128000] + llama3.encode("alpha one") + llama3.encode(" alpha two") + [128001]
    c = [128000] + llama3.encode("x" * 5000) + [128001]
    assert [reader[i].tolist() for i in range(len(reader))] == [a, c]
    assert summary["filtered_documents"] == 1  # "beta" + BOS + EOS = 3 tokens < 5
    assert summary["groups"] == 3 and summary["tokens"] == len(a) + len(c)
    assert not os.path.exists(str(tmp_path / "out.pieces.bin"))


def test_two_workers_write_the_same_bytes_as_one(tmp_path, llama3_model, sample_datasets):
    sample = os.path.join(os.path.dirname(__file__), "..", "..", "data_tools", "sample")
    preprocess([os.path.join(sample, "code.jsonl.zst")], str(tmp_path / "two"), llama3_model,
               PreprocessOptions(group_by="repo", workers=2, progress=False))
    for suffix in (".bin", ".idx"):
        with open(str(tmp_path / "two") + suffix, "rb") as a, \
                open(sample_datasets["code"] + suffix, "rb") as b:
            assert a.read() == b.read()


def test_tiktoken_encoder_with_two_workers_writes_the_same_bytes(tmp_path, llama3_model,
                                                                 sample_datasets, monkeypatch):
    # The fallback encoder and the worker pool are both pure plumbing: same .bin/.idx bytes as
    # the default encoder (splintr when installed) in one process.
    monkeypatch.setenv("LCE_BPE_ENCODER", "tiktoken")
    sample = os.path.join(os.path.dirname(__file__), "..", "..", "data_tools", "sample")
    summary = preprocess([os.path.join(sample, "docs.jsonl.gz")], str(tmp_path / "tt"), llama3_model,
                         PreprocessOptions(workers=2, progress=False))
    assert summary["tokenizer"]["encoder"] == "tiktoken"
    for suffix in (".bin", ".idx"):
        with open(str(tmp_path / "tt") + suffix, "rb") as a, \
                open(sample_datasets["docs"] + suffix, "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("workers", [1, 2])
def test_line_numbers_stay_right_across_many_small_chunks(tmp_path, llama3, llama3_model,
                                                          monkeypatch, workers):
    # Chunks of ~300 bytes cut the file mid-line dozens of times (line 50 spans several); the bad line is still named
    # by its number in the file, and with --skip-bad every other line is kept in order.
    monkeypatch.setattr("data_tools.preprocess.CHUNK_BYTES", 300 * max(workers * 2, 1))
    lines = [json.dumps({"text": f"document number {i} " + "word " * (i % 17)}) for i in range(1, 201)]
    lines[49] = json.dumps({"text": "one line longer than several chunks " * 100})
    lines[136] = '{"text": "cut off'
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"many.jsonl:137: malformed JSON"):
        preprocess([str(path)], str(tmp_path / "out"), llama3_model,
                   PreprocessOptions(workers=workers, progress=False))
    assert not os.path.exists(str(tmp_path / "out.bin"))
    summary = preprocess([str(path)], str(tmp_path / "out"), llama3_model,
                         PreprocessOptions(workers=workers, skip_bad=True, progress=False))
    assert summary["input_records"] == 200 and summary["skipped_lines"] == 1
    assert [b["line"] for b in summary["bad_records"]] == [137]
    reader = IndexedReader(str(tmp_path / "out"))
    kept = [json.loads(x)["text"] for i, x in enumerate(lines) if i != 136]
    assert [reader[i].tolist() for i in range(len(reader))] == [
        llama3.encode(t) + [llama3.eos_id] for t in kept]


BAD_LINES = [
    (b'{"text": "fine"}\n{"text": "broken\n{"text": "also fine"}\n', 2, "malformed JSON"),
    (b'{"text": "fine"}\n{"body": "no text key"}\n{"text": "also fine"}\n', 2, "missing key 'text'"),
    (b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "also fine"}\n', 2, "invalid UTF-8"),
    (b'{"text": "fine"}\n{"text": "   "}\n{"text": "also fine"}\n', 2, "empty text"),
    (b'{"text": "fine"}\n{"text": "half \\ud83d pair", "id": 7}\n{"text": "also fine"}\n', 2,
     "key text holds an unpaired UTF-16 surrogate (\\ud83d) at character 5"),
]


def test_a_document_the_encoder_fails_on_is_named_by_line(tmp_path, llama3, llama3_model,
                                                          monkeypatch):
    # tiktoken, for one, panics (a BaseException) on a million spaces in a row. Stand-in: an
    # encoder that fails on documents containing "BOOM".
    from data_tools.tokenizer import TiktokenTokenizer

    real = TiktokenTokenizer.encode_batch_flat

    def fragile(self, texts, dtype=np.int32):
        if any("BOOM" in t for t in texts):
            raise BaseException("encoder exploded")
        return real(self, texts, dtype)

    monkeypatch.setattr(TiktokenTokenizer, "encode_batch_flat", fragile)
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "BOOM here"}\n{"text": "also fine"}\n')
    with pytest.raises(InputError, match=r"data.jsonl:2: the \w+ encoder failed on this document "
                                         r"\(BaseException: encoder exploded; 9 characters\)"):
        preprocess([str(path)], str(tmp_path / "out"), llama3_model, PreprocessOptions(progress=False))
    summary = preprocess([str(path)], str(tmp_path / "out"), llama3_model,
                         PreprocessOptions(skip_bad=True, progress=False))
    assert [b["line"] for b in summary["bad_records"]] == [2]
    reader = IndexedReader(str(tmp_path / "out"))
    assert [reader[i].tolist() for i in range(len(reader))] == [
        llama3.encode(t) + [llama3.eos_id] for t in ("fine", "also fine")]


def test_escaped_surrogate_pairs_are_one_character(tmp_path, llama3, llama3_model):
    path = tmp_path / "emoji.jsonl"
    path.write_bytes(b'{"text": "smile \\ud83d\\ude00 \\uD83D\\uDE00"}\n')
    preprocess([str(path)], str(tmp_path / "out"), llama3_model, PreprocessOptions(progress=False))
    assert IndexedReader(str(tmp_path / "out"))[0].tolist() == (
        llama3.encode("smile \U0001f600 \U0001f600") + [llama3.eos_id])


@pytest.mark.parametrize("content,line,problem", BAD_LINES)
def test_bad_line_stops_with_file_and_line_or_is_skipped_and_counted(tmp_path, content, line,
                                                                     problem, llama3,
                                                                     llama3_model):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    out = str(tmp_path / "out")
    with pytest.raises(InputError) as error:
        preprocess([str(path)], out, llama3_model, PreprocessOptions(progress=False))
    assert f"bad.jsonl:{line}: {problem}" in str(error.value)
    assert "--skip-bad" in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no partial output of any name

    summary = preprocess([str(path)], out, llama3_model,
                         PreprocessOptions(skip_bad=True, progress=False))
    assert summary["skipped_lines"] == 1 and summary["bad_records"][0]["line"] == line
    expected = len(llama3.encode("fine")) + len(llama3.encode("also fine")) + 2
    assert IndexedReader(out).num_tokens == summary["tokens"] == expected


def _intact_prefix(compressed: bytes, fmt: str) -> bytes:
    """What a decompressor recovers from the start of a cut stream (gzip/zstd streaming APIs,
    independent of data_tools), up to its last complete line."""
    if fmt == "gz":
        import zlib

        data = zlib.decompressobj(wbits=31).decompress(compressed)
    else:
        data = zstandard.ZstdDecompressor().decompressobj().decompress(compressed)
    return data[:data.rfind(b"\n") + 1]


@pytest.mark.parametrize("fmt,workers", [("gz", 1), ("gz", 2), ("zst", 1)])
def test_a_cut_compressed_file_keeps_every_complete_line_and_names_the_cut(tmp_path, fmt, workers,
                                                                         llama3_model):
    # 18,000 lines (1.6 MB, several reading blocks with 2 workers) compressed, then cut in the
    # middle of the compressed bytes, as an interrupted download leaves it.
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "lorem", "ipsum"])
    lines = [{"text": f"record {i} " + " ".join(rng.choice(words, rng.integers(5, 60)))}
             for i in range(18000)]
    whole = _jsonl_bytes(lines)
    compressed = gzip.compress(whole) if fmt == "gz" else zstandard.ZstdCompressor().compress(whole)
    cut = compressed[:len(compressed) // 2]
    path = tmp_path / f"cut.jsonl.{fmt}"
    path.write_bytes(cut)
    intact = _intact_prefix(cut, fmt)
    complete = intact.count(b"\n")
    assert 5000 < complete < 13000
    tool = "gzip" if fmt == "gz" else "zstd"
    out = str(tmp_path / "out")
    options = dict(workers=workers, progress=False)

    with pytest.raises(InputError) as error:
        preprocess([str(path)], out, llama3_model, PreprocessOptions(**options))
    message = str(error.value)
    assert (f"cut.jsonl.{fmt}:{complete + 1}: the {tool} stream is cut off after line "
            f"{complete:,}, the last complete one: the file ends at byte {len(cut):,}") in message
    assert f"--skip-bad to keep lines 1-{complete:,}" in message
    assert sorted(os.listdir(tmp_path)) == [path.name]

    summary = preprocess([str(path)], out, llama3_model,
                         PreprocessOptions(skip_bad=True, **options))
    assert summary["documents"] == complete and summary["skipped_lines"] == 1
    assert summary["bad_records"][0]["line"] == complete + 1
    # Nothing lost: the same bytes as preprocessing exactly the complete lines, uncompressed.
    (tmp_path / "intact.jsonl").write_bytes(intact)
    preprocess([str(tmp_path / "intact.jsonl")], str(tmp_path / "ref"), llama3_model,
               PreprocessOptions(progress=False))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / ("out" + suffix)).read_bytes() == (tmp_path / ("ref" + suffix)).read_bytes()


def test_concatenated_gzip_members_and_zstd_frames_are_read_whole(tmp_path):
    from data_tools.inputs import _decompressed_blocks

    data = _jsonl_bytes([{"text": f"line {i}"} for i in range(5000)])
    # Two gzip members and the zero padding gzip allows after one; three zstd frames.
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data) + gzip.compress(data) + bytes(70000))
    frame = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "a.jsonl.zst").write_bytes(frame * 3)
    assert b"".join(_decompressed_blocks(str(tmp_path / "a.jsonl.gz"), 4096)) == data * 2
    assert b"".join(_decompressed_blocks(str(tmp_path / "a.jsonl.zst"), 4096)) == data * 3


def test_a_gzip_file_with_a_wrong_checksum_is_reported_as_corrupt(tmp_path, llama3_model):
    data = _jsonl_bytes([{"text": f"line {i}"} for i in range(100)])
    damaged = bytearray(gzip.compress(data))
    damaged[-8] ^= 0xFF  # the CRC-32 of the trailer
    path = tmp_path / "crc.jsonl.gz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(InputError, match=r"crc.jsonl.gz:101: corrupt gzip data at "
                                         r"compressed byte .*incorrect data check.*after line "
                                         r"100, the last complete one"):
        preprocess([str(path)], str(tmp_path / "out"), llama3_model,
                   PreprocessOptions(progress=False))
    assert sorted(os.listdir(tmp_path)) == ["crc.jsonl.gz"]


def test_hugging_face_and_sentencepiece_tokenizers(tmp_path, doc_records, llama3_dir,
                                                   sentencepiece_model):
    from data_tools.tokenizer import load_tokenizer

    path = _write_input(tmp_path, "jsonl", doc_records[:10])
    for name, tokenizer_path in (("hf", llama3_dir), ("spm", sentencepiece_model)):
        summary = preprocess([path], str(tmp_path / name), tokenizer_path,
                             PreprocessOptions(progress=False))
        tokenizer = load_tokenizer(tokenizer_path)
        expected = sum(len(tokenizer.encode(r["text"])) + 1 for r in doc_records[:10])
        reader = IndexedReader(str(tmp_path / name))
        assert summary["tokens"] == reader.num_tokens == expected
        assert reader.dtype == (np.uint16 if name == "spm" else np.int32)


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys, llama3_model):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n[1, 2]\n')
    code = main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", llama3_model, "--quiet"])
    assert code == 2
    assert "bad.jsonl:2: a JSON list, not an object" in capsys.readouterr().err
    code = main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", str(tmp_path / "nope.model"), "--quiet"])
    assert code == 2 and "nope.model" in capsys.readouterr().err
    assert main(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", llama3_model, "--quiet", "--skip-bad"]) == 0
    assert "skipped lines: 1" in capsys.readouterr().out
