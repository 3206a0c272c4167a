"""Fault injection on configs/tiny.py: each case of the project's fault table, run the way a user
runs the tools, with the exit status, the one line it prints and the files it leaves.

  * a run diverges (optim.base_lr 1e6, checkpoint_every 1, keep_checkpoints 2): exit 2, one
    line naming the step and the newest checkpoint with a finite state and loss, which is the
    workdir's latest and resumes;
  * two train.py on one workdir at once: the second exits 2 naming the first's pid and host and
    writes nothing; the first SIGKILLed and started again: its lock is taken over, with a warning;
  * a checkpoint's array file truncated or overwritten in the middle, garbage in its meta or
    _METADATA: predict, export and eval.py given the workdir use the newest intact step and say
    so, given the step they stop with one line naming the step and the array or file; train.py
    resumes the newest intact step and moves the damaged one aside;
  * a workdir of config 'tiny' given with --config configs/shapes.py: predict, export and
    eval.py exit 2 naming both configs; --allow_other_config_name runs it;
  * predict --draw into the images' own folder: exit 2 before anything runs;
  * a 10 x 2000 image among others in predict (torchvision resize): named and skipped, the
    others run, exit 1;
  * "area": "big" in an annotation, boxes of negative width: one line naming the file and the
    annotation id; the drops counted as negative-size boxes.
No file of the user's (the COCO folder, the images) changes in any of them.

Runs are shared through module fixtures: six train.py runs (a short training, the contested
workdir's four, the two on broken annotations, which stop before training) and short runs of
predict, export and eval.py, most of which stop before compiling; the test session shares one
compilation cache.
"""

import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest
from damage_helpers import (
    copy_workdir,
    largest_array_file,
    overwrite_middle,
    truncate,
    write_garbage,
)
from subprocess_cli import REPO, cli_env, config_overrides, run_command

from fcos_jax.checkpoint import store

TINY = "configs/tiny.py"


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: sha256} of every file under `roots`: what a run must leave as it was."""
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for root in roots
        for path in sorted(Path(root).rglob("*"))
        if path.is_file()
    }


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's one `error: ...` line: exit status 2, and the line ends its stderr."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults_data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, train_command, folder):
    """configs/tiny.py on the user's folder, 4 steps, checkpoints 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained")
    run = run_command(train_command(workdir, data_dir, "--config.train.num_steps=4"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert store.checkpoint_manager(workdir, create=False).all_steps() == [2, 4]
    return workdir


def tool(module_or_script: str, *args) -> subprocess.CompletedProcess:
    """`python -m fcos_jax.<tool>` or `python <script>.py` with `args`."""
    head = [module_or_script] if module_or_script.endswith(".py") else ["-m", module_or_script]
    return run_command([sys.executable, *head, *args])


def predict(checkpoint_path, *args, config=TINY) -> subprocess.CompletedProcess:
    return tool("fcos_jax.predict", f"--config={config}", f"--checkpoint={checkpoint_path}", *args)


# --- one workdir, one writer; a diverging run ----------------------------------------------------


@pytest.fixture(scope="module")
def contested_workdir(tmp_path_factory, trained, data_dir, train_command, folder):
    """A copy of `trained` that run A trains on; run B starts on it while A runs; A is SIGKILLed;
    step 4 is truncated; run C starts with lr 1e6 (takes over A's lock, resumes step 2, diverges);
    run D goes on from the checkpoint C names, at the config's lr."""
    workdir = copy_workdir(trained, tmp_path_factory.mktemp("contested"))
    user_files = snapshot(*folder.values())
    long_run = train_command(workdir, data_dir, "--config.train.num_steps=100000")
    a = subprocess.Popen(
        [*long_run, "--config.train.checkpoint_every=0"],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = workdir / "train.lock"
    try:
        deadline = time.time() + 600
        while not (lock.exists() and f'"pid": {a.pid}' in lock.read_text()):
            assert a.poll() is None and time.time() < deadline, "run A did not take the lock"
            time.sleep(0.1)
        before_b = snapshot(workdir / "checkpoints")
        b = run_command(train_command(workdir, data_dir))
        after_b = snapshot(workdir / "checkpoints")
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    truncate(largest_array_file(workdir / "checkpoints" / "4"))
    c = run_command(
        train_command(
            workdir,
            data_dir,
            "--config.optim.base_lr=1e6",
            "--config.train.checkpoint_every=1",
            "--config.train.keep_checkpoints=2",
        )
    )
    named = re.search(r"finite state and loss is step (\d+)", c.stderr)
    assert named, c.stderr[-3000:]
    kept = int(named.group(1))
    steps_after_c = store.checkpoint_manager(workdir, create=False).all_steps()
    variables, _ = store.restore_weights(workdir, kept)
    d = run_command(train_command(workdir, data_dir, f"--config.train.num_steps={kept + 2}"))
    return dict(
        workdir=workdir,
        a_pid=a.pid,
        b=b,
        b_changed=before_b != after_b,
        c=c,
        kept=kept,
        steps_after_c=steps_after_c,
        kept_variables=variables,
        d=d,
        user_files_unchanged=snapshot(*folder.values()) == user_files,
    )


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_first(contested_workdir):
    line = error_line(contested_workdir["b"])
    holder = f"pid {contested_workdir['a_pid']} on host {socket.gethostname()} (started "
    assert line.startswith(f"error: {contested_workdir['workdir'] / 'train.lock'}: ")
    assert "the workdir is in use by " + holder in line
    assert not contested_workdir["b_changed"]


def test_the_lock_of_a_sigkilled_run_is_taken_over_with_a_warning(contested_workdir):
    stderr = contested_workdir["c"].stderr
    assert f"taking over the lock left by pid {contested_workdir['a_pid']} on host" in stderr
    assert not (contested_workdir["workdir"] / "train.lock").exists()  # released at the end


def test_train_resumes_the_newest_intact_step_and_moves_the_damaged_one_aside(
    contested_workdir,
):
    checkpoints = contested_workdir["workdir"] / "checkpoints"
    stderr = contested_workdir["c"].stderr
    assert re.search(r"checkpoint step 4 is damaged: array params/\S+ cannot be read", stderr)
    assert f"damaged checkpoint step 4 moved aside to {checkpoints / '4.damaged'}" in stderr
    assert "resumed" in stderr and "at step 2" in stderr
    assert (checkpoints / "4.damaged").is_dir()


def test_a_diverging_run_stops_in_one_line_and_leaves_a_resumable_finite_checkpoint(
    contested_workdir,
):
    line = error_line(contested_workdir["c"])
    kept = contested_workdir["kept"]
    assert re.match(r"error: step \d+: (non-finite loss|the update made)", line), line
    assert f"({contested_workdir['workdir'] / 'checkpoints' / str(kept)})" in line
    # The named checkpoint is the newest one left (keep_checkpoints 2 kept it), and finite.
    assert contested_workdir["steps_after_c"][-1] == kept
    leaves = jax.tree.leaves(contested_workdir["kept_variables"])
    assert leaves and all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
    d = contested_workdir["d"]
    assert d.returncode == 0, d.stderr[-3000:]
    assert f"at step {kept}" in d.stderr
    assert contested_workdir["user_files_unchanged"]


# --- damaged checkpoints, read by predict, export and eval.py ------------------------------------

DAMAGE = {
    "array file truncated": (lambda step: truncate(largest_array_file(step)), r"array params/\S+"),
    "4 KB overwritten in an array file": (
        lambda step: overwrite_middle(largest_array_file(step)),
        r"array params/\S+",
    ),
    "garbage in meta": (lambda step: write_garbage(step / "meta" / "metadata"), "meta/metadata"),
    "garbage in _METADATA": (
        lambda step: write_garbage(step / "params" / "_METADATA"),
        "params/_METADATA",
    ),
}


@pytest.fixture(scope="module")
def damaged_workdirs(tmp_path_factory, trained):
    """{case: a copy of `trained` whose step 4 is damaged that way}."""
    root = tmp_path_factory.mktemp("damaged")
    found = {}
    for i, (case, (damage, _)) in enumerate(DAMAGE.items()):
        workdir = copy_workdir(trained, root / str(i))
        damage(workdir / "checkpoints" / "4")
        found[case] = workdir
    return found


@pytest.mark.parametrize("case", list(DAMAGE))
def test_predict_names_a_damaged_step_and_uses_the_newest_intact_one(
    damaged_workdirs, folder, case
):
    workdir, named = damaged_workdirs[case], DAMAGE[case][1]
    step_dir = workdir / "checkpoints" / "4"
    image = sorted(folder["val_images"].iterdir())[0]
    before = snapshot(workdir, folder["val_images"])
    explicit = predict(step_dir, image)
    line = error_line(explicit)
    assert re.match(rf"error: {step_dir}: checkpoint step 4 is damaged: .*{named}", line), line
    fallback = predict(workdir, image, "--config.model.head.num_classes=0")
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert re.search(rf"checkpoint step 4 is damaged: .*{named}", fallback.stderr)
    assert "using step 2, the newest intact step (damaged: 4)" in fallback.stderr
    assert json.loads(fallback.stdout)[0]["file"] == str(image)
    assert snapshot(workdir, folder["val_images"]) == before


def test_export_of_a_damaged_step_is_one_line_and_writes_nothing(damaged_workdirs, tmp_path):
    step_dir = damaged_workdirs["array file truncated"] / "checkpoints" / "4"
    output = tmp_path / "model.stablehlo"
    args = [f"--config={TINY}", f"--checkpoint={step_dir}", "--format=stablehlo"]
    line = error_line(tool("fcos_jax.export", *args, f"--output={output}"))
    assert re.match(rf"error: {step_dir}: checkpoint step 4 is damaged: array params/", line)
    assert not output.exists()


def test_eval_of_a_workdir_with_a_damaged_step_uses_the_newest_intact_one(
    damaged_workdirs, data_dir, folder_overrides
):
    workdir = damaged_workdirs["4 KB overwritten in an array file"]
    run = tool(
        "eval.py",
        f"--config={TINY}",
        f"--checkpoint={workdir}",
        f"--config.data.data_dir={data_dir}",
        *config_overrides(folder_overrides),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checkpoint step 4 is damaged: array params/" in run.stderr
    assert "using step 2, the newest intact step" in run.stderr
    assert run.stdout.startswith("tiny (fcos_jax train.py, step 2):")  # the step it used


# --- a checkpoint of another config --------------------------------------------------------------


@pytest.mark.parametrize("which", ["predict", "export", "eval.py"])
def test_a_checkpoint_of_another_config_is_refused_naming_both(trained, folder, tmp_path, which):
    image = sorted(folder["val_images"].iterdir())[0]
    args = {
        "predict": [str(image)],
        "export": ["--format=stablehlo", f"--output={tmp_path / 'model'}"],
        "eval.py": [],
    }[which]
    module = "fcos_jax.export" if which == "export" else which
    module = "fcos_jax.predict" if which == "predict" else module
    run = tool(module, "--config=configs/shapes.py", f"--checkpoint={trained}", *args)
    line = error_line(run)
    assert f"{trained / 'checkpoints' / '4'}: holds a checkpoint of config 'tiny', not " in line
    assert "'shapes'" in line and "--allow_other_config_name" in line


def test_allow_other_config_name_runs_a_checkpoint_of_the_same_architecture(trained, folder):
    image = sorted(folder["val_images"].iterdir())[0]
    run = predict(trained, image, "--allow_other_config_name", config="configs/shapes.py")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)[0]["file"] == str(image)


# --- predict's inputs and outputs ----------------------------------------------------------------


def test_predict_never_draws_over_its_input_images(trained, folder):
    images = sorted(folder["val_images"].iterdir())[:2]
    before = snapshot(folder["val_images"])
    line = error_line(predict(trained, *images, f"--draw={folder['val_images']}"))
    assert f"--draw: {images[0].with_suffix('.png')} exists" in line
    assert "never writes over a file" in line
    assert snapshot(folder["val_images"]) == before


def test_an_image_that_resizes_to_nothing_is_named_and_the_others_run(trained, folder, tmp_path):
    images = sorted(folder["val_images"].iterdir())[:2]
    thin = tmp_path / "thin.png"  # torchvision's floor rule: 10 x 2000 -> 0 x 128 at (128, 128)
    cv2.imwrite(str(thin), np.full((10, 2000, 3), 128, np.uint8))
    before = snapshot(folder["val_images"], tmp_path)
    run = predict(
        trained,
        images[0],
        thin,
        images[1],
        "--config.preprocess.resize=torchvision",
        "--config.model.head.num_classes=0",
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"predict: skipped {thin}: image of size 10x2000 resizes to an empty 0x128" in run.stderr
    assert "predict: 1 of 3 images skipped" in run.stderr
    report = json.loads(run.stdout)
    assert [entry["file"] for entry in report] == [str(images[0]), str(thin), str(images[1])]
    assert "scores" in report[0] and "scores" in report[2] and "error" in report[1]
    assert snapshot(folder["val_images"], tmp_path) == before


# --- annotations ---------------------------------------------------------------------------------


def edited_folder(folder, tmp_path, edit) -> dict:
    """`folder`'s paths with the training JSON replaced by an edited copy."""
    content = json.loads(Path(folder["train_json"]).read_text())
    edit(content)
    edited = tmp_path / "train.json"
    edited.write_text(json.dumps(content))
    return {**folder, "train_json": edited}


def train_on(paths, tmp_path) -> subprocess.CompletedProcess:
    return tool(
        "train.py",
        f"--config={TINY}",
        f"--workdir={tmp_path / 'work'}",
        f"--config.data.data_dir={tmp_path / 'data'}",
        "--config.data.source=coco_folder",
        "--config.data.classes=dataset",
        "--config.model.head.num_classes=0",
        *[f"--config.data.folder.{k}={v}" for k, v in paths.items()],
    )


def test_an_annotation_field_of_the_wrong_type_names_file_and_annotation(folder, tmp_path):
    def big_area(content):
        content["annotations"][2]["area"] = "big"

    paths = edited_folder(folder, tmp_path, big_area)
    annotation = json.loads(paths["train_json"].read_text())["annotations"][2]
    line = error_line(train_on(paths, tmp_path))
    assert line == (
        f"error: {paths['train_json']}: annotation id {annotation['id']} (image id "
        f"{annotation['image_id']}) has an invalid area 'big' (expected a finite number)"
    )


def test_boxes_of_negative_width_are_counted_as_what_they_are(folder, tmp_path):
    def negative_widths(content):
        for annotation in content["annotations"]:
            annotation["bbox"][2] = -annotation["bbox"][2]

    paths = edited_folder(folder, tmp_path, negative_widths)
    annotations = json.loads(paths["train_json"].read_text())["annotations"]
    crowd = sum(annotation.get("iscrowd", 0) for annotation in annotations)
    line = error_line(train_on(paths, tmp_path))
    assert "no usable images" in line
    assert f"'boxes_negative_size_dropped': {len(annotations) - crowd}" in line
    assert "outside" not in line and "small" not in line
