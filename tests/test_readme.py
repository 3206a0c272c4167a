"""The README's serving client, run as written, so that the README and the artifacts cannot drift.

The fenced blocks marked `<!-- readme-test: NAME -->` in README.md (the client, one block per
runtime, the outputs) and docs/export.md (the torchvision resize, StableHLO compiled as Detector
compiles it) are extracted and run:

  * against artifacts of a small random model with the README's settings (mmdet_v1 semantics,
    `preprocess.scale` (1333, 800), the landscape and portrait canvases, the README's file
    names), in a process that never imports fcos_jax, each detection set matched with what
    `Detector` in canvas mode detects on the same file by the tolerance docs/export.md states
    for that runtime;
  * in this process, for the inputs: the README's resize and the documented torchvision resize
    give exactly the arrays `fcos_jax.export.serving_inputs` gives, for mmdet_v1, mmdet_v3 and
    torchvision configs, and the README's canvas choice is `canvas.canvas_for`'s, which
    `Detector` uses.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_predict import firing_variables, tiny_config

from fcos_jax import compare, export, inference
from fcos_jax.config import load_config
from fcos_jax.data import canvas
from fcos_jax.testing.images import natural_image
from fcos_jax.utils import compile_options

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```python\n(.*?)```", re.S)
RUNTIMES = ("stablehlo", "savedmodel", "onnx")
AS_DETECTOR = "stablehlo-as-detector"  # docs/export.md's StableHLO runner
# The README's settings: its SCALE, canvases and artifact names.
SCALE = (1333, 800)
LANDSCAPE, PORTRAIT = (800, 1344), (1344, 800)
# Resized to 800 x 1066 (landscape) and 1066 x 800 (portrait).
IMAGES = {"landscape.jpg": (300, 400, 1), "portrait.jpg": (400, 300, 2)}
# The portrait artifact only as StableHLO: the README's name for it is the same expression in
# every runtime, and each other format costs an export and a compile.
RUNS = {"landscape.jpg": (*RUNTIMES, AS_DETECTOR), "portrait.jpg": ("stablehlo", AS_DETECTOR)}
# docs/export.md §5, StableHLO compiled with Detector's options: its detections in its order.
AS_DETECTOR_BOX_ATOL, AS_DETECTOR_SCORE_ATOL = 1e-3, 1e-5
HARNESS = """
import json, shutil, sys
import numpy as np
blocks = json.load(open("blocks.json"))
results = {}
for image, runtimes in json.load(open("runs.json")).items():
    shutil.copy(image, "image.jpg")
    ns = {}
    exec(blocks["client"], ns)
    for runtime in runtimes:
        exec(blocks[runtime], ns)
        exec(blocks["outputs"], ns)
        key = f"{image}:{runtime}"
        results.update({f"{key}:canvas": np.asarray(ns["canvas"])})
        results.update({f"{key}:{k}": np.asarray(ns[k]) for k in ("boxes", "scores", "classes")})
        if "options" in ns:
            results[f"{key}:options"] = np.asarray(json.dumps(ns.pop("options")))
np.savez("results.npz", **results)
if "fcos_jax" in sys.modules:
    sys.exit("fcos_jax was imported")
"""


def readme_blocks() -> dict[str, str]:
    """{name: code} of the marked blocks of README.md and docs/export.md."""
    blocks = {}
    for path in (REPO / "README.md", REPO / "docs" / "export.md"):
        for name, code in MARKER.findall(path.read_text()):
            assert name not in blocks, f"{path.name}: block {name} marked twice"
            blocks[name] = code
    return blocks


def small_v1_config():
    """The README's serving settings on a small network: mmdet_v1 (caffe BGR, scale (s, s)),
    scale (1333, 800), canvas-mode padding."""
    config = tiny_config()
    config.model.backbone.stem_width = 16
    config.preprocess.scale = SCALE
    config.data.eval_pad = "canvas"
    return config


@pytest.fixture(scope="module")
def blocks():
    found = readme_blocks()
    expected = {"client", "outputs", "torchvision-resize", AS_DETECTOR, *RUNTIMES}
    assert set(found) == expected, sorted(found)
    return found


@pytest.fixture(scope="module")
def detector():
    config = small_v1_config()
    return inference.Detector(config, firing_variables(config))


@pytest.fixture(scope="module")
def client_run(blocks, detector, tmp_path_factory):
    """The README's client on the README's artifacts: {key: array} of its results."""
    root = tmp_path_factory.mktemp("readme_client")
    for name, (h, w, seed) in IMAGES.items():
        assert cv2.imwrite(str(root / name), natural_image(h, w, seed)[..., ::-1])
    for fmt in RUNTIMES:
        suffix = "_savedmodel" if fmt == "savedmodel" else f".{fmt}"
        export.export_detector(detector, fmt, root / f"fcos_r50{suffix}", LANDSCAPE)
    export.export_detector(detector, "stablehlo", root / "fcos_r50_portrait.stablehlo", PORTRAIT)
    (root / "blocks.json").write_text(json.dumps(blocks))
    (root / "runs.json").write_text(json.dumps(RUNS))
    proc = subprocess.run([sys.executable, "-c", HARNESS], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, dict(np.load(root / "results.npz"))


@pytest.fixture(scope="module")
def detector_run(client_run, detector):
    """{image: (its canvas in Detector, Detector's detections)} on the client's files."""
    root, _ = client_run
    paths = [str(root / image) for image in IMAGES]
    canvases = [detector.preprocess(path)["image"].shape[:2] for path in paths]
    return dict(zip(IMAGES, zip(canvases, detector(paths), strict=True), strict=True))


@pytest.mark.parametrize(
    "image, runtime", [(image, runtime) for image, runs in RUNS.items() for runtime in runs]
)
def test_readme_client_detects_what_detector_detects(client_run, detector_run, image, runtime):
    _, results = client_run
    key = f"{image}:{runtime}"
    expected_canvas, ours = detector_run[image]
    assert tuple(results[f"{key}:canvas"]) == expected_canvas
    assert expected_canvas == (LANDSCAPE if image.startswith("landscape") else PORTRAIT)
    found = {
        "boxes": results[f"{key}:boxes"],
        "scores": results[f"{key}:scores"],
        "labels": results[f"{key}:classes"],
    }
    reference = {"boxes": ours["boxes"], "scores": ours["scores"], "labels": ours["category_ids"]}
    assert len(reference["scores"]) > 0
    # docs/export.md §5: every runtime of the README's client, StableHLO through plain
    # `exported.call` included, meets compare's rule.
    assert compare.match_detections(found, reference) == [], key
    if runtime == AS_DETECTOR:  # the same order, closer
        options = json.loads(str(results[f"{key}:options"]))
        assert options == compile_options.compiler_options("cpu")
        np.testing.assert_array_equal(found["labels"], reference["labels"])
        for name, atol in (("boxes", AS_DETECTOR_BOX_ATOL), ("scores", AS_DETECTOR_SCORE_ATOL)):
            np.testing.assert_allclose(found[name], reference[name], rtol=0, atol=atol)
    same = found["labels"] == reference["labels"]
    box = float(np.max(np.abs(found["boxes"] - reference["boxes"])[same], initial=0.0))
    score = float(np.max(np.abs(found["scores"] - reference["scores"]), initial=0.0))
    print(f"README client {key}: worst box difference {box:.2e} px, score {score:.2e}")


def _client_namespace(blocks, directory: Path, monkeypatch) -> dict:
    """The README client's and the torchvision resize's definitions, run in `directory` (the
    client block ends by reading an image.jpg there)."""
    cv2.imwrite(str(directory / "image.jpg"), natural_image(64, 80, 0)[..., ::-1])
    monkeypatch.chdir(directory)
    namespace: dict = {}
    exec(blocks["client"], namespace)
    namespace["MEAN"], namespace["STD"] = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    exec(blocks["torchvision-resize"], namespace)
    return namespace


def _resized_to(h: int, w: int):
    """A stand-in for the README's resize that gives an h x w image."""
    return lambda path: (np.zeros((h, w, 3), np.uint8), (h, w), (1.0, 1.0))


SIZES = ((333, 500), (500, 333), (427, 640), (480, 480), (37, 50), (1000, 1501))


@pytest.mark.parametrize(
    "config_name, resize",
    [
        ("fcos_r50_caffe_fpn_gn_1x", "mmdet_resize"),  # mmdet_v1: scale (s, s) is read
        ("fcos_center_normbbox_centeronreg_giou_r50_caffe_fpn_gn_1x", "mmdet_resize"),  # v3
        ("torchvision_fcos_r50_fpn", "torchvision_resize"),
    ],
)
def test_readme_inputs_equal_the_library_serving_inputs(
    blocks, tmp_path, monkeypatch, config_name, resize
):
    config = load_config(REPO / "configs" / f"{config_name}.py")
    assert tuple(config.preprocess.scale) == SCALE
    namespace = _client_namespace(blocks, tmp_path, monkeypatch)
    if config.preprocess.resize == "torchvision":
        assert (namespace["MEAN"], namespace["STD"]) == (
            tuple(config.preprocess.mean),
            tuple(config.preprocess.std),
        )
    for i, (h, w) in enumerate(SIZES):
        path = str(tmp_path / f"{h}x{w}.png")
        assert cv2.imwrite(path, natural_image(h, w, i)[..., ::-1])
        canvas_hw, inputs = namespace["serving_inputs"](path, resize=namespace[resize])
        expected = export.serving_inputs([path], config, canvas_hw)
        assert inputs["images"].dtype == expected["images"].dtype
        for key in ("images", "image_hw", "original_hw"):
            np.testing.assert_array_equal(inputs[key], expected[key], err_msg=f"{h}x{w} {key}")
        if config.test.postprocess == "mmdet_v1":  # the only mode whose artifacts read scale
            np.testing.assert_array_equal(inputs["scale"], expected["scale"])


def test_readme_canvas_choice_is_the_one_rule_detector_follows(
    blocks, detector, tmp_path, monkeypatch
):
    namespace = _client_namespace(blocks, tmp_path, monkeypatch)
    canvases = canvas.scale_canvases(detector.config)
    assert canvases == [LANDSCAPE, PORTRAIT]
    sides = sorted({1, 31, 400, 799, 800, 801, 1000, 1343, 1344} | set(range(50, 1344, 97)))
    checked = 0
    for h in sides:
        for w in sides:
            if not ((h <= 800 and w <= 1344) or (h <= 1344 and w <= 800)):
                continue  # no canvas holds it: a resize at the artifact's scale never gives it
            chosen, _ = namespace["serving_inputs"]("unused", resize=_resized_to(h, w))
            assert chosen == canvas.canvas_for((h, w), canvases), (h, w)
            checked += 1
    assert checked > 400
    # Detector through its own preprocessing: a square image and one a pixel taller than wide
    # whose resized height rounds to 800 go to landscape, a taller one to portrait.
    for (h, w), expected in {
        (500, 500): LANDSCAPE,
        (2000, 1999): LANDSCAPE,  # s = 800 / 1999: 800.4 rounds to 800
        (501, 500): PORTRAIT,  # s = 1.6: 801.6 rounds to 802
    }.items():
        image = np.zeros((h, w, 3), np.uint8)
        assert detector.preprocess(image)["image"].shape[:2] == expected, (h, w)
