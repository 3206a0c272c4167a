"""What the benchmark scripts share: the worker protocol, the best of several rounds and the
machine's description."""

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MARK = "RESULT "  # a worker's result: one line "RESULT {json}" on its stdout
REPO = Path(__file__).resolve().parents[1]


def run_command(command: list[str], env: dict, label: str, cwd: str) -> dict:
    """Runs a worker; returns its last `RESULT` json line, with the load average before and after
    (`load`); exits naming `label` and the end of its stderr if it failed."""
    load = os.getloadavg()[0]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=cwd)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{label} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARK) :])
    result["load"] = (load, os.getloadavg()[0])
    return result


def run_worker(script: str, name: str, flags: list[str], env: dict | None = None) -> dict:
    """`script --worker name *flags` in a process of its own from the repository root: its
    `RESULT` (`run_command`, labelled `name`). env: the worker's environment (default ours)."""
    command = [sys.executable, script, "--worker", name, *flags]
    return run_command(command, dict(os.environ) if env is None else env, name, str(REPO))


def answer_as_worker(args, workers: dict) -> bool:
    """When this process was started as a worker (`args.worker` names one of `workers`), runs
    `workers[args.worker](args)` and prints its `RESULT` line; returns whether it did."""
    if not args.worker:
        return False
    print_result(workers[args.worker](args))
    return True


def print_result(result: dict) -> None:
    """A worker's answer: `result` with this process's peak RSS (`max_rss_gib`, GiB) as the one
    `MARK` line on stdout that `run_command` reads."""
    result["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(MARK + json.dumps(result), flush=True)


def best_round(rounds: list[dict]) -> dict:
    """One side's worker results of several rounds -> one: each timing (a dict with a "median",
    seconds), at any depth, from the round where it was fastest (a busy machine only ever adds
    time), the peak RSS (`max_rss_gib`) the largest of all, the load average (`load`, before and
    after) the lowest before and the highest after, anything else from the first round."""

    def merge(values: list):
        first = values[0]
        if isinstance(first, dict) and "median" in first:
            return min(values, key=lambda t: t["median"])
        if isinstance(first, dict):
            return {key: merge([v[key] for v in values]) for key in first}
        return first

    best = merge(rounds)
    best["max_rss_gib"] = max(r["max_rss_gib"] for r in rounds)
    if all("load" in r for r in rounds):
        best["load"] = (min(r["load"][0] for r in rounds), max(r["load"][1] for r in rounds))
    return best


def cpu_model() -> str:
    """`lscpu`'s model name and CPU family (machines of one kind differ: say which ran)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown CPU").strip()
    family = fields.get("CPU family", "").strip()
    return f"{name}, family {family}" if family else name


def timed(fn, runs: int, warmup: int = 1) -> dict:
    """Wall time of `runs` calls of fn (which must block until done) after `warmup` untimed ones
    (the first call after a compile or another program touches fresh memory): seconds, "median",
    "min" and "all", and the process's median CPU seconds (all threads) per call, "cpu"."""
    for _ in range(warmup):
        fn()
    times, cpu_times = [], []
    for _ in range(runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "median": statistics.median(times),
        "min": min(times),
        "all": times,
        "cpu": statistics.median(cpu_times),
    }


def median_ms(fn, *args, runs: int) -> float:
    """Median milliseconds of `runs` calls of the jitted fn(*args) after one untimed call."""
    import jax

    return 1e3 * timed(lambda: jax.block_until_ready(fn(*args)), runs)["median"]


def alternating_rounds(run_side, rounds: int) -> tuple[dict, dict]:
    """(ours, theirs): `run_side("torch")` and `run_side("jax")` alternately, `rounds` times each
    (so a change of load hits both sides), each side's results merged by `best_round`."""
    results = {"torch": [], "jax": []}
    for _ in range(rounds):
        for side in ("torch", "jax"):
            results[side].append(run_side(side))
    return best_round(results["jax"]), best_round(results["torch"])


def synthetic_images(batch: int, height: int, width: int):
    """Normalised random images [B, H, W, 3] float32 (standard normal, seeded)."""
    import numpy as np

    return np.random.default_rng(0).standard_normal((batch, height, width, 3), dtype=np.float32)
