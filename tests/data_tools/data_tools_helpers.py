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
