"""torchvision FCOS parity: a randomised `fcos_resnet50_fpn` checkpoint, converted with the CLI,
gives the same head outputs and detections in our model, through the Python API, the predict CLI
and the compare CLI; exported back (`convert --to torchvision`) it is the original file.

The reference is torchvision itself (its transform, backbone, head and postprocess). Most checks
run at a reduced scale (min_size 320, max_size 512 on both sides) to stay fast; one image runs at
the full 800/1333 scale.
"""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from fcos_jax import compare, inference
from fcos_jax.compare.torchvision_random import random_fcos
from fcos_jax.config import load_config
from fcos_jax.config.classes import coco91_classes
from fcos_jax.testing.images import natural_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "torchvision_fcos_r50_fpn.py")
SMALL = (512, 320)  # (max_size, min_size)
STRIDES = (8, 16, 32, 64, 128)
# Sizes that are not multiples of 32. The two small-scale ones resize to 320x480 and 320x467,
# both padded to 320x480 (one compiled program); the portrait one runs at the full scale
# (1135x800, padded 1152x800).
IMAGES = {"landscape": (333, 500, 11), "wide": (340, 497, 12), "portrait": (427, 301, 13)}
SMALL_IMAGES = ("landscape", "wide")


def _env(cache_dir) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=REPO,
    )
    return env


def _run(args, cache_dir, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=_env(cache_dir), capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random torchvision model, its .pth, the converted checkpoint (via the convert CLI) and
    the test images on disk."""
    root = tmp_path_factory.mktemp("tv_parity")
    cache_dir = root / "jax_cache"
    images = {name: natural_image(h, w, seed) for name, (h, w, seed) in IMAGES.items()}
    paths = {}
    for name, rgb in images.items():
        paths[name] = root / f"{name}.png"
        cv2.imwrite(str(paths[name]), rgb[:, :, ::-1])
    model = random_fcos(0, images["landscape"], min_size=min(SMALL), max_size=max(SMALL))
    pth = root / "fcos_random.pth"
    torch.save(model.state_dict(), pth)
    converted = root / "converted"
    _run(
        [
            "fcos_jax.convert",
            "--format=torchvision",
            f"--config={CONFIG}",
            f"--input={pth}",
            f"--output={converted}",
        ],
        cache_dir,
    )
    return {
        "model": model,
        "pth": pth,
        "converted": converted,
        "images": images,
        "paths": paths,
        "cache_dir": cache_dir,
    }


def small_config():
    config = load_config(CONFIG)
    config.preprocess.scale = SMALL
    return config


@pytest.fixture(scope="module")
def detector(setup):
    det = inference.Detector.from_config(
        small_config(), setup["converted"], compilation_cache_dir=setup["cache_dir"]
    )
    yield det
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


_TORCHVISION_RUNS: dict = {}


def torchvision_run(model, rgb: np.ndarray, scale=SMALL):
    """One torchvision forward (memoised per image and scale): its input tensor (NHWC), per-level
    head outputs in our layout and units (bbox_reg = relu'd output x stride), and its final
    detections. The head outputs are captured by hooks from the same full-model call."""
    key = (id(model), rgb.tobytes(), scale)
    if key in _TORCHVISION_RUNS:
        return _TORCHVISION_RUNS[key]
    model.transform.min_size, model.transform.max_size = (min(scale),), max(scale)
    captured = {}
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, o: captured.update(features=o)),
        model.head.register_forward_hook(lambda m, i, o: captured.update(head=o)),
        model.transform.register_forward_hook(lambda m, i, o: captured.update(batch=o[0])),
    ]
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    try:
        with torch.no_grad():
            dets = model([tensor])[0]
    finally:
        for hook in hooks:
            hook.remove()
    head = captured["head"]
    levels, start = [], 0
    for feature, stride in zip(captured["features"].values(), STRIDES, strict=True):
        h, w = feature.shape[-2:]
        end = start + h * w
        levels.append(
            {
                "cls_logits": head["cls_logits"][0, start:end].reshape(1, h, w, -1).numpy(),
                "bbox_reg": head["bbox_regression"][0, start:end].reshape(1, h, w, 4).numpy()
                * stride,
                "centerness": head["bbox_ctrness"][0, start:end].reshape(1, h, w, 1).numpy(),
            }
        )
        start = end
    dets = {k: v.numpy() for k, v in dets.items()}
    result = (captured["batch"].tensors.permute(0, 2, 3, 1).numpy(), levels, dets)
    _TORCHVISION_RUNS[key] = result
    return result


def assert_heads_close(ours, ref):
    assert len(ours) == len(ref) == 5
    for level, (o, r) in enumerate(zip(ours, ref, strict=True)):
        for key in ("cls_logits", "bbox_reg", "centerness"):
            assert o[key].shape == r[key].shape, (level, key)
            max_diff = np.abs(o[key] - r[key]).max()
            assert max_diff <= 1e-4 * np.abs(r[key]).max(), (level, key, max_diff)


def assert_same_detections(ours, ref):
    """Same count; every reference detection pairs with one of ours of the same label, box
    within 0.01 px and score within 1e-4."""
    assert len(ours["scores"]) == len(ref["scores"]) > 0
    free = np.ones(len(ours["scores"]), dtype=bool)
    for i in range(len(ref["scores"])):
        close = (
            free
            & (ours["labels"] == ref["labels"][i])
            & np.all(np.abs(ours["boxes"] - ref["boxes"][i]) <= 0.01, axis=1)
            & (np.abs(ours["scores"] - ref["scores"][i]) <= 1e-4)
        )
        assert close.any(), f"reference detection {i}: {ref['boxes'][i]} {ref['scores'][i]}"
        free[np.flatnonzero(close)[0]] = False


@pytest.mark.parametrize("name", SMALL_IMAGES)
def test_head_outputs_match_torchvision_on_the_same_input(setup, detector, name):
    ref_input, ref_levels, _ = torchvision_run(setup["model"], setup["images"][name])
    assert_heads_close(detector.forward(ref_input), ref_levels)


@pytest.mark.parametrize("name", SMALL_IMAGES)
def test_detections_match_torchvision_end_to_end(setup, detector, name):
    rgb = setup["images"][name]
    _, _, ref_dets = torchvision_run(setup["model"], rgb)
    (ours,) = detector([rgb])
    assert_same_detections(ours, ref_dets)
    np.testing.assert_array_equal(ours["category_ids"], ours["labels"])  # coco91: id = channel


def test_full_scale_800_heads_and_detections_match_torchvision(setup, detector):
    det = inference.Detector(load_config(CONFIG), detector.variables, detector.classes)
    rgb = setup["images"]["portrait"]
    ref_input, ref_levels, ref_dets = torchvision_run(setup["model"], rgb, scale=(1333, 800))
    assert ref_input.shape == (1, 1152, 800, 3)
    assert_heads_close(det.forward(ref_input), ref_levels)
    (ours,) = det([rgb])
    assert_same_detections(ours, ref_dets)


def test_predict_cli_writes_json_drawings_and_head_outputs(setup, detector, tmp_path):
    paths = setup["paths"]
    out_json, draw_dir, heads = tmp_path / "dets.json", tmp_path / "drawn", tmp_path / "heads.npz"
    _run(
        [
            "fcos_jax.predict",
            f"--config={CONFIG}",
            f"--config.preprocess.scale={SMALL}",
            f"--checkpoint={setup['converted']}",
            f"--output={out_json}",
            f"--draw={draw_dir}",
            f"--dump-head-outputs={heads}",
            str(paths["landscape"]),
            str(paths["wide"]),
        ],
        setup["cache_dir"],
    )
    report = json.loads(out_json.read_text())
    assert [entry["file"] for entry in report] == [str(paths["landscape"]), str(paths["wide"])]
    for entry, name in zip(report, SMALL_IMAGES, strict=True):
        h, w, _ = IMAGES[name]
        assert (entry["height"], entry["width"]) == (h, w)
        _, _, ref = torchvision_run(setup["model"], setup["images"][name])
        ours = {
            "boxes": np.array(entry["boxes"], np.float32).reshape(-1, 4),
            "scores": np.array(entry["scores"], np.float32),
            "labels": np.array(entry["category_ids"]),
        }
        assert_same_detections(ours, ref)
        coco_names = dict(coco91_classes())
        assert entry["names"] == [coco_names[cid] for cid in entry["category_ids"]]
        assert entry["labels"] == entry["category_ids"]  # coco91: channel = category id
        drawn = cv2.imread(str(draw_dir / f"{name}.png"))
        assert drawn.shape == (h, w, 3)
        assert not np.array_equal(drawn[:, :, ::-1], setup["images"][name])  # boxes were drawn
    ref_input, ref_levels, _ = torchvision_run(setup["model"], setup["images"]["landscape"])
    dumped = np.load(heads)
    expected_keys = {f"{k}_{i}" for k in ("cls_logits", "bbox_reg", "centerness") for i in range(5)}
    assert set(dumped.files) == expected_keys
    dumped_levels = [
        {k: dumped[f"{k}_{i}"] for k in ("cls_logits", "bbox_reg", "centerness")} for i in range(5)
    ]
    for level in dumped_levels:
        assert all(v.dtype == np.float32 and v.ndim == 4 for v in level.values())
    assert dumped_levels[0]["cls_logits"].shape == (1, 40, 60, 91)
    assert_heads_close(dumped_levels, ref_levels)


def test_compare_cli_passes_on_the_converted_checkpoint(setup, detector):
    proc = _run(
        [
            "fcos_jax.compare",
            "--format=torchvision",
            f"--config={CONFIG}",
            f"--config.preprocess.scale={SMALL}",
            f"--input={setup['pth']}",
            str(setup["paths"]["wide"]),
        ],
        setup["cache_dir"],
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "detections agree" in proc.stdout and "PASS" in proc.stdout


def test_exported_torchvision_file_is_the_original(setup, tmp_path):
    """torchvision -> ours (the convert CLI, in `setup`) -> torchvision (convert --to): every
    tensor of the original state dict back bit for bit (BatchNorm counters included), loaded by
    `fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)` with strict=True.
    Being the original, it detects in torchvision's FCOS as our checkpoint does (the tests
    above; `compare --format torchvision --input exported.pth --checkpoint DIR` prints it)."""
    exported = tmp_path / "exported.pth"
    proc = _run(
        [
            "fcos_jax.convert",
            "--to=torchvision",
            f"--config={CONFIG}",
            f"--config.preprocess.scale={SMALL}",
            f"--checkpoint={setup['converted']}",
            f"--output={exported}",
        ],
        setup["cache_dir"],
    )
    assert "fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91" in proc.stdout
    written = torch.load(exported, weights_only=True)
    original = setup["model"].state_dict()
    assert written.keys() == original.keys()
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    assert int(written["backbone.body.bn1.num_batches_tracked"]) == 1  # one calibration pass
    from torchvision.models.detection import fcos_resnet50_fpn

    model = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    model.load_state_dict(written, strict=True)


def test_compare_flags_head_differences_and_unmatched_detections(setup):
    _, ref_levels, ref_dets = torchvision_run(setup["model"], setup["images"]["landscape"])
    ours = [{k: v.copy() for k, v in level.items()} for level in ref_levels]
    ours[2]["centerness"][0, 3, 4, 0] += 1e-3
    table = compare.level_differences(ours, ref_levels)
    max_diff, _, ref_max = table[2]["centerness"]
    assert max_diff == pytest.approx(1e-3, rel=1e-3) and max_diff > compare.HEAD_RTOL * ref_max
    assert table[1]["centerness"][0] == 0.0
    assert compare.match_detections(ref_dets, ref_dets) == []
    for change in ("box", "score", "label", "count"):
        changed = {k: v.copy() for k, v in ref_dets.items()}
        if change == "box":
            changed["boxes"][5, 2] += 0.02
        elif change == "score":
            changed["scores"][5] += 2e-4
        elif change == "label":
            changed["labels"][5] += 1
        else:
            changed = {k: v[:-1] for k, v in changed.items()}
        assert compare.match_detections(changed, ref_dets), change


def test_bfloat16_compute_stays_near_torchvision_float32(setup, detector):
    """model.dtype = bfloat16 (convolutions and norms compute in bfloat16; parameters, head
    outputs, decoding and NMS stay float32) on the converted torchvision weights: every level's
    head outputs within BFLOAT16_HEAD_RTOL of torchvision's float32 ones (relative to the level's
    max|ref|). Detections are matched by compare's rule at bfloat16 tolerances and the share
    matched printed (-s), not asserted: these random weights put all 100 kept detections within
    0.1 of each other in score, so bfloat16 rounding changes which of them make the top 100 (the
    trained demo detector's AP is compared in tests/test_mixed_precision.py)."""
    from fcos_jax.compare import checks

    config = small_config()
    config.model.dtype = "bfloat16"
    bf16 = inference.Detector(config, detector.variables, detector.classes)
    worst = {key: 0.0 for key in ("cls_logits", "bbox_reg", "centerness")}
    matched = total = 0
    for name in SMALL_IMAGES:
        rgb = setup["images"][name]
        ref_input, ref_levels, ref_dets = torchvision_run(setup["model"], rgb)
        for level, level_ref in zip(bf16.forward(ref_input), ref_levels, strict=True):
            for key in worst:
                assert level[key].dtype == np.float32, key
                diff = np.abs(level[key] - level_ref[key]).max() / np.abs(level_ref[key]).max()
                worst[key] = max(worst[key], float(diff))
        (ours,) = bf16([rgb])
        problems = checks.match_detections(
            ours, ref_dets, checks.BFLOAT16_BOX_ATOL, checks.BFLOAT16_SCORE_ATOL, min_score=0.0
        )
        total += len(ref_dets["scores"])
        matched += len(ref_dets["scores"]) - len(problems)
    print(
        f"bfloat16 vs torchvision float32, head max|diff| / max|ref|: {worst}; detections "
        f"matched by compare's rule at bfloat16 tolerances: {matched} of {total}"
    )
    assert all(v <= checks.BFLOAT16_HEAD_RTOL for v in worst.values()), worst
