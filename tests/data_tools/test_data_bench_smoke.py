"""The preprocessing benchmark still runs and still asserts byte-identical output (tiny sizes)."""
import os
import re
import subprocess
import sys

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


def test_bench_preprocess_runs_and_outputs_match_the_baseline(llama3_dir):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "data_tools", "bench_preprocess.py"),
         "--repeat", "1", "--stdlib-mb", "0.5", "--workers", "2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| 2 \|", line)]
    assert len(rows) == 2, result.stdout  # one row per corpus
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1] == "True"
        assert float(cells[3].rstrip("x")) > 0
