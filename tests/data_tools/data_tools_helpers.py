"""Helpers shared by the data_tools tests (fixtures live in conftest.py)."""
import json

import numpy as np


def write_recipe(path, seq_length, sources, seed=1, **extra):
    import yaml

    recipe = {"name": "test", "seq_length": seq_length, "seed": seed, "sources": sources, **extra}
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return str(path)


def expected_stream_tokens(reader, documents):
    """Tokens of `documents` of an IndexedReader, back to back (the packing stream)."""
    return np.concatenate([np.asarray(reader[int(d)]) for d in documents])


# The source folders of ProLong's released data, as its training scripts name them
# (princeton-nlp/ProLong: train_64K.sh, train_512K.sh).
PROLONG_64K_FOLDERS = {
    "stack-repos": "thestackv1_concat_by_repo-65536", "books": "book-65536",
    "fineweb-edu": "fineweb-edu", "fineweb": "fineweb-2023-50", "stackexchange": "stackexchange",
    "wikipedia": "dolmawiki", "tulu-v2": "tuluv2", "arxiv": "arxiv", "openwebmath": "openwebmath",
    "textbooks": "textbooks"}
PROLONG_512K_FOLDERS = {
    **{name: folder for name, folder in PROLONG_64K_FOLDERS.items()
       if name not in ("stack-repos", "books")},
    "stack-repos-512k": "thestackv1_concat_by_repo-524288",
    "stack-repos-64k": "thestackv1_concat_by_repo-65536",
    "books-512k": "book-524288", "books-64k": "book-65536"}


def write_mds_part(folder, samples, encodings):
    """One MDS part (index.json + shard.00000.mds) of ``samples`` ({column: value}), every
    column of fixed size ("ndarray:DTYPE:SHAPE" or a scalar type), names in MDSWriter's order."""
    folder.mkdir(parents=True)
    names = sorted(encodings)
    rows = []
    for sample in samples:
        rows.append(b"".join(np.asarray(sample[name], dtype=_column_dtype(encodings[name]))
                             .tobytes() for name in names))
    sizes = [len(np.asarray(samples[0][n], dtype=_column_dtype(encodings[n])).tobytes())
             for n in names]
    settings = {"column_encodings": [encodings[n] for n in names], "column_names": names,
                "column_sizes": sizes, "compression": None, "format": "mds", "hashes": [],
                "size_limit": None, "version": 2}
    config = json.dumps(settings, sort_keys=True).encode()
    start = 4 + 4 * (len(rows) + 1) + len(config)
    offsets = np.cumsum([start] + [len(r) for r in rows]).astype("<u4")
    data = np.array([len(rows)], "<u4").tobytes() + offsets.tobytes() + config + b"".join(rows)
    (folder / "shard.00000.mds").write_bytes(data)
    entry = dict(settings, raw_data={"basename": "shard.00000.mds", "bytes": len(data),
                                     "hashes": {}}, samples=len(rows), zip_data=None)
    (folder / "index.json").write_text(json.dumps({"shards": [entry], "version": 2}))


def _column_dtype(encoding):
    fields = encoding.split(":")
    return np.dtype(fields[1] if fields[0] == "ndarray" else {"int": "int64"}.get(
        encoding, encoding)).newbyteorder("<")
