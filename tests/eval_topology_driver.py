"""Test driver: `eval.py`'s evaluation of one checkpoint at several `test.batch_size`s in one
process (the device count is fixed when JAX starts, so each topology is one launch).

  python tests/eval_topology_driver.py SETTINGS.json [process_id]

SETTINGS.json: {"config": path, "overrides": {"data.data_dir": ..., ...}, "checkpoint": path,
"batch_sizes": [1, 3, 8], "out": dir, optional "coordinator": "127.0.0.1:port",
"num_processes": n, "data_dirs": [one per process], "annotations": instances JSON}. Process 0 writes
`out/results_<batch>.json` (COCO results) and `out/stats_<batch>.json` (AP, AP50, ...).
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    process_id = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    from fcos_jax.parallel import sharding

    if settings.get("num_processes", 1) > 1:
        sharding.initialize_distributed(
            settings["coordinator"], settings["num_processes"], process_id
        )
    from fcos_jax.config import load_config
    from fcos_jax.evaluation import evaluator

    config = load_config(REPO / settings["config"])
    overrides = dict(settings["overrides"])
    if "data_dirs" in settings:  # one data_dir per process: local disks
        overrides["data.data_dir"] = settings["data_dirs"][process_id]
    for key, value in overrides.items():
        *groups, field = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[field] = value
    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    for batch_size in settings["batch_sizes"]:
        config.test.batch_size = batch_size
        results = out / f"results_{batch_size}.json"
        stats = evaluator.evaluate_checkpoint(
            config,
            settings["checkpoint"],
            results_path=results,
            annotations=settings.get("annotations"),
        )
        if process_id == 0:
            (out / f"stats_{batch_size}.json").write_text(json.dumps(stats))


if __name__ == "__main__":
    main()
