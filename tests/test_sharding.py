"""sharding with real processes (jax.distributed on 127.0.0.1), no XLA compile: how processes
find each other (flags, or a cluster's environment with no flags at all), and
run_once_per_directory's three rounds of shared work (a shared directory, one directory per
process as on local disks, a leader that fails)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from processes import free_port, slurm_port, slurm_step, without_cluster

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from fcos_jax.parallel import sharding

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


def test_shared_work_runs_once_per_directory_and_failures_reach_the_followers(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    port = str(free_port())
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


DISCOVERY = """
import json, sys
sys.path.insert(0, {repo!r})
import jax
from fcos_jax.parallel import sharding

sharding.initialize_distributed()  # no flags, no FCOS_* variables
print(json.dumps({{
    "initialized": jax.distributed.is_initialized(),
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "devices": jax.device_count(),
}}))
"""


def _discover(tmp_path, environments: list[dict[str, str]]) -> list[dict]:
    """Runs DISCOVERY once per environment, all at once; their JSON reports."""
    script = tmp_path / "discover.py"
    script.write_text(DISCOVERY.format(repo=str(REPO)))
    base = without_cluster(dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3"))
    processes = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**base, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra in environments
    ]
    reports = []
    for p in processes:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def test_srun_tasks_find_each_other_without_flags(tmp_path):
    """Two processes with the environment `srun --ntasks=2` gives them and no flags: JAX's SLURM
    detection makes them one job (coordinator on the first node, port from the job id)."""
    reports = _discover(tmp_path, slurm_step(2, slurm_port()))
    assert [r["process"] for r in reports] == [0, 1]
    assert all(r["initialized"] and r["processes"] == 2 and r["devices"] == 2 for r in reports)


def test_a_plain_process_starts_no_coordinator(tmp_path):
    """No flags, no FCOS_* variables, no cluster: one process, jax.distributed never started."""
    (report,) = _discover(tmp_path, [{}])
    assert report == {"initialized": False, "process": 0, "processes": 1, "devices": 1}


def test_explicit_variables_win_over_the_cluster_environment(tmp_path):
    """FCOS_* variables inside a SLURM step (which alone would make a 2-task job): the
    variables' single process is what runs."""
    (slurm,) = slurm_step(1, slurm_port())
    slurm["SLURM_NTASKS"] = "2"  # the step alone would wait for a second task
    (report,) = _discover(tmp_path, [{**slurm, "FCOS_NUM_PROCESSES": "1"}])
    assert report == {"initialized": False, "process": 0, "processes": 1, "devices": 1}
