"""The kernel benchmark script runs end to end on CPU (--smoke) and records what it measured."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_smoke_runs_every_op_and_writes_a_record(tmp_path):
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, "bench/kernels/bench.py", "all", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["device"] == "cpu" and record["smoke"] is True and "bench.py all --smoke" in record["command"]
    timed = {(row["op"], row["candidate"]) for row in record["rows"] if row["ms"]}
    for op in ("attention", "linear-ce", "rmsnorm", "rope", "swiglu"):
        assert (op, "reference (ours, plain torch)") in timed
        assert any(o == op and not c.startswith("reference") for o, c in timed), f"no torch baseline for {op}"
    assert "| attention | reference (ours, plain torch) | fwd+bwd |" in result.stdout


def test_attention_flops_count_only_the_causal_document_mask():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernel_bench", REPO / "bench/kernels/bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["kernel_bench"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    # documents of 4 and 1 tokens keep 10 + 1 (query, key) pairs; x 4 FLOPs x 2 heads x 8 channels
    assert bench.attention_flops([4, 1], heads_q=2, head_dim=8) == {"fwd": 704.0, "fwd+bwd": 2464.0}
    lengths = bench.document_lengths(65536, "mixed")
    assert sum(lengths) == 65536 and len(lengths) > 1
    assert bench.document_lengths(1000, "single") == [1000]
