"""The prediction API (fcos_jax.inference) and the predict CLI's error handling.

Numerical parity with the references is tested in test_torchvision_parity.py (torchvision) and
test_convert.py (mmdet v1 forward); here: the API's contract on a small random model (arrays,
paths and bytes give the same detections, batching changes nothing, results are in original
pixels with the class list applied), and end-to-end runs on converted mmdet v1- and v3-keyed
checkpoints.
"""

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest
import torch

from fcos_jax import inference, predict
from fcos_jax.config import base as config_base
from fcos_jax.config import classes, load_config
from fcos_jax.data import preprocess
from fcos_jax.detection import postprocess
from fcos_jax.models import build_model
from fcos_jax.predict import draw
from fcos_jax.testing.images import natural_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R50_GN = os.path.join(REPO, "configs", "fcos_r50_caffe_fpn_gn_1x.py")
FIRING_CLASSES = (0, 2, 15)  # person, car, cat


def tiny_config():
    """mmdet v1 semantics on a small network and a small input scale."""
    c = config_base.get_base_config()
    c.model.backbone.depth = 18
    c.model.fpn.out_channels = 32
    c.model.head.feat_channels = 32
    c.model.head.stacked_convs = 1
    c.preprocess.scale = (160, 96)
    return c


def firing_variables(config, seed=0):
    """Random variables (from the model's shapes, no compiled init) with a classifier bias that
    makes a few classes fire (sigmoid 0.5) and the rest stay silent."""
    model = build_model(config.model)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("kernel"):
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape) * np.sqrt(1.0 / fan_in)
        elif name.endswith(("var", "scale")):
            value = rng.uniform(0.8, 1.2, leaf.shape)
        else:  # biases, BN means
            value = rng.normal(0.0, 0.05, leaf.shape)
        if name.endswith("conv_cls/bias"):
            value = np.full(leaf.shape, -4.0)
            value[list(FIRING_CLASSES)] = 0.0
        return np.asarray(value, np.float32)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


@pytest.fixture(scope="module")
def detector():
    config = tiny_config()
    return inference.Detector(config, firing_variables(config))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_images")
    rgbs = [natural_image(90, 130, 1), natural_image(91, 128, 2), natural_image(140, 70, 3)]
    paths = []
    for i, rgb in enumerate(rgbs):
        paths.append(root / f"image_{i}.png")
        cv2.imwrite(str(paths[-1]), rgb[:, :, ::-1])
    return rgbs, paths


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_arrays_paths_and_bytes_give_identical_detections(detector, images):
    rgbs, paths = images
    from_arrays = detector(rgbs)
    from_paths = detector(paths)
    from_bytes = detector([p.read_bytes() for p in paths])
    assert len(from_arrays) == 3
    assert sum(len(d["scores"]) for d in from_arrays) > 0
    for a, p, b in zip(from_arrays, from_paths, from_bytes, strict=True):
        assert_same(a, p)
        assert_same(a, b)


def test_a_single_image_is_accepted_without_a_list(detector, images):
    rgbs, paths = images
    assert_same(detector(rgbs[0])[0], detector([rgbs[0]])[0])
    assert_same(detector(str(paths[0]))[0], detector([rgbs[0]])[0])


def test_batching_images_of_equal_padded_shape_changes_nothing(detector, images):
    rgbs, _ = images
    # images 0 and 1 pad to the same shape (96x160 after resize), image 2 to another.
    shapes = {detector.preprocess(rgb)["image"].shape for rgb in rgbs}
    assert len(shapes) == 2
    one_by_one = [detector([rgb])[0] for rgb in rgbs]
    batched = detector(rgbs, batch_size=2)
    for a, b in zip(one_by_one, batched, strict=True):
        assert a["labels"].tolist() == b["labels"].tolist()
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)


def test_results_are_original_pixel_boxes_with_class_ids_and_names(detector, images):
    rgbs, _ = images
    coco = classes.coco_classes()
    for rgb, dets in zip(rgbs, detector(rgbs), strict=True):
        h, w = rgb.shape[:2]
        n = len(dets["scores"])
        assert dets["boxes"].shape == (n, 4) and dets["boxes"].dtype == np.float32
        assert dets["labels"].shape == dets["category_ids"].shape == dets["names"].shape == (n,)
        # mmdet v1 clamps to the resized image minus one, then divides by the scale factor.
        scale = detector.preprocess(rgb)["scale"][0]
        new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
        assert np.all(dets["boxes"] >= 0)
        assert np.all(dets["boxes"][:, [0, 2]] <= (new_w - 1) / scale + 1e-3)
        assert np.all(dets["boxes"][:, [1, 3]] <= (new_h - 1) / scale + 1e-3)
        assert np.all(np.diff(dets["scores"]) <= 0)
        assert set(dets["labels"].tolist()) <= set(FIRING_CLASSES)
        for label, cid, name in zip(
            dets["labels"], dets["category_ids"], dets["names"], strict=True
        ):
            assert (cid, name) == coco[label]


def test_detections_equal_preprocess_forward_and_postprocess_composed_by_hand(detector, images):
    rgb = images[0][0]
    item = preprocess.preprocess(rgb, detector.config.preprocess)
    heads = detector.forward(item["image"][None])
    t = detector.config.test
    out = postprocess.detect(
        heads,
        item["image_hw"][None],
        item["scale"][None].astype(np.float32),
        original_hw=item["original_hw"][None],
        mode="mmdet_v1",
        strides=(8, 16, 32, 64, 128),
        nms_pre=t.nms_pre,
        score_thr=t.score_thr,
        nms_iou=t.nms_iou,
        max_per_img=t.max_per_img,
    )
    valid = np.asarray(out["valid"][0])
    dets = detector([rgb])[0]
    np.testing.assert_allclose(dets["boxes"], np.asarray(out["boxes"][0])[valid], atol=1e-4)
    np.testing.assert_allclose(dets["scores"], np.asarray(out["scores"][0])[valid], atol=1e-6)


def test_head_outputs_have_the_level_shapes_of_the_padded_input(detector, images):
    rgb = images[0][0]  # 90x130 -> 96x139 -> padded 96x160
    levels = detector.head_outputs(rgb)
    sizes = [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]
    assert [lv["cls_logits"].shape for lv in levels] == [(1, h, w, 80) for h, w in sizes]
    assert [lv["bbox_reg"].shape for lv in levels] == [(1, h, w, 4) for h, w in sizes]
    assert [lv["centerness"].shape for lv in levels] == [(1, h, w, 1) for h, w in sizes]
    assert all(np.all(lv["bbox_reg"] > 0) for lv in levels)  # exp(scale * x)


def test_canvas_mode_pads_each_image_into_its_orientation_canvas(detector, images):
    """data.eval_pad = 'canvas' (as evaluation pads): images of different padded sizes share a
    canvas (one compiled program), landscape and portrait take their own, and the detections
    are those of the reference input zero padded into the canvas by hand."""
    config = tiny_config()
    config.data.eval_pad = "canvas"  # scale (160, 96): canvases 96x160 and 160x96
    canvas_detector = inference.Detector(config, detector.variables)
    rgbs = [natural_image(90, 130, 1), natural_image(90, 100, 2), natural_image(140, 70, 3)]
    assert [canvas_detector.preprocess(r)["image"].shape[:2] for r in rgbs] == [
        (96, 160),
        (96, 160),
        (160, 96),
    ]
    assert detector.preprocess(rgbs[1])["image"].shape[:2] == (96, 128)  # next multiple of 32
    found = canvas_detector(rgbs, batch_size=2)
    for rgb, dets, canvas_hw in zip(rgbs, found, [(96, 160), (96, 160), (160, 96)], strict=True):
        item = preprocess.preprocess(rgb, config.preprocess)
        h, w = item["image"].shape[:2]
        padded = np.pad(item["image"], ((0, canvas_hw[0] - h), (0, canvas_hw[1] - w), (0, 0)))
        ref = canvas_detector.detect_batch(
            padded[None], item["image_hw"][None], item["scale"][None], item["original_hw"][None]
        )
        n = int(ref["valid"][0].sum())
        assert n == len(dets["scores"]) > 0
        np.testing.assert_allclose(dets["boxes"], ref["boxes"][0, :n], atol=1e-4)
        np.testing.assert_allclose(dets["scores"], ref["scores"][0, :n], atol=1e-6)
    # The training canvases (data.canvases) belong to the training scales: not to prediction.
    config.data.canvases = ((96, 96),)
    shape = inference.Detector(config, detector.variables).preprocess(rgbs[0])["image"].shape
    assert shape[:2] == (96, 160)


def test_bad_inputs_raise_errors_naming_them(detector, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        detector([tmp_path / "missing.jpg"])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n garbage")
    with pytest.raises(ValueError, match="corrupt.png"):
        detector([corrupt])
    with pytest.raises(ValueError, match=r"images\[1\].*uint8"):
        detector([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
    config = tiny_config()
    with pytest.raises(ValueError, match="num_classes"):
        inference.Detector(config, firing_variables(config), classes.coco91_classes())


# --- mmdet v1- and v3-keyed checkpoints, end to end -------------------------------------------


def mmdet_r50_gn_state_dict(names: str, seed: int) -> dict[str, torch.Tensor]:
    """Random mmdet FCOS R-50 caffe GN state dict (keys: docs/modes.md §2.11), v1 `fcos_*` or v3
    `conv_*`."""
    rng = np.random.default_rng(seed)
    sd = {}

    def put(key, shape, kind="conv"):
        if kind == "conv":
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)
        elif kind == "affine":
            value = rng.uniform(0.5, 1.0, shape)
        elif kind == "var":
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        sd[key] = torch.from_numpy(np.asarray(value, np.float32))

    def bn(name, channels):
        put(f"{name}.weight", (channels,), "affine")
        put(f"{name}.bias", (channels,), "bias")
        put(f"{name}.running_mean", (channels,), "bias")
        put(f"{name}.running_var", (channels,), "var")
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    put("backbone.conv1.weight", (64, 3, 7, 7))
    bn("backbone.bn1", 64)
    inplanes = 64
    for i, blocks in enumerate((3, 4, 6, 3)):
        planes = 64 * 2**i
        for j in range(blocks):
            p = f"backbone.layer{i + 1}.{j}."
            put(p + "conv1.weight", (planes, inplanes, 1, 1))
            bn(p + "bn1", planes)
            put(p + "conv2.weight", (planes, planes, 3, 3))
            bn(p + "bn2", planes)
            put(p + "conv3.weight", (planes * 4, planes, 1, 1))
            bn(p + "bn3", planes * 4)
            if j == 0:
                put(p + "downsample.0.weight", (planes * 4, inplanes, 1, 1))
                bn(p + "downsample.1", planes * 4)
            inplanes = planes * 4
    for i, channels in enumerate((512, 1024, 2048)):
        put(f"neck.lateral_convs.{i}.conv.weight", (256, channels, 1, 1))
        put(f"neck.lateral_convs.{i}.conv.bias", (256,), "bias")
    for i in range(5):
        put(f"neck.fpn_convs.{i}.conv.weight", (256, 256, 3, 3))
        put(f"neck.fpn_convs.{i}.conv.bias", (256,), "bias")
    for branch in ("cls_convs", "reg_convs"):
        for i in range(4):
            put(f"bbox_head.{branch}.{i}.conv.weight", (256, 256, 3, 3))
            put(f"bbox_head.{branch}.{i}.gn.weight", (256,), "affine")
            put(f"bbox_head.{branch}.{i}.gn.bias", (256,), "bias")
    prefix = "bbox_head.fcos_" if names == "v1" else "bbox_head.conv_"
    for name, out in (("cls", 80), ("reg", 4), ("centerness", 1)):
        sd[f"{prefix}{name}.weight"] = torch.from_numpy(
            (rng.standard_normal((out, 256, 3, 3)) * 0.01).astype(np.float32)
        )
        sd[f"{prefix}{name}.bias"] = torch.zeros(out)
    sd[f"{prefix}cls.bias"][list(FIRING_CLASSES)] = 0.5  # a few classes fire
    sd[f"{prefix}cls.bias"][[c for c in range(80) if c not in FIRING_CLASSES]] = -4.0
    for level in range(5):
        sd[f"bbox_head.scales.{level}.scale"] = torch.tensor(float(rng.uniform(0.8, 1.2)))
    return sd


@pytest.mark.parametrize("names,mode", [("v1", "mmdet_v1"), ("v3", "mmdet_v3")])
def test_predict_runs_on_converted_mmdet_checkpoints(tmp_path, images, names, mode):
    pth = tmp_path / f"fcos_{names}.pth"
    torch.save({"state_dict": mmdet_r50_gn_state_dict(names, seed=7)}, pth)
    converted = tmp_path / "converted"
    subprocess.run(
        [
            sys.executable, "-m", "fcos_jax.convert", "--format=mmdet", f"--config={R50_GN}",
            f"--input={pth}", f"--output={converted}",
        ],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    config = load_config(R50_GN)
    config.preprocess.scale = (160, 96)
    config.test.postprocess = mode
    config.legacy_plus_one = mode == "mmdet_v1"
    config.preprocess.scale_factor = "single" if mode == "mmdet_v1" else "per_axis"
    detector = inference.Detector.from_config(config, converted)
    rgb = images[0][0]
    (dets,) = detector([rgb])
    assert 0 < len(dets["scores"]) <= 100
    assert set(dets["labels"].tolist()) <= set(FIRING_CLASSES)
    assert np.all(dets["boxes"] >= 0)
    h, w = rgb.shape[:2]
    limit = np.array([w, h, w, h]) + 1e-3
    assert np.all(dets["boxes"] <= limit)
    assert dets["names"].tolist() == [classes.coco_classes()[c][1] for c in dets["labels"]]


def test_predict_files_decodes_each_image_once_and_writes_what_the_api_detects(
    detector, images, tmp_path, monkeypatch
):
    """The command line's work (fcos_jax.predict): each file decoded once, that array given to
    the Detector and to the drawing; the JSON, drawings and head outputs are the API's on the
    file paths."""
    rgbs, paths = images
    paths = [str(p) for p in paths]
    expected, expected_heads = detector(paths), detector.head_outputs(paths[0])
    monkeypatch.setattr(
        inference.Detector, "from_config", classmethod(lambda cls, config, ckpt, **_: detector)
    )
    decoded, decode = [], preprocess.decode_image
    monkeypatch.setattr(
        preprocess, "decode_image", lambda data, name: decoded.append(name) or decode(data, name)
    )
    out, drawn, heads = tmp_path / "dets.json", tmp_path / "drawn", tmp_path / "heads.npz"
    report = predict.predict_files(
        detector.config,
        str(tmp_path),
        paths,
        output=str(out),
        draw_dir=str(drawn),
        dump_head_outputs=str(heads),
    )
    assert decoded == paths
    assert json.loads(out.read_text()) == report
    for entry, rgb, dets, path in zip(report, rgbs, expected, paths, strict=True):
        assert entry == predict.detections_to_json(path, rgb.shape[:2], dets)
        image = cv2.imread(str(drawn / f"{Path(path).stem}.png"))
        np.testing.assert_array_equal(image, draw.draw_detections(rgb[:, :, ::-1], dets, 0.3))
    dumped = np.load(heads)
    for key, value in predict.head_outputs_to_npz(expected_heads).items():
        np.testing.assert_array_equal(dumped[key], value, err_msg=key)


# --- the command line's errors ------------------------------------------------------------------


def run_predict(*args):
    return subprocess.run(
        [sys.executable, "-m", "fcos_jax.predict", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_cli_missing_image_checkpoint_and_config_give_one_line_errors(tmp_path, images):
    _, paths = images
    image = str(paths[0])
    cases = [
        (
            [f"--config={R50_GN}", f"--checkpoint={tmp_path}", str(tmp_path / "nope.jpg")],
            "nope.jpg",
        ),
        ([f"--config={R50_GN}", f"--checkpoint={tmp_path / 'ckpt'}", image], "ckpt"),
        ([f"--config={R50_GN}", f"--checkpoint={tmp_path}", image], "not a checkpoint directory"),
        ([f"--config={tmp_path / 'cfg.py'}", f"--checkpoint={tmp_path}", image], "cfg.py"),
    ]
    for args, named in cases:
        proc = run_predict(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert named in lines[0]


def test_cli_usage_errors_exit_2_with_one_line():
    """The same error path as every tool: no image, a missing required flag, an unknown flag."""
    cases = [
        ((f"--config={R50_GN}", "--checkpoint=x"), "IMAGE"),
        ((f"--config={R50_GN}", "x.jpg"), "--checkpoint"),
        ((f"--config={R50_GN}", "--checkpoint=x", "--no_such_flag=1", "x.jpg"), "no_such_flag"),
    ]
    for args, named in cases:
        proc = run_predict(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], lines


def test_drawing_keeps_scores_above_the_threshold_and_puts_the_best_label_on_top():
    from fcos_jax.predict.draw import draw_detections, label_color

    image = np.zeros((60, 80, 3), np.uint8)
    box = [20.0, 30.0, 60.0, 55.0]  # one object, one box per class, as class-aware NMS leaves it
    dets = {
        "boxes": np.asarray([box, box, [2.0, 2.0, 12.0, 12.0]], np.float32),
        "scores": np.asarray([0.9, 0.4, 0.1], np.float32),
        "labels": np.asarray([0, 1, 2]),
        "names": ["rectangle", "ellipse", "cross"],
    }
    drawn = draw_detections(image, dets, score_thr=0.3)
    label_pixel = drawn[29, 21]  # inside the label box above the object's top-left corner
    assert tuple(int(c) for c in label_pixel) == label_color(0)  # the 0.9 detection, drawn last
    assert not drawn[:15, :15].any()  # the 0.1 detection is below the threshold
    assert draw_detections(image, dets, score_thr=0.0)[:15, :15].any()


# --- what predict writes, and what it does with an image it cannot use ----------------------------


def test_drawing_names_are_unique_within_a_run():
    paths = predict.draw_paths(Path("d"), ["x/a.png", "y/a.jpg", "a_1.jpg", "b.png"])
    assert [p.name for p in paths] == ["a.png", "a_1.png", "a_1_1.png", "b.png"]


def test_predict_never_writes_over_an_input_or_an_existing_file(
    detector, images, tmp_path, monkeypatch
):
    _, paths = images
    folder = paths[0].parent  # the images' own folder as --draw: image_0.png would be replaced
    before = {p: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(
        inference.Detector, "from_config", classmethod(lambda cls, config, ckpt, **_: detector)
    )
    run = functools.partial(predict.predict_files, detector.config, str(tmp_path))
    with pytest.raises(FileExistsError, match=rf"--draw: {folder / 'image_0.png'} exists"):
        run([str(p) for p in paths], draw_dir=str(folder))
    with pytest.raises(ValueError, match=r"--output: .*image_1.png is the input image"):
        run([str(p) for p in paths], output=str(paths[1]))
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    drawn = tmp_path / "drawn"
    run([str(paths[0])], draw_dir=str(drawn))
    first = (drawn / "image_0.png").read_bytes()
    with pytest.raises(FileExistsError, match="image_0.png exists"):  # an earlier run's drawing
        run([str(paths[0])], draw_dir=str(drawn))
    assert (drawn / "image_0.png").read_bytes() == first


def test_an_image_predict_cannot_use_is_skipped_and_named_and_the_others_run(
    detector, images, tmp_path, monkeypatch, caplog
):
    _, paths = images
    thin = tmp_path / "thin.png"  # 3 x 2000 at scale (160, 96): int(3 * 0.08 + 0.5) = 0 rows
    cv2.imwrite(str(thin), np.full((3, 2000, 3), 128, np.uint8))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not a jpeg")
    files = [str(paths[0]), str(thin), str(corrupt), str(paths[2])]
    monkeypatch.setattr(
        inference.Detector, "from_config", classmethod(lambda cls, config, ckpt, **_: detector)
    )
    with caplog.at_level(logging.WARNING):
        report = predict.predict_files(detector.config, str(tmp_path), files)
    expected = detector([paths[0], paths[2]])
    assert report[0]["scores"] == [float(s) for s in expected[0]["scores"]]
    assert report[3]["scores"] == [float(s) for s in expected[1]["scores"]]
    assert report[1] == {
        "file": str(thin),
        "error": f"{thin}: image of size 3x2000 resizes to an empty 0x160 image "
        "(preprocess.scale (160, 96))",
    }
    assert report[2]["file"] == str(corrupt) and str(corrupt) in report[2]["error"]
    assert "predict: 2 of 4 images skipped" in caplog.text
    with pytest.raises(ValueError, match=rf"{thin}: image of size 3x2000.*\(and 1 other images\)"):
        predict.predict_files(detector.config, str(tmp_path), [str(thin), str(corrupt)])
