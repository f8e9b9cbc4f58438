"""The evaluation dry run (python -m engine.evaluate --dry-run): one scoring forward at the
requested length on the meta device under a fake process group, failing wherever a GPU run
would."""
import json
import sys
import textwrap

import pytest

from tests.distributed import run_command, test_env
from tests.engine.test_convert_layouts import convert_cli, random_hf_llama


def dry_run(*args, timeout=300, **env):
    return run_command([sys.executable, "-m", "engine.evaluate", "--dry-run", *args], timeout,
                       env=test_env(**env))


@pytest.fixture
def tiny_config(tmp_path):
    """A tiny model (head dim 16) under TP2 x CP2 with sequence parallelism, bf16."""
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent("""\
        model: {name: tiny}
        parallel: {tensor_parallel: 2, context_parallel: 2, sequence_parallel: true}
        bf16: true
        """))
    return str(path)


def test_peak_memory_grows_with_the_length(tiny_config, tmp_path):
    peaks = []
    for length_flag in (["--lengths", "512", "1024"], ["--lengths", "4096"],
                        ["--position-length", "16384"]):
        report = tmp_path / "report.json"
        result = dry_run("--world-size", "4", "--rank", "0", "--config", tiny_config,
                         *length_flag, "--dry-run-report", str(report))
        assert result.returncode == 0, result.stdout[-4000:]
        (rank,) = json.loads(report.read_text())["ranks"]
        peaks.append(rank)
    # The longest requested length, then 64 answer tokens, padded to a multiple of 128.
    assert [(r["measure"], r["tokens"], r["seq_length"]) for r in peaks] == [
        ("recall", 1088, 1152), ("recall", 4160, 4224), ("loss by position", 16384, 16384)]
    assert "evaluation dry run: rank 0 (first+last pipeline stage) of TP2 x PP1 x CP2" \
        in result.stdout
    weights = {r["peak"]["weights"] for r in peaks}
    assert len(weights) == 1 and weights.pop() > 0  # the same model at every length
    temporaries = [r["peak"]["temporaries"] for r in peaks]
    totals = [r["peak"]["total"] for r in peaks]
    assert temporaries == sorted(temporaries) and len(set(temporaries)) == 3, peaks
    assert totals == sorted(totals) and len(set(totals)) == 3, peaks


def test_the_model_shape_comes_from_the_checkpoint(tiny_config, tmp_path):
    """A checkpoint's recorded shape (vocabulary 1000) wins over the config's model (the tiny
    one, vocabulary 512), and no weight is read: its peak equals a config of that shape's."""
    random_hf_llama(tmp_path / "hf", vocab_size=1000)
    assert convert_cli("import", "--hf", str(tmp_path / "hf"), "--out",
                       str(tmp_path / "ckpt")).returncode == 0
    shaped = tmp_path / "shaped.yaml"
    shaped.write_text(open(tiny_config).read().replace(
        "model: {name: tiny}", "model: {name: tiny, overrides: {vocab_size: 1000}}"))
    weights = []
    for source in (["--checkpoint", str(tmp_path / "ckpt"), "--config", tiny_config],
                   ["--config", str(shaped)]):
        report = tmp_path / "report.json"
        result = dry_run("--world-size", "4", "--rank", "0", *source, "--lengths", "512",
                         "--dry-run-report", str(report))
        assert result.returncode == 0, result.stdout[-4000:]
        weights.append(json.loads(report.read_text())["ranks"][0]["peak"]["weights"])
    assert weights[0] == weights[1], weights


def test_score_buffer_built_on_the_host_is_named(tmp_path, tiny_config):
    """A scoring buffer created without ``device=`` (here: every NaN-filled torch.full): the
    output layer's scores are written into a host tensor, which a GPU refuses."""
    script = tmp_path / "planted.py"
    script.write_text(textwrap.dedent("""\
        import math
        import sys
        import torch
        full = torch.full
        def on_the_host(size, fill, **kwargs):
            if isinstance(fill, float) and math.isnan(fill):
                kwargs.pop("device", None)
            return full(size, fill, **kwargs)
        torch.full = on_the_host
        from engine.evaluate.__main__ import main
        sys.exit(main(sys.argv[1:]))
        """))
    result = run_command([sys.executable, str(script), "--dry-run", "--world-size", "4",
                          "--rank", "0", "--config", tiny_config, "--lengths", "1024"], 300,
                         env=test_env(ENGINE_DRY_RUN_CHILD="1"))
    assert result.returncode == 1, result.stdout[-4000:]
    # This rank's half of the 1152-token sample (CP2), s-major.
    assert "error: dry run: host tensor [576] float32 on cpu meets device tensors in " \
        "aten::index_put_ at engine/model/gpt.py:" in result.stdout
    assert "(loss[rows], argmax[rows] = linear_token_scores(" in result.stdout
    assert "Traceback" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--world-size", "6", "--lengths", "1024"], "6"),
    (["--world-size", "4", "--rank", "4", "--lengths", "1024"],
     "--rank 4 is outside the 4 ranks"),
    (["--world-size", "4"], "nothing to simulate: give --lengths"),
    (["--world-size", "4", "--lengths", "1024", "--hf", "somewhere"], "leave out --hf"),
    (["--world-size", "4", "--lengths", "1000000"], "--lengths 1000000 is beyond"),
])
def test_bad_dry_run_input_exits_2_before_any_process_group(args, message, tiny_config):
    result = dry_run("--config", tiny_config, *args, timeout=120)
    assert result.returncode == 2, result.stdout[-4000:]
    assert message in result.stdout and "error:" in result.stdout
    assert "Traceback" not in result.stdout
    assert "evaluation dry run: rank" not in result.stdout
