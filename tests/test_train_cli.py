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
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import FOLDER_CLASSES
from flax import traverse_util
from processes import free_port, slurm_port, slurm_step, without_cluster
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from subprocess_cli import cli_env, config_overrides, run_command

from fcos_jax.checkpoint import store

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.py"
NUM_STEPS = 10
EVAL_EVERY = 4


def _params_at(workdir, step):
    """Flat {path: array} of the params saved at `step` in a workdir."""
    variables, _ = store.restore_weights(workdir, step)
    return traverse_util.flatten_dict(dict(variables["params"]), sep="/")


def _assert_params_close(a, b, rtol, what=""):
    """Asserts every parameter close; prints the worst absolute difference (visible with -s)."""
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=rtol, err_msg=key)
    worst = max(float(np.max(np.abs(a[k] - b[k]), initial=0.0)) for k in a)
    print(f"{what}: worst parameter difference {worst:.2e}")


def _evaluations(log: str) -> dict[int, list[float]]:
    """{step: the 12 COCOeval stats} of the evaluations a train.py log printed."""
    found = {}
    for block in log.split("evaluation at step ")[1:]:
        step = int(block.split(":", 1)[0])
        found[step] = [float(x) for x in re.findall(r"\] = (-?[0-9.]+)", block)[:12]]
    return found


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_data")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir, train_command):
    """An uninterrupted run on one device with a checkpoint after every step, evaluating every
    EVAL_EVERY steps and at the end."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run_command(
        train_command(
            workdir,
            data_dir,
            "--config.train.checkpoint_every=1",
            f"--config.train.eval_every={EVAL_EVERY}",
            "--config.train.eval_at_end=True",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_training_writes_checkpoints_events_and_logs(reference_run):
    workdir, result = reference_run
    manager = store.checkpoint_manager(workdir, create=False)
    assert manager.all_steps() == [6, 7, 8, 9, 10]  # keep_checkpoints = 5
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert f"step {NUM_STEPS}/{NUM_STEPS}" in result.stderr and "img/s" in result.stderr
    meta = json.loads((workdir / "checkpoints" / "10" / "meta" / "metadata").read_text())
    # classes and their names from the folder's JSON (model.head.num_classes = 0)
    assert meta["config_name"] == "tiny" and meta["classes"] == [list(c) for c in FOLDER_CLASSES]
    assert sorted(_evaluations(result.stdout)) == [4, 8, 10]


def _cocoeval_stats(gt_path, results_path, category_ids=None) -> list[float]:
    """The 12 figures pycocotools prints for the files, as a user would run it; optionally on
    some categories only."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        reference = COCOeval(gt, gt.loadRes(str(results_path)), "bbox")
        if category_ids is not None:
            reference.params.catIds = list(category_ids)
        reference.evaluate()
        reference.accumulate()
    with contextlib.redirect_stdout(printed):
        reference.summarize()
    return _printed_stats(printed.getvalue())


def _printed_stats(stdout: str) -> list[float]:
    return [float(line.rsplit("=", 1)[1]) for line in stdout.splitlines() if "] =" in line]


def _eval_workdir(workdir, data_dir, folder_overrides, *flags):
    """eval.py on a workdir of configs/tiny.py trained on the test folder."""
    return run_command(
        [
            sys.executable,
            "eval.py",
            f"--config={TINY}",
            f"--checkpoint={workdir}",
            f"--config.data.data_dir={data_dir}",
            *config_overrides(folder_overrides),
            *flags,
        ]
    )


def test_eval_cli_on_a_trained_workdir_with_an_annotations_file_equals_pycocotools(
    reference_run, data_dir, folder, folder_overrides, tmp_path
):
    """eval.py --checkpoint --annotations: the AP table of pycocotools run on the same files,
    over the model's categories only (the file has one more, which would lower every mean)."""
    workdir, _ = reference_run
    instances = json.loads(Path(folder["val_json"]).read_text())
    first = instances["images"][0]
    instances["categories"].append({"id": 99, "name": "not a class of the model"})
    instances["annotations"].append(
        {"id": 10**6, "image_id": first["id"], "category_id": 99, "bbox": [2, 2, 20, 20],
         "area": 400.0, "iscrowd": 0}
    )  # fmt: skip
    gt_path = tmp_path / "instances_val_plus_one_category.json"
    gt_path.write_text(json.dumps(instances))
    results = tmp_path / "results.json"
    cache = tmp_path / "compilation_cache"
    run = _eval_workdir(
        workdir,
        data_dir,
        folder_overrides,
        f"--config.test.compilation_cache_dir={cache}",
        f"--annotations={gt_path}",
        f"--results={results}",
        "--per_class",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Average Precision") == 6, run.stdout
    assert "rectangle" in run.stdout and "cross" in run.stdout  # per-class lines
    assert "not a class of the model" not in run.stdout
    detections = json.loads(results.read_text())
    assert {d["category_id"] for d in detections} <= {1, 2, 3, 4}
    model_categories = [cid for cid, _ in FOLDER_CLASSES]
    expected = _cocoeval_stats(gt_path, results, model_categories)
    every_category = _cocoeval_stats(gt_path, results)
    assert expected != every_category  # the extra category would count
    assert _printed_stats(run.stdout) == expected
    assert any(cache.iterdir())  # test.compilation_cache_dir is honoured by eval.py


def test_eval_cli_refuses_an_annotations_file_without_the_splits_images_before_predicting(
    reference_run, data_dir, folder, folder_overrides, tmp_path
):
    workdir, _ = reference_run
    instances = json.loads(Path(folder["val_json"]).read_text())
    dropped = instances["images"].pop()["id"]
    gt_path = tmp_path / "instances_val_less_one_image.json"
    gt_path.write_text(json.dumps(instances))
    results = tmp_path / "results.json"
    run = _eval_workdir(
        workdir, data_dir, folder_overrides, f"--annotations={gt_path}", f"--results={results}"
    )
    assert run.returncode == 2, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and str(gt_path) in error and f"ids {dropped}" in error
    assert not results.exists()  # refused before any prediction


def test_custom_coco_config_trains_a_users_folder_from_the_four_paths(folder, tmp_path):
    """configs/custom_coco.py as the README runs it: only the four paths (plus a short schedule
    and a scratch data_dir here); head size and class names come from the folder's JSON, and the
    final evaluation runs on the validation split."""
    workdir = tmp_path / "work"
    run = run_command(
        [
            sys.executable,
            "train.py",
            "--config=configs/custom_coco.py",
            f"--workdir={workdir}",
            *[f"--config.data.folder.{k}={v}" for k, v in folder.items()],
            f"--config.data.data_dir={tmp_path / 'data'}",
            "--config.train.num_steps=2",
            "--config.optim.lr_steps=(1,)",
            "--config.optim.warmup_iters=1",
            "--config.train.progress_bar=False",
        ]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(_evaluations(run.stdout)) == [2]
    meta = json.loads((workdir / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["config_name"] == "custom_coco"
    assert meta["classes"] == [list(c) for c in FOLDER_CLASSES]


def test_predict_shows_the_datasets_class_names_without_the_dataset(
    reference_run, folder, tmp_path
):
    """A head sized from the data (num_classes = 0) and the class names come from the
    checkpoint's meta: prediction needs no dataset paths."""
    workdir, _ = reference_run
    output = tmp_path / "detections.json"
    image = sorted(folder["val_images"].iterdir())[0]  # a grayscale PNG
    run = run_command(
        [
            sys.executable,
            "-m",
            "fcos_jax.predict",
            f"--config={TINY}",
            "--config.model.head.num_classes=0",
            "--config.data.classes=dataset",
            "--config.test.score_thr=0.0",
            f"--checkpoint={workdir}",
            f"--output={output}",
            str(image),
        ]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (detections,) = json.loads(output.read_text())
    assert detections["names"] and set(detections["names"]) <= {n for _, n in FOLDER_CLASSES}
    for name, category_id in zip(detections["names"], detections["category_ids"], strict=True):
        assert (category_id, name) in FOLDER_CLASSES


def test_sigkill_at_a_random_step_then_restart_equals_the_uninterrupted_run(
    reference_run, data_dir, train_command, tmp_path
):
    reference_workdir, _ = reference_run
    workdir = tmp_path / "killed"
    kill_after = random.Random(os.getpid()).choice([1, 2, 3, 4, 5, 6])
    process = subprocess.Popen(
        train_command(workdir, data_dir, "--config.train.checkpoint_every=1"),
        cwd=REPO,
        env=cli_env(),
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
    store.restore_weights(workdir)
    resumed = run_command(train_command(workdir, data_dir, "--config.train.checkpoint_every=1"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr
    _assert_params_close(
        _params_at(workdir, NUM_STEPS),
        _params_at(reference_workdir, NUM_STEPS),
        rtol=1e-6,
        what=f"SIGKILL after step {kill_after}, resumed",
    )


def test_a_kill_while_writing_a_checkpoint_leaves_a_readable_latest(reference_run, tmp_path):
    reference_workdir, _ = reference_run
    workdir = tmp_path / "partial"
    (workdir / "checkpoints").mkdir(parents=True)
    for step in (7, 8):
        os.symlink(
            reference_workdir / "checkpoints" / str(step), workdir / "checkpoints" / str(step)
        )
    # What orbax leaves when killed mid-save: an unfinished temporary step directory.
    partial = workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1234"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_bytes(b"\0" * 100)
    variables, _ = store.restore_weights(workdir)
    assert store.checkpoint_manager(workdir, create=False).latest_step() == 8
    expected = _params_at(reference_workdir, 8)
    restored = traverse_util.flatten_dict(variables["params"], sep="/")
    _assert_params_close(restored, expected, rtol=0)


def test_a_workdir_of_another_model_is_refused(reference_run, data_dir, train_command):
    workdir, _ = reference_run
    renamed = run_command(train_command(workdir, data_dir, "--config.name=other"))
    assert renamed.returncode == 2
    assert "holds a checkpoint of config 'tiny', not 'other'" in renamed.stderr
    reshaped = run_command(
        train_command(
            workdir,
            data_dir,
            "--config.model.head.feat_channels=16",
            "--config.model.head.gn_groups=4",
        )
    )
    assert reshaped.returncode == 2
    assert "does not fit" in reshaped.stderr and "bbox_head" in reshaped.stderr


def test_a_bad_config_field_is_named(data_dir, train_command, tmp_path):
    run = run_command(train_command(tmp_path / "w", data_dir, "--config.train.no_such_field=3"))
    assert run.returncode != 0
    assert "no_such_field" in run.stderr


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
    run = run_command(
        [
            sys.executable,
            "eval.py",
            f"--config={TINY}",
            f"--detections={dt_path}",
            f"--annotations={gt_path}",
        ]
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert _printed_stats(run.stdout) == _cocoeval_stats(gt_path, dt_path)


# ---------------------------------------------------------------------------------------------
# Many devices and processes: 2 processes x 2 host devices (gloo on 127.0.0.1) from an empty
# data_dir, killed as a whole, resumed on 1 process x 1 device; 1 -> 4 devices; evaluation on
# every topology.

HOST_DEVICES = "--xla_force_host_platform_device_count={}"


def _launch_processes(commands, logs, env):
    """Starts every command at once, output to its log; env: one for all, or a list (one each)."""
    envs = env if isinstance(env, list) else [env] * len(commands)
    handles = [log.open("w") for log in logs]
    processes = [
        subprocess.Popen(c, cwd=REPO, env=e, stdout=h, stderr=subprocess.STDOUT)
        for c, e, h in zip(commands, envs, handles, strict=True)
    ]
    return processes, handles


@pytest.fixture(scope="module")
def killed_multihost_run(tmp_path_factory, train_command):
    """2 processes x 2 devices, evaluating every EVAL_EVERY steps, SIGKILLed (both processes: a
    surviving peer would wait in a collective) once checkpoint 6 exists."""
    root = tmp_path_factory.mktemp("multihost")
    workdir, data_dir = root / "workdir", root / "data"  # data_dir does not exist yet
    port = free_port()
    commands = [
        train_command(
            workdir,
            data_dir,
            "--config.train.checkpoint_every=1",
            f"--config.train.eval_every={EVAL_EVERY}",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    logs = [root / f"process{i}.log" for i in range(2)]
    env = cli_env(XLA_FLAGS=HOST_DEVICES.format(2))
    processes, handles = _launch_processes(commands, logs, env)
    deadline = time.time() + 900
    try:
        while not (workdir / "checkpoints" / "6").is_dir():
            ended = [p.poll() for p in processes]
            assert ended == [None, None] and time.time() < deadline, (
                f"run ended before the kill ({ended}):\n{logs[0].read_text()[-3000:]}"
            )
            time.sleep(0.05)
    finally:
        for p in processes:
            p.send_signal(signal.SIGKILL)
        for p, h in zip(processes, handles, strict=True):
            p.wait()
            h.close()
    return workdir, data_dir, [log.read_text() for log in logs]


def test_two_processes_prepare_an_empty_data_dir_once(killed_multihost_run):
    _, data_dir, logs = killed_multihost_run
    assert "process 0/2" in logs[0] and "process 1/2" in logs[1]
    assert "process 1 waits for process 0" in logs[1]
    assert len(list((data_dir / "fcos_coco_folder").iterdir())) == 1
    assert len(list((data_dir / "fcos_jax_index").glob("*.npz"))) == 2  # train and val
    leftovers = [p for p in data_dir.rglob("*") if "tmp-" in p.name or "fcos_jax_probe" in p.name]
    assert not leftovers


def test_evaluation_during_multihost_training_equals_one_device(
    killed_multihost_run, reference_run
):
    _, _, logs = killed_multihost_run
    multihost, single = _evaluations(logs[0]), _evaluations(reference_run[1].stdout)
    assert EVAL_EVERY in multihost and not _evaluations(logs[1])  # process 0 reports
    np.testing.assert_allclose(multihost[EVAL_EVERY], single[EVAL_EVERY], atol=1e-4)
    worst = np.max(np.abs(np.subtract(multihost[EVAL_EVERY], single[EVAL_EVERY])))
    print(
        f"evaluation inside 2x2 training vs 1 device: AP {multihost[EVAL_EVERY][0]:.3f}, "
        f"worst stat difference {worst:.1e}"
    )


def test_a_killed_multihost_run_resumes_on_one_device(
    killed_multihost_run, reference_run, train_command
):
    workdir, data_dir, _ = killed_multihost_run
    resumed = run_command(
        train_command(
            workdir,
            data_dir,
            "--config.train.checkpoint_every=1",
            "--config.train.eval_at_end=True",
        )
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr and "process 0/1" in resumed.stderr
    _assert_params_close(
        _params_at(workdir, NUM_STEPS),
        _params_at(reference_run[0], NUM_STEPS),
        rtol=1e-5,
        what="2 processes x 2 devices, killed, resumed on 1 device",
    )
    final, expected = _evaluations(resumed.stdout), _evaluations(reference_run[1].stdout)
    np.testing.assert_allclose(final[NUM_STEPS], expected[NUM_STEPS], atol=1e-4)
    worst = np.max(np.abs(np.subtract(final[NUM_STEPS], expected[NUM_STEPS])))
    print(f"resumed run's final COCOeval stats vs uninterrupted: worst difference {worst:.1e}")


def test_srun_tasks_train_as_one_job_without_flags(
    reference_run, data_dir, train_command, tmp_path
):
    """Two processes with the environment `srun --ntasks=2` gives them, no flags and no FCOS_*
    variables: one job of two processes (JAX's SLURM detection), ending with the parameters of
    the one-process run."""
    workdir = tmp_path / "slurm"
    command = train_command(workdir, data_dir)
    envs = [without_cluster(cli_env()) | task for task in slurm_step(2, slurm_port())]
    logs = [tmp_path / f"task{i}.log" for i in range(2)]
    processes, handles = _launch_processes([command, command], logs, envs)
    for p, h, log in zip(processes, handles, logs, strict=True):
        assert p.wait(timeout=900) == 0, log.read_text()[-3000:]
        h.close()
    texts = [log.read_text() for log in logs]
    assert "process 0/2" in texts[0] and "process 1/2" in texts[1]
    _assert_params_close(
        _params_at(workdir, NUM_STEPS),
        _params_at(reference_run[0], NUM_STEPS),
        rtol=1e-5,
        what="2 srun tasks without flags",
    )


def test_a_one_device_checkpoint_resumes_on_four_devices(
    reference_run, data_dir, train_command, tmp_path
):
    reference_workdir, _ = reference_run
    workdir = tmp_path / "to_four"
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_workdir / "checkpoints" / "6", workdir / "checkpoints" / "6")
    env = {"XLA_FLAGS": HOST_DEVICES.format(4)}
    other_batch = run_command(
        train_command(workdir, data_dir, "--config.train.batch_size=8"), **env
    )
    assert other_batch.returncode == 2
    assert "global_batch_size=4 but this pipeline has 8" in other_batch.stderr
    resumed = run_command(train_command(workdir, data_dir), **env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "global devices 4" in resumed.stderr and "resumed" in resumed.stderr
    _assert_params_close(
        _params_at(workdir, NUM_STEPS),
        _params_at(reference_workdir, NUM_STEPS),
        rtol=1e-5,
        what="1 device checkpoint resumed on 4 devices",
    )


EVAL_BATCH_SIZES = (1, 3, 8)
TOPOLOGIES = ("1x1", "1x4", "2x2")  # processes x devices per process


@pytest.fixture(scope="module")
def evaluations_per_topology(reference_run, data_dir, folder, folder_overrides, tmp_path_factory):
    """{topology: {batch size: (stats, COCO results)}} of the reference's final checkpoint,
    evaluated as eval.py does on every topology at every batch size. The two processes of 2x2
    each start from an empty data_dir of their own (local disks: each prepares its copy), and
    take the ground truth from the folder's annotations file (`--annotations`, read by both)
    rather than from the split."""
    root = tmp_path_factory.mktemp("eval_topologies")
    found = {}
    for topology in TOPOLOGIES:
        processes, devices = (int(n) for n in topology.split("x"))
        settings = {
            "config": TINY,
            "overrides": {**folder_overrides, "data.data_dir": str(data_dir)},
            "checkpoint": str(reference_run[0]),
            "batch_sizes": list(EVAL_BATCH_SIZES),
            "out": str(root / topology),
        }
        if processes > 1:
            settings["coordinator"] = f"127.0.0.1:{free_port()}"
            settings["num_processes"] = processes
            settings["data_dirs"] = [str(root / f"local_disk{i}") for i in range(processes)]
            settings["annotations"] = str(folder["val_json"])
        settings_path = root / f"{topology}.json"
        settings_path.write_text(json.dumps(settings))
        driver = [sys.executable, "tests/eval_topology_driver.py", str(settings_path)]
        commands = [[*driver, str(i)] for i in range(processes)]
        logs = [root / f"{topology}_{i}.log" for i in range(processes)]
        env = cli_env(XLA_FLAGS=HOST_DEVICES.format(devices))
        launched, handles = _launch_processes(commands, logs, env)
        for p, h, log in zip(launched, handles, logs, strict=True):
            assert p.wait(timeout=900) == 0, log.read_text()[-3000:]
            h.close()
        found[topology] = {
            b: (
                json.loads((root / topology / f"stats_{b}.json").read_text()),
                json.loads((root / topology / f"results_{b}.json").read_text()),
            )
            for b in EVAL_BATCH_SIZES
        }
        if processes > 1:
            for i in range(processes):  # each local disk prepared by its own process
                assert len(list((root / f"local_disk{i}" / "fcos_coco_folder").iterdir())) == 1
    return found


def _by_image(results):
    out = {}
    for d in results:
        x, y, w, h = d["bbox"]
        entry = out.setdefault(d["image_id"], {"boxes": [], "scores": [], "labels": []})
        entry["boxes"].append([x, y, x + w, y + h])
        entry["scores"].append(d["score"])
        entry["labels"].append(d["category_id"])
    return {k: {n: np.asarray(v) for n, v in e.items()} for k, e in out.items()}


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_evaluation_is_the_same_on_every_topology_and_batch_size(
    evaluations_per_topology, topology
):
    from fcos_jax.compare import match_detections

    base_stats, base_results = evaluations_per_topology["1x1"][1]
    base = _by_image(base_results)
    assert len(base) == 7  # every validation image (a prime number of them) has detections
    worst = {"stat": 0.0, "box": 0.0, "score": 0.0}
    for batch_size, (stats, results) in evaluations_per_topology[topology].items():
        where = f"{topology} batch {batch_size}"
        assert stats.keys() == base_stats.keys()
        found = [stats[k] for k in base_stats]
        np.testing.assert_allclose(found, list(base_stats.values()), atol=1e-4, err_msg=where)
        worst["stat"] = max(
            worst["stat"], np.max(np.abs(np.subtract(found, [*base_stats.values()])))
        )
        ours = _by_image(results)
        assert ours.keys() == base.keys(), where
        for image_id in base:
            assert not match_detections(ours[image_id], base[image_id]), (where, image_id)
            a, b = ours[image_id], base[image_id]
            if a["scores"].shape == b["scores"].shape:  # reported by rank (ties may reorder)
                worst["box"] = max(worst["box"], float(np.abs(a["boxes"] - b["boxes"]).max()))
                worst["score"] = max(worst["score"], float(np.abs(a["scores"] - b["scores"]).max()))
    print(
        f"evaluation {topology} at batch sizes {EVAL_BATCH_SIZES} vs 1x1 batch 1: AP "
        f"{base_stats[next(iter(base_stats))]:.3f}, worst stat difference {worst['stat']:.1e}, "
        f"box {worst['box']:.1e} px, score {worst['score']:.1e}"
    )
