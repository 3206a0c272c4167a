"""sharding.run_once_per_directory with two real processes (jax.distributed on 127.0.0.1).

Each process runs a small script (no XLA compile): three rounds of shared work, a shared
directory, one directory per process (local disks), a leader that fails.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from fcos_jax import sharding

pid, port, root = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
sharding.initialize_distributed(f"127.0.0.1:{{port}}", 2, pid)
report = {{}}

def work(directory):
    def run():
        with open(directory / "workers.txt", "a") as f:
            f.write(f"{{pid}}\\n")
    return run

shared = root / "shared"
sharding.run_once_per_directory(work(shared), shared, "shared work")
report["shared"] = (shared / "workers.txt").read_text().split()
local = root / f"local{{pid}}"
sharding.run_once_per_directory(work(local), local, "local work")
report["local"] = (local / "workers.txt").read_text().split()

def fail():
    raise ValueError("the annotation file is broken")

try:
    sharding.run_once_per_directory(fail, shared, "preparing the data")
except Exception as error:
    report["error"] = f"{{type(error).__name__}}: {{error}}"
(root / f"report{{pid}}.json").write_text(json.dumps(report))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shared_work_runs_once_per_directory_and_failures_reach_the_followers(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for p in processes:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]
    reports = [json.loads((tmp_path / f"report{i}.json").read_text()) for i in range(2)]
    for report in reports:
        assert report["shared"] == ["0"]  # one shared directory: process 0 did the work once
    assert [r["local"] for r in reports] == [["0"], ["1"]]  # a directory each: each did its own
    assert reports[0]["error"] == "ValueError: the annotation file is broken"
    assert reports[1]["error"] == (
        "LeaderFailedError: process 0 failed at preparing the data: "
        "ValueError: the annotation file is broken"
    )
    assert not list(tmp_path.rglob(".fcos_jax_probe*"))
