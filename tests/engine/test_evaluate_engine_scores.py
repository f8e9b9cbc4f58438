"""Forward-only scoring through the engine agrees with one process in every layout, and with
a direct computation from the model's logits (fp32, CPU, gloo)."""
import numpy as np
import pytest

from tests.distributed import torchrun

LAYOUTS = {
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
    "pp2_vpp2": (2, ["--pp", "2", "--vpp", "2"]),
    "cp2_all_gather": (2, ["--cp", "2"]),
    "cp2_ulysses": (2, ["--cp", "2", "--cp-algorithm", "ulysses"]),
    "dp2": (2, []),
}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "single.npz"
    torchrun("tests.engine.scoring_worker", 1, ["--out", str(out)], timeout=180)
    return np.load(out)


def test_scores_are_the_cross_entropy_and_argmax_of_the_models_logits(single_process):
    loss, direct = single_process["loss"][:, :-1], single_process["direct_loss"][:, :-1]
    assert np.max(np.abs(loss - direct) / direct) <= 1e-5
    assert np.array_equal(single_process["argmax"][:, :-1], single_process["direct_argmax"][:, :-1])
    # The last position predicts nothing in the sample: it is not scored.
    assert np.isnan(single_process["loss"][:, -1]).all() and (single_process["argmax"][:, -1] == -1).all()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_scores_match_one_process(name, single_process, tmp_path):
    nproc, flags = LAYOUTS[name]
    out = tmp_path / "scores.npz"
    torchrun("tests.engine.scoring_worker", nproc, [*flags, "--out", str(out)], timeout=240)
    got = np.load(out)
    # The last position of a sample has no next token: only positions 0..T-2 are compared.
    reference, loss = single_process["loss"][:, :-1], got["loss"][:, :-1]
    assert np.all(np.isfinite(loss)) and reference.mean() > 1.0  # untrained: ~log(512)
    assert np.max(np.abs(loss - reference) / reference) <= 1e-5, name
    assert np.array_equal(got["argmax"][:, :-1], single_process["argmax"][:, :-1]), name
