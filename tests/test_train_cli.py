"""train.py / eval.py end to end on configs/tiny.py: checkpoints, resume after SIGKILL, faults,
multi-process training, and eval.py against pycocotools.

Every run is a subprocess (the way users run them); runs are shared through module fixtures so
the file compiles the tiny model a handful of times.
"""

import contextlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fcos_jax import checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.py"
NUM_STEPS = 6


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def _train_command(workdir, data_dir, *overrides):
    return [
        sys.executable,
        "train.py",
        f"--config={TINY}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.train.progress_bar=False",
        *overrides,
    ]


def _run(command, timeout=600, **env):
    return subprocess.run(
        command, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )


def _params_at(workdir, step):
    """Flat {path: array} of the params saved at `step` in a workdir."""
    variables, _ = checkpoint.restore_weights(workdir, step)
    return traverse_util.flatten_dict(dict(variables["params"]), sep="/")


def _assert_params_close(a, b, rtol):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=rtol, err_msg=key)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_data")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
    """An uninterrupted 6-step run with a checkpoint after every step."""
    workdir = tmp_path_factory.mktemp("reference")
    result = _run(_train_command(workdir, data_dir, "--config.train.checkpoint_every=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_training_writes_checkpoints_events_and_logs(reference_run):
    workdir, result = reference_run
    manager = checkpoint.checkpoint_manager(workdir, create=False)
    assert manager.all_steps() == [2, 3, 4, 5, 6]  # keep_checkpoints = 5
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 6/6" in result.stderr and "img/s" in result.stderr
    meta = json.loads((workdir / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["config_name"] == "tiny" and len(meta["classes"]) == 4


def test_eval_cli_prints_the_coco_table_for_a_trained_workdir(reference_run, data_dir, tmp_path):
    workdir, _ = reference_run
    results = tmp_path / "results.json"
    run = _run(
        [
            sys.executable,
            "eval.py",
            f"--config={TINY}",
            f"--checkpoint={workdir}",
            f"--config.data.data_dir={data_dir}",
            f"--results={results}",
            "--per_class",
        ]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Average Precision") == 6, run.stdout
    assert "rectangle" in run.stdout and "cross" in run.stdout  # per-class lines
    detections = json.loads(results.read_text())
    assert {d["category_id"] for d in detections} <= {1, 2, 3, 4}


def test_sigkill_at_a_random_step_then_restart_equals_the_uninterrupted_run(
    reference_run, data_dir, tmp_path
):
    reference_workdir, _ = reference_run
    workdir = tmp_path / "killed"
    kill_after = random.Random(os.getpid()).choice([1, 2, 3, 4])
    process = subprocess.Popen(
        _train_command(workdir, data_dir, "--config.train.checkpoint_every=1"),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not (workdir / "checkpoints" / str(kill_after)).is_dir():
        assert process.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # Whatever the kill interrupted, the latest checkpoint is readable.
    checkpoint.restore_weights(workdir)
    resumed = _run(_train_command(workdir, data_dir, "--config.train.checkpoint_every=1"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr
    _assert_params_close(
        _params_at(workdir, NUM_STEPS), _params_at(reference_workdir, NUM_STEPS), rtol=1e-6
    )


def test_a_kill_while_writing_a_checkpoint_leaves_a_readable_latest(reference_run, tmp_path):
    reference_workdir, _ = reference_run
    workdir = tmp_path / "partial"
    (workdir / "checkpoints").mkdir(parents=True)
    for step in (2, 3):
        os.symlink(
            reference_workdir / "checkpoints" / str(step), workdir / "checkpoints" / str(step)
        )
    # What orbax leaves when killed mid-save: an unfinished temporary step directory.
    partial = workdir / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_bytes(b"\0" * 100)
    variables, _ = checkpoint.restore_weights(workdir)
    assert checkpoint.checkpoint_manager(workdir, create=False).latest_step() == 3
    expected = _params_at(reference_workdir, 3)
    restored = traverse_util.flatten_dict(variables["params"], sep="/")
    _assert_params_close(restored, expected, rtol=0)


def test_a_workdir_of_another_model_is_refused(reference_run, data_dir):
    workdir, _ = reference_run
    renamed = _run(_train_command(workdir, data_dir, "--config.name=other"))
    assert renamed.returncode == 2
    assert "holds a checkpoint of config 'tiny', not 'other'" in renamed.stderr
    reshaped = _run(
        _train_command(
            workdir,
            data_dir,
            "--config.model.head.feat_channels=16",
            "--config.model.head.gn_groups=4",
        )
    )
    assert reshaped.returncode == 2
    assert "does not fit" in reshaped.stderr and "bbox_head" in reshaped.stderr


def test_a_bad_config_field_is_named(data_dir, tmp_path):
    run = _run(_train_command(tmp_path / "w", data_dir, "--config.train.no_such_field=3"))
    assert run.returncode != 0
    assert "no_such_field" in run.stderr


def test_a_non_finite_loss_stops_the_run_naming_the_step(data_dir, tmp_path):
    workdir = tmp_path / "nan"
    run = _run(
        _train_command(
            workdir,
            data_dir,
            "--config.train.base_lr=1e30",
            "--config.train.grad_clip_norm=0.0",
            "--config.train.warmup=none",
            "--config.train.checkpoint_every=1",
        )
    )
    assert run.returncode != 0
    assert "non-finite loss at step" in run.stderr, run.stderr[-2000:]
    manager = checkpoint.checkpoint_manager(workdir, create=False)
    bad_step = int(run.stderr.split("non-finite loss at step ")[1].split(":")[0])
    assert all(step < bad_step for step in manager.all_steps())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(reference_run, data_dir, tmp_path):
    reference_workdir, _ = reference_run
    workdir = tmp_path / "two_processes"
    port = _free_port()
    processes = [
        subprocess.Popen(
            _train_command(
                workdir,
                data_dir,
                "--config.train.num_steps=3",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 0/2" in outputs[0] and "process 1/2" in outputs[1]
    _assert_params_close(_params_at(workdir, 3), _params_at(reference_workdir, 3), rtol=1e-5)


def test_eval_cli_on_a_detections_file_equals_pycocotools(tmp_path):
    rng = np.random.default_rng(0)
    images = [{"id": i, "height": 100, "width": 120} for i in (1, 2, 3)]
    annotations, detections = [], []
    for image in images:
        for _ in range(3):
            x, y, w, h = (
                rng.uniform(0, 60),
                rng.uniform(0, 50),
                rng.uniform(10, 50),
                rng.uniform(10, 40),
            )
            category = int(rng.integers(1, 5))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            detections.append(
                {
                    "image_id": image["id"],
                    "category_id": category,
                    "bbox": [x + 2, y - 1, w, h + 3],
                    "score": float(rng.uniform()),
                }
            )
    categories = [{"id": i, "name": n} for i, n in enumerate(["a", "b", "c", "d"], 1)]
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    dt_path.write_text(json.dumps(detections))
    run = _run(
        [
            sys.executable,
            "eval.py",
            f"--config={TINY}",
            f"--detections={dt_path}",
            f"--annotations={gt_path}",
        ]
    )
    assert run.returncode == 0, run.stderr[-2000:]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        reference = COCOeval(gt, gt.loadRes(str(dt_path)), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    printed = [float(line.rsplit("=", 1)[1]) for line in run.stdout.splitlines() if "] =" in line]
    np.testing.assert_allclose(printed, np.round(reference.stats, 3), atol=5e-4)
