"""The epoch plan, per-process slices, iterator state and the evaluation batches."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from data_helpers import encode, folder_config, natural_image, random_dataset, write_coco_folder

from fcos_jax.data import epoch_plan, pipeline, preprocess

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    train = random_dataset(root / "src", 11, seed=21)
    val = random_dataset(root / "src", 7, seed=22, split="validation")
    return root, train, val


@pytest.fixture()
def config(folder):
    root, train, val = folder
    return folder_config(root / "tfds", train=train, val=val)


def _train(config, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return pipeline.TrainPipeline(config, **kw)


def _eval(config, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return pipeline.EvalPipeline(config, **kw)


def _json(path):
    content = json.loads(path.read_text())
    images = {img["id"]: img for img in content["images"]}
    anns = {i: [a for a in content["annotations"] if a["image_id"] == i] for i in images}
    return images, anns


# --------------------------------------------------------------------------------------------
# The epoch plan


def test_epoch_plan_is_a_function_of_seed_and_epoch_and_covers_every_example():
    canvas_of = np.array([0, 1, 0, 0, 1, 0, 0, 2, 0, 1])
    args = dict(scales=[(320, 256), (320, 192)], multiscale_mode="value", flip_ratio=0.5)
    plan = epoch_plan.plan_epoch(canvas_of, 3, 4, 7, 3, **args)
    again = epoch_plan.plan_epoch(canvas_of, 3, 4, 7, 3, **args)
    other = epoch_plan.plan_epoch(canvas_of, 3, 4, 7, 4, **args)
    for field in ("examples", "canvas", "scales", "flips"):
        np.testing.assert_array_equal(getattr(plan, field), getattr(again, field))
    assert not np.array_equal(plan.examples, other.examples) or not np.array_equal(
        plan.flips, other.flips
    )
    # groups of 6, 3, 1 examples in batches of 4: 2 + 1 + 1 steps
    assert plan.examples.shape == (4, 4)
    assert epoch_plan.steps_per_epoch(canvas_of, 3, 4) == 4
    assert set(plan.examples.ravel().tolist()) == set(range(10))
    for step in range(4):
        assert (canvas_of[plan.examples[step]] == plan.canvas[step]).all()
    assert set(map(tuple, plan.scales.reshape(-1, 2).tolist())) <= {(320, 256), (320, 192)}


PLANNING = ("examples", "geometry", "epoch_plan", "eval_plan")


def test_the_planning_modules_import_no_tensorflow():
    """The plans and the test-time preprocessing they share are NumPy: importing them loads no
    TensorFlow (only the tf.data pipelines and the training pixel transforms do)."""
    modules = ", ".join(f"fcos_jax.data.{name}" for name in (*PLANNING, "preprocess"))
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import {modules}; "
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


def test_steps_per_epoch_are_known_before_iterating_and_epochs_advance(config):
    train = _train(config)
    n = len(train.examples)
    sizes = np.bincount(train.canvas_of)
    assert train.steps_per_epoch == sum(-(-s // 4) for s in sizes)
    assert n == 11
    for _ in range(train.steps_per_epoch):
        next(train)
    assert train.state()["epoch"] == 1 and train.state()["step_in_epoch"] == 0
    assert train.step == train.steps_per_epoch


def test_two_processes_get_disjoint_complete_slices_of_the_same_global_batches(config):
    single = _train(config)
    halves = [_train(config, process_index=p, process_count=2) for p in range(2)]
    seen = set()
    for _ in range(single.steps_per_epoch):
        whole = next(single)
        parts = [next(h) for h in halves]
        assert parts[0]["image"].shape == parts[1]["image"].shape  # same canvas
        for key, value in whole.items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
        seen.update(whole["image_id"].tolist())
    ids = set(single.examples.image_ids.tolist())
    assert seen == ids  # every example once per epoch (last batches refilled by repeats)
    assert halves[0].state() == halves[1].state() == single.state()


def test_saved_state_continues_with_the_identical_next_batch(config):
    train = _train(config)
    for _ in range(train.steps_per_epoch - 1):
        next(train)
    saved = json.loads(json.dumps(train.state()))
    expected = [next(train) for _ in range(2)]  # crosses into epoch 1
    resumed = _train(config, state=saved)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert resumed.state() == train.state()


def test_state_of_another_dataset_or_batch_size_is_rejected(config):
    state = _train(config).state()
    config.train.batch_size = 2
    with pytest.raises(ValueError, match="saved global_batch_size=4"):
        _train(config, state=state)
    with pytest.raises(ValueError, match="step_in_epoch 99"):
        _train(config).restore({**_train(config).state(), "step_in_epoch": 99})


# --------------------------------------------------------------------------------------------
# Training batches


def test_training_boxes_map_back_to_the_json_boxes(config, folder):
    """Every slot flipped (flip_ratio 1): x1 = W - x2' - 1 (legacy), then / scale."""
    _, (train_json, _), _ = folder
    config.augment.flip_ratio = 1.0
    train = _train(config)
    images, anns = _json(train_json)
    for _ in range(train.steps_per_epoch):
        batch = next(train)
        for k, image_id in enumerate(batch["image_id"].tolist()):
            h, w = images[image_id]["height"], images[image_id]["width"]
            nh, nw = batch["image_hw"][k]
            sy, sx = batch["scale"][k]
            got = batch["boxes"][k][batch["box_valid"][k]].astype(np.float64)
            unflipped = np.stack([nw - got[:, 2] - 1, got[:, 1], nw - got[:, 0] - 1, got[:, 3]], 1)
            original = unflipped / [sx, sy, sx, sy]
            want = []
            for a in anns[image_id]:
                x, y, bw, bh = a["bbox"]
                want.append([x, y, min(x + bw - 1, w - 1), min(y + bh - 1, h - 1)])
            np.testing.assert_allclose(original, want, atol=2e-3)
            assert batch["labels"][k][: len(want)].tolist() == [
                {3: 0, 7: 1, 9: 2}[a["category_id"]] for a in anns[image_id]
            ]
            assert not batch["image"][k, nh:].any() and not batch["image"][k, :, nw:].any()


def test_training_image_is_the_reference_transform_of_the_file_within_one_level(config, folder):
    _, (_, image_dir), _ = folder
    config.augment.flip_ratio = 0.0
    train = _train(config)
    batch = next(train)
    names = dict(zip(train.examples.image_ids.tolist(), train.examples.filenames, strict=True))
    for k, image_id in enumerate(batch["image_id"].tolist()):
        bgr = cv2.imread(str(image_dir / names[image_id]))
        nh, nw = batch["image_hw"][k]
        want = cv2.resize(bgr, (int(nw), int(nh))).astype(np.float32) - np.float32(
            config.preprocess.mean
        )
        assert np.abs(batch["image"][k, :nh, :nw] - want).max() <= 1.0 + 1e-4


def test_range_mode_sizes_vary_within_the_scales_and_fit_the_canvas(config):
    config.augment.multiscale = ((160, 96), (160, 128))
    config.augment.multiscale_mode = "range"
    train = _train(config)
    shorts = set()
    for _ in range(3 * train.steps_per_epoch):
        batch = next(train)
        hw = batch["image_hw"]
        assert (hw.max(1) <= 160).all() and (hw <= batch["image"].shape[1:3]).all()
        shorts.update(hw.min(1).tolist())
    assert min(shorts) < 110 and max(shorts) >= 120


def test_images_without_boxes_and_box_overflow_are_counted(tmp_path, caplog):
    rng = np.random.default_rng(0)
    many = [{"id": i + 1, "category_id": 1, "bbox": [i, i, 10 + i, 10 + i]} for i in range(12)]
    images = [
        {"id": 1, "file_name": "a.png", "height": 64, "width": 64, "annotations": many},
        {"id": 2, "file_name": "b.png", "height": 64, "width": 64, "annotations": []},
        {
            "id": 3,
            "file_name": "c.png",
            "height": 64,
            "width": 64,
            "annotations": [{"id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}],
        },
    ]
    for img in images:
        img["data"] = encode(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "PNG")
    train = write_coco_folder(tmp_path, images, [(1, "x")])
    config = folder_config(tmp_path / "tfds", train=train)
    config.model.head.num_classes = 1
    with caplog.at_level(logging.WARNING, logger="fcos_jax.data.pipeline"):
        pipe = _train(config)
    assert pipe.examples.image_ids.tolist() == [1]
    assert pipe.examples.counts["images_without_boxes_skipped"] == 2
    assert pipe.examples.counts["boxes_over_max_dropped"] == 4
    assert sum("more than max_boxes=8" in r.getMessage() for r in caplog.records) == 1
    kept, _ = pipe.examples.ground_truth(0)
    np.testing.assert_array_equal(kept[:, 0], np.arange(4, 12))  # the 8 largest
    assert next(pipe)["box_valid"].sum(1).tolist() == [8] * 4


def test_explicit_canvases_pick_the_smallest_that_fits_and_reject_too_small(config):
    config.data.canvases = ((128, 160), (160, 128), (128, 128))
    train = _train(config)
    for _ in range(train.steps_per_epoch):
        batch = next(train)
        h, w = batch["image"].shape[1:3]
        assert (h, w) in {(128, 160), (160, 128), (128, 128)}
        if (h, w) != (128, 128):
            assert (batch["image_hw"].max(0) > 128).any()
    config.data.canvases = ((96, 96),)
    with pytest.raises(ValueError, match="data.canvases: no canvas .* holds img"):
        _train(config)
    config.data.canvases = ((100, 160),)
    with pytest.raises(ValueError, match="multiples of 32"):
        _train(config)


def test_class_count_must_match_the_head(config):
    config.model.head.num_classes = 80
    with pytest.raises(ValueError, match="3 classes, but model.head.num_classes is 80"):
        _train(config)


def test_global_batch_must_split_over_processes(config):
    config.train.batch_size = 3
    with pytest.raises(ValueError, match="train.batch_size: the global batch size 3"):
        _train(config, process_count=2)


# --------------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize("mode", ["mmdet_v1", "torchvision"])
def test_evaluation_images_equal_predicts_bit_for_bit(config, folder, mode):
    _, _, (val_json, image_dir) = folder
    if mode == "torchvision":
        p = config.preprocess
        p.resize, p.to_rgb, p.unit_range = "torchvision", True, True
        p.mean, p.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        p.scale_factor = "per_axis"
        config.test.postprocess, config.legacy_plus_one = "torchvision", False
    images, _ = _json(val_json)
    checked = 0
    for batch in _eval(config):
        for k in np.flatnonzero(batch["example_valid"]):
            path = image_dir / images[int(batch["image_id"][k])]["file_name"]
            want = preprocess.preprocess(path, config.preprocess)
            np.testing.assert_array_equal(batch["image"][k], want["image"])
            np.testing.assert_array_equal(batch["image_hw"][k], want["image_hw"])
            np.testing.assert_array_equal(batch["original_hw"][k], want["original_hw"])
            np.testing.assert_array_equal(batch["scale"][k], want["scale"].astype(np.float32))
            checked += 1
    assert checked == 7


def test_evaluation_boxes_divided_by_scale_are_the_json_boxes(config, folder):
    _, _, (val_json, _) = folder
    images, anns = _json(val_json)
    for batch in _eval(config):
        for k in np.flatnonzero(batch["example_valid"]):
            image_id = int(batch["image_id"][k])
            h, w = images[image_id]["height"], images[image_id]["width"]
            sy, sx = batch["scale"][k]
            got = batch["boxes"][k][batch["box_valid"][k]] / [sx, sy, sx, sy]
            want = [
                [x, y, min(x + bw - 1, w - 1), min(y + bh - 1, h - 1)]
                for x, y, bw, bh in (a["bbox"] for a in anns[image_id])
            ]
            np.testing.assert_allclose(got, want, atol=2e-3)


def test_evaluation_over_two_processes_sees_every_image_once_with_masked_dummies(config, folder):
    _, _, (val_json, _) = folder
    images, _ = _json(val_json)
    runs = [list(_eval(config, process_index=p, process_count=2)) for p in range(2)]
    assert len(runs[0]) == len(runs[1]) == _eval(config).num_steps
    valid_ids = []
    for step0, step1 in zip(*runs, strict=True):
        assert step0["image"].shape == step1["image"].shape and step0["image"].shape[0] == 2
        for step in (step0, step1):
            valid_ids += step["image_id"][step["example_valid"]].tolist()
            dummies = ~step["example_valid"]
            assert (step["image_id"][dummies] == -1).all()
            assert not step["image"][dummies].any() and not step["box_valid"][dummies].any()
    assert sorted(valid_ids) == sorted(images)
    shapes = {b["image"].shape[1:3] for b in runs[0]}
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in shapes) and len(shapes) >= 2


def test_evaluation_keeps_images_without_boxes(tmp_path):
    images = [
        {"id": 5, "file_name": "e.jpg", "height": 40, "width": 50, "annotations": []},
        {
            "id": 6,
            "file_name": "f.jpg",
            "height": 50,
            "width": 40,
            "annotations": [{"id": 1, "category_id": 1, "bbox": [1, 1, 9, 9]}],
        },
    ]
    for i, img in enumerate(images):
        img["data"] = encode(natural_image(img["height"], img["width"], i), "JPEG")
    val = write_coco_folder(tmp_path, images, [(1, "x")], split="validation")
    config = folder_config(tmp_path / "tfds", val=val)
    config.model.head.num_classes = 1
    ids = [b["image_id"][b["example_valid"]].tolist() for b in _eval(config, batch_size=2)]
    assert sorted(sum(ids, [])) == [5, 6]


def test_canvas_evaluation_pads_into_the_canvases_of_the_test_scale(config):
    config.data.eval_pad = "canvas"
    config.data.canvases = ((192, 192),)  # training canvases belong to the training scales
    shapes = {b["image"].shape[1:3] for b in _eval(config)}
    assert shapes and shapes <= {(128, 160), (160, 128)}
    config.data.eval_pad = "nearest"
    with pytest.raises(ValueError, match="data.eval_pad"):
        _eval(config)


def test_a_process_exits_cleanly_with_pipelines_still_running(folder, tmp_path):
    """Live generator-backed tf.data iterators abort or hang TensorFlow's shutdown unless the
    pipeline closes them first (atexit)."""
    root, train, val = folder
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
            from pathlib import Path
            from data_helpers import folder_config
            from fcos_jax.data import pipeline

            config = folder_config(
                Path({str(root / "tfds")!r}), train={tuple(map(str, train))!r},
                val={tuple(map(str, val))!r},
            )
            config.train.batch_size = 8
            train = pipeline.TrainPipeline(config, process_index=0, process_count=1)
            next(train)
            next(iter(pipeline.EvalPipeline(config, process_index=0, process_count=1)))
            print("done")
            """
        )
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("done")
    assert "terminate called" not in run.stderr
