"""benchmarks/accelerator_check.py at its tiny size on this CPU: every part runs, the table is
printed, parity holds at the highest matmul precision, and the collective counts are those of
one device (the script's full size is for a GPU or TPU; it is run here so it cannot rot)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_accelerator_check_runs_end_to_end_at_its_tiny_size(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/accelerator_check.py", "--tiny", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["parity"]["ok"] and results["parity"]["summary"]
    for name in ("jax_train_float32", "jax_train_bfloat16", "torch_train_float32"):
        assert results[name]["images_per_s"] > 0, name
    for side in ("jax_infer", "torch_infer"):
        assert {"batch_1", "batch_8"} <= results[side].keys()
    comm = results["collectives"]
    assert comm["devices"] == 1
    assert comm["train"]["in loops"] == 0 and comm["predict"] == {"largest all-reduce bytes": 0}
    assert comm["params"]["trainable"] <= comm["train"]["all-reduce bytes"]
    table = proc.stdout
    for row in ("parity (highest precision)", "train step float32", "train step bfloat16",
                "inference batch 8", "predict step collectives"):  # fmt: skip
        assert row in table, table
