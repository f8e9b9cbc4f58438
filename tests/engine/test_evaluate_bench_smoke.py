"""The evaluation-forward benchmark still runs both sides, prints its ratios, and both sides
compute the same numbers (tiny sizes)."""
import json
import re
import subprocess
import sys

from tests.distributed import REPO, test_env


def test_bench_eval_forward_runs_both_sides():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "evaluate" / "bench_eval_forward.py"),
                             "--smoke"], capture_output=True, text=True, timeout=900, env=test_env(),
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| (all tokens|answer only) \|", line)]
    assert len(rows) == 2, result.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # At smoke sizes a side's peak may not rise above what loading already reached: the
        # memory ratio can be 0, never negative; the speed ratio needs both sides' times.
        assert float(cells[4].rstrip("x")) > 0 and float(cells[7]) >= 0
    # Same weights, same tokens (fp32 on CPU): the same losses and the same argmax.
    agreement = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
                 if line.startswith("agreement ")]
    assert [row["workload"] for row in agreement] == ["all tokens", "answer only"], result.stdout
    for row in agreement:
        assert row["engine_scored"] == row["transformers_scored"], row
        assert row["max_loss_difference"] < 1e-3, (
            f"{row['workload']}: the engine's losses differ from transformers' by up to "
            f"{row['max_loss_difference']:.3g}")
    assert agreement[1]["argmax_equal"] is True, "the engine's argmax differs from transformers'"
