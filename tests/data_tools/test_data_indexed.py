"""Our .bin/.idx reader and writer against megatron-core's own IndexedDataset (byte-compatible)."""
import os

import numpy as np
import pytest

from data_tools.indexed import IndexedReader, IndexedWriter


@pytest.fixture(scope="module")
def megatron_indexed():
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def _documents(dtype, vocab):
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, size=n).astype(dtype) for n in (1, 7, 300, 2, 4096, 13)]


@pytest.mark.parametrize("dtype,vocab", [(np.int32, 128256), (np.uint16, 32000)])
def test_megatron_reads_what_we_write_and_the_bytes_match_its_builder(tmp_path, megatron_indexed,
                                                                      dtype, vocab):
    import torch

    docs = _documents(dtype, vocab)
    ours = str(tmp_path / "ours")
    with IndexedWriter(ours, dtype) as writer:
        writer.add_documents(np.concatenate(docs[:3]), [len(d) for d in docs[:3]])
        writer.add_documents(np.concatenate(docs[3:]), [len(d) for d in docs[3:]])
    dataset = megatron_indexed.IndexedDataset(ours)
    assert len(dataset) == len(docs)
    for got, want in zip((dataset[i] for i in range(len(docs))), docs):
        assert got.dtype == dtype and np.array_equal(got, want)
    assert dataset.sequence_lengths.tolist() == [len(d) for d in docs]
    assert dataset.document_indices.tolist() == list(range(len(docs) + 1))

    theirs = str(tmp_path / "theirs")
    builder = megatron_indexed.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(theirs + ".idx")
    for suffix in (".bin", ".idx"):
        with open(ours + suffix, "rb") as a, open(theirs + suffix, "rb") as b:
            assert a.read() == b.read(), suffix


def test_we_read_what_megatron_writes_including_multi_sequence_documents(tmp_path,
                                                                          megatron_indexed):
    import torch

    docs = _documents(np.int32, 128256)
    prefix = str(tmp_path / "megatron")
    builder = megatron_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    builder.add_document(torch.from_numpy(np.concatenate(docs[:2])), [len(docs[0]), len(docs[1])])
    for doc in docs[2:]:
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    reader = IndexedReader(prefix)
    assert len(reader) == len(docs)  # one entry per Megatron sequence
    assert reader.num_tokens == sum(len(d) for d in docs)
    assert reader.document_indices.tolist() == [0, 2, 3, 4, 5, 6]
    for i, doc in enumerate(docs):
        assert np.array_equal(reader[i], doc)
    assert np.array_equal(reader.get(4, 100, 5), docs[4][100:105])


def test_an_interrupted_write_leaves_no_dataset(tmp_path):
    prefix = str(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with IndexedWriter(prefix, np.int32) as writer:
            writer.add_documents(np.arange(10), [4, 6])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_a_half_written_dataset_is_not_valid_while_writing(tmp_path):
    prefix = str(tmp_path / "out")
    writer = IndexedWriter(prefix, np.int32)
    writer.add_documents(np.arange(10), [4, 6])
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    writer.finalize()
    assert IndexedReader(prefix).lengths.tolist() == [4, 6]


def test_truncated_bin_is_reported(tmp_path):
    prefix = str(tmp_path / "out")
    with IndexedWriter(prefix, np.int32) as writer:
        writer.add_documents(np.arange(10), [4, 6])
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match="truncated"):
        IndexedReader(prefix)
