"""Helpers shared by the data_tools tests (fixtures live in conftest.py)."""
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
