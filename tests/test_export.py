"""fcos_jax.export: every format exports, loads and runs in a clean process (tests/export_client.py,
which never imports fcos_jax) and detects what `Detector` in canvas mode detects on the same
images, for two models:

  torchvision  the randomised torchvision `fcos_resnet50_fpn` converted (float32 normalised input),
               at the reduced scale (512, 320): canvas 320 x 512, a batch of two landscape images
               of different sizes.
  tiny         configs/tiny.py trained for a few steps by train.py (mmdet resize, uint8 input),
               canvas 128 x 128: batch 1, and a batch of the 8 validation images of its shapes
               split (96-128 px).

All batches run through the same symbolic-batch artifacts; the tiny model's StableHLO file comes
from the command line, the others from `export_detector`. StableHLO runs the same XLA as
`Detector`: the same detections in the same order, boxes within STABLEHLO_BOX_ATOL px and scores
within STABLEHLO_SCORE_ATOL (docs/export.md §5). TF and onnxruntime run other kernels:
detections are matched by `compare`'s rule (label equal, box within 0.01 px, score within 1e-4)
and the worst differences are printed. COCOeval (`eval.py --detections`'s function) of each
artifact's detections gives the AP of `eval.py` on the checkpoint within 1e-3. The same client
runs also feed each artifact rows it must refuse (an image_hw outside the canvas) and, for the
modes that do not read it, another `scale`. (The R-50 model runs one batch size only: each batch
size costs every XLA runtime a compile of R-50.)
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fcos_jax import compare, export, inference
from fcos_jax.compare.torchvision_random import random_fcos
from fcos_jax.config import load_config
from fcos_jax.convert import convert_state_dict
from fcos_jax.evaluation import evaluator
from fcos_jax.testing.images import natural_image
from fcos_jax.utils import compile_options

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "tests" / "export_client.py"
FORMATS = ("stablehlo", "savedmodel", "onnx")
TV_SCALE = (512, 320)
TV_IMAGES = ((333, 500, 11), (340, 497, 12))  # resize to 320x480 and 320x467: canvas 320x512
TINY_STEPS = 40
# StableHLO and Detector run one XLA, but the symbolic-batch module is compiled apart from
# Detector's jit (with the same compile options: tests/export_client.py), so it may round a few
# ulps apart: the same detections in the same order, within these absolute tolerances.
STABLEHLO_BOX_ATOL = 1e-3  # pixels of the original image
STABLEHLO_SCORE_ATOL = 1e-5


def _run(args, **kwargs):
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _stats(stdout: str) -> list[float]:
    """The 12 values of a COCOeval table printed by eval.py."""
    values = [float(line.rsplit("=", 1)[1]) for line in stdout.splitlines() if "] =" in line]
    assert len(values) == 12, stdout
    return values


@pytest.fixture(scope="module")
def torchvision_model():
    config = load_config(REPO / "configs" / "torchvision_fcos_r50_fpn.py")
    config.preprocess.scale = TV_SCALE
    config.data.eval_pad = "canvas"
    images = [natural_image(h, w, seed) for h, w, seed in TV_IMAGES]
    model = random_fcos(0, images[0], min_size=min(TV_SCALE), max_size=max(TV_SCALE))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    converted = convert_state_dict(state, "torchvision", config)
    variables = {"params": converted.params, "batch_stats": converted.batch_stats}
    return inference.Detector(config, variables), images


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """configs/tiny.py trained TINY_STEPS steps; eval.py's table on it; its validation images."""
    root = tmp_path_factory.mktemp("tiny_export")
    data_dir, workdir = root / "data", root / "workdir"
    overrides = [f"--config.data.data_dir={data_dir}"]
    _run(
        [
            sys.executable,
            "train.py",
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
            f"--config.train.num_steps={TINY_STEPS}",
            "--config.train.progress_bar=False",
            *overrides,
        ]
    )
    results = root / "checkpoint_results.json"
    table = _run(
        [sys.executable, "eval.py", "--config=configs/tiny.py", f"--checkpoint={workdir}"]
        + [f"--results={results}", *overrides]
    ).stdout
    config = load_config(REPO / "configs" / "tiny.py")
    config.data.data_dir = str(data_dir)
    (split_dir,) = (data_dir / "fcos_shapes").iterdir()
    instances = json.loads((split_dir / "annotations" / "instances_validation.json").read_text())
    images = [
        (image["id"], str(split_dir / "validation" / image["file_name"]))
        for image in instances["images"]
    ]
    detector = inference.Detector.from_config(config, workdir)
    return {
        "detector": detector,
        "workdir": workdir,
        "images": images,
        "table": table,
        "results": results,
    }


@pytest.fixture(scope="module")
def artifacts(torchvision_model, tiny_model, tmp_path_factory):
    """{(model, format): path}: the tiny model's StableHLO through the command line, the others
    through export_detector."""
    root = tmp_path_factory.mktemp("artifacts")
    paths = {("tiny", "stablehlo"): root / "tiny.stablehlo"}
    proc = _run(
        [
            sys.executable,
            "-m",
            "fcos_jax.export",
            "--config=configs/tiny.py",
            f"--checkpoint={tiny_model['workdir']}",
            "--format=stablehlo",
            f"--output={paths['tiny', 'stablehlo']}",
        ]
    )
    assert "canvas 128x128, batch symbolic" in proc.stdout
    detectors = {"torchvision": torchvision_model[0], "tiny": tiny_model["detector"]}
    for model, detector in detectors.items():
        for fmt in FORMATS:
            if (model, fmt) not in paths:
                canvas_hw = export.default_canvas(detector.config)
                path = root / f"{model}.{fmt}"
                paths[model, fmt] = export.export_detector(detector, fmt, path, canvas_hw)
    return paths


def _batches(torchvision_model, tiny_model):
    """{(model, batch name): (detector, image list)}."""
    tv_detector, tv_images = torchvision_model
    tiny_paths = [path for _, path in tiny_model["images"]]
    return {
        ("torchvision", "all"): (tv_detector, tv_images),
        ("tiny", "one"): (tiny_model["detector"], tiny_paths[:1]),
        ("tiny", "all"): (tiny_model["detector"], tiny_paths),
    }


@pytest.fixture(scope="module")
def runs(torchvision_model, tiny_model, artifacts, tmp_path_factory):
    """{(format, model, batch name): (artifact outputs, Detector's detections)}: every format's
    artifacts run by one clean client process."""
    root = tmp_path_factory.mktemp("runs")
    batches = _batches(torchvision_model, tiny_model)
    ours, jobs, inputs_of = {}, {fmt: [] for fmt in FORMATS}, {}
    for (model, name), (detector, images) in batches.items():
        inputs_of[model, name] = export.serving_inputs(
            images, detector.config, export.default_canvas(detector.config)
        )
        ours[model, name] = detector(images, batch_size=len(images))
    # The same images with image_hw outside the canvas in some rows (the others must be served
    # as before), and with another scale, which the mmdet_v3 (tiny) and torchvision artifacts
    # do not read.
    inputs_of["tiny", "refused"] = _with_refused_rows(inputs_of["tiny", "all"])
    for model in ("torchvision", "tiny"):
        other_scale = dict(inputs_of[model, "all"])
        other_scale["scale"] = np.full_like(other_scale["scale"], 0.25)
        inputs_of[model, "other_scale"] = other_scale
    for (model, name), inputs in inputs_of.items():
        np.savez(root / f"{model}_{name}.npz", **inputs)
        for fmt in FORMATS:
            jobs[fmt].append(
                {
                    "artifact": str(artifacts[model, fmt]),
                    "inputs": str(root / f"{model}_{name}.npz"),
                    "outputs": str(root / f"{fmt}_{model}_{name}_out.npz"),
                }
            )
    results = {}
    for fmt in FORMATS:
        (root / f"{fmt}_jobs.json").write_text(json.dumps(jobs[fmt]))
        _run([sys.executable, str(CLIENT), fmt, str(root / f"{fmt}_jobs.json")])
        for model, name in inputs_of:
            outputs = dict(np.load(root / f"{fmt}_{model}_{name}_out.npz"))
            results[fmt, model, name] = (outputs, ours.get((model, name)))
    return results


# Rows of the tiny model's 128 x 128 canvas: (image_hw, refused). Row 0 keeps its own image_hw.
REFUSED_ROWS = {1: ((129, 100), True), 2: ((100, 129), True), 3: ((0, 100), True)}
REFUSED_ROWS |= {4: ((128, 128), False)}  # the whole canvas is a valid area


def _with_refused_rows(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in inputs.items()}
    for row, (image_hw, _) in REFUSED_ROWS.items():
        out["image_hw"][row] = image_hw
    return out


def _artifact_detections(outputs: dict[str, np.ndarray], row: int) -> dict[str, np.ndarray]:
    n = int(outputs["num_detections"][row])
    assert not outputs["scores"][row, n:].any() and (outputs["classes"][row, n:] == -1).all()
    return {
        "boxes": outputs["boxes"][row, :n],
        "scores": outputs["scores"][row, :n],
        "labels": outputs["classes"][row, :n],
    }


def _ours(dets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"boxes": dets["boxes"], "scores": dets["scores"], "labels": dets["category_ids"]}


@pytest.mark.parametrize("model, batch", [("torchvision", "all"), ("tiny", "one"), ("tiny", "all")])
def test_stablehlo_detections_equal_detector_in_canvas_mode(runs, model, batch):
    outputs, ours = runs["stablehlo", model, batch]
    assert outputs["boxes"].shape[0] == len(ours)
    for row, dets in enumerate(ours):
        found = _artifact_detections(outputs, row)
        assert len(found["scores"]) == len(dets["scores"]) > 0
        reference = _ours(dets)
        np.testing.assert_array_equal(found["labels"], reference["labels"], f"image {row}")
        for key, atol in (("boxes", STABLEHLO_BOX_ATOL), ("scores", STABLEHLO_SCORE_ATOL)):
            np.testing.assert_allclose(
                found[key], reference[key], rtol=0, atol=atol, err_msg=f"image {row}"
            )
            worst = float(np.max(np.abs(found[key] - reference[key]), initial=0.0))
            print(f"stablehlo {model} {batch} image {row}: worst {key} difference {worst:.2e}")


@pytest.mark.parametrize("fmt", ["savedmodel", "onnx"])
@pytest.mark.parametrize("model", ["torchvision", "tiny"])
def test_savedmodel_and_onnx_detections_match_detector_by_compare_rule(runs, fmt, model):
    box_diff = score_diff = 0.0
    for batch in ("one", "all") if model == "tiny" else ("all",):
        outputs, ours = runs[fmt, model, batch]
        for row, dets in enumerate(ours):
            found, reference = _artifact_detections(outputs, row), _ours(dets)
            assert compare.match_detections(found, reference) == [], f"{batch} image {row}"
            assert len(found["scores"]) > 0
            # Worst differences over the pairs of equal rank (scores may reorder near ties).
            same_rank = found["labels"] == reference["labels"]
            box_errors = np.abs(found["boxes"] - reference["boxes"])[same_rank]
            box_diff = max(box_diff, float(np.max(box_errors, initial=0.0)))
            score_diff = max(score_diff, np.abs(found["scores"] - reference["scores"]).max())
    print(f"{fmt} {model}: worst box difference {box_diff:.2e} px, score {score_diff:.2e}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_hw_outside_the_canvas_is_refused_and_the_other_rows_served(runs, fmt):
    outputs, _ = runs[fmt, "tiny", "refused"]
    served, _ = runs[fmt, "tiny", "all"]
    assert outputs["refused"].dtype == bool
    assert not served["refused"].any()
    expected = [REFUSED_ROWS.get(row, (None, False))[1] for row in range(len(served["refused"]))]
    np.testing.assert_array_equal(outputs["refused"], expected)
    for row, refused in enumerate(expected):
        if refused:
            assert outputs["num_detections"][row] == 0
            assert not outputs["boxes"][row].any() and not outputs["scores"][row].any()
            assert (outputs["classes"][row] == -1).all()
        elif row not in REFUSED_ROWS:  # untouched rows: the batch's other rows change nothing
            for key in ("boxes", "scores", "classes", "num_detections"):
                np.testing.assert_array_equal(outputs[key][row], served[key][row], f"{key} {row}")
    assert outputs["num_detections"][4] > 0  # a valid area up to the canvas edge is served


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model", ["torchvision", "tiny"])
def test_mmdet_v3_and_torchvision_artifacts_do_not_read_scale(runs, fmt, model):
    """Their boxes are rescaled by original_hw / image_hw (docs/export.md §3): a scale of 0.25
    instead of about 1 changes no output."""
    outputs, _ = runs[fmt, model, "other_scale"]
    served, _ = runs[fmt, model, "all"]
    assert served["num_detections"].min() > 0
    for key in ("boxes", "scores", "classes", "num_detections", "refused"):
        np.testing.assert_array_equal(outputs[key], served[key], key)


@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_ap_of_artifact_detections_equals_eval_on_the_checkpoint(
    runs, tiny_model, tmp_path, fmt
):
    outputs, _ = runs[fmt, "tiny", "all"]
    detector = tiny_model["detector"]
    config = detector.config
    channel_of = {cid: channel for channel, (cid, _) in enumerate(detector.classes)}
    results = []
    for row, (image_id, _) in enumerate(tiny_model["images"]):
        found = _artifact_detections(outputs, row)
        channels = np.asarray([channel_of[int(cid)] for cid in found["labels"]], np.int32)
        results += evaluator.detections_to_coco(
            image_id, found["boxes"], found["scores"], channels, detector.classes, False
        )
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    expected = evaluator.evaluate_results_file(config, tiny_model["results"])
    # The table eval.py printed for the checkpoint is these stats, rounded.
    np.testing.assert_allclose(_stats(tiny_model["table"]), list(expected.values()), atol=5e-4)
    assert list(expected.values())[1] > 0  # the checkpoint detects something (AP50)
    found = evaluator.evaluate_results_file(config, path)
    assert found.keys() == expected.keys()
    np.testing.assert_allclose(list(found.values()), list(expected.values()), atol=1e-3)


def test_cli_errors_are_one_line_naming_the_field(tiny_model, tmp_path):
    base = [sys.executable, "-m", "fcos_jax.export", "--config=configs/tiny.py", "--format=onnx"]
    cases = {
        "missing checkpoint": (
            [f"--checkpoint={tmp_path / 'nope'}", f"--output={tmp_path / 'a.onnx'}"],
            "--checkpoint",
        ),
        "existing output": (
            [f"--checkpoint={tiny_model['workdir']}", f"--output={tmp_path}"],
            "--output",
        ),
        "canvas": (
            [
                f"--checkpoint={tiny_model['workdir']}",
                f"--output={tmp_path / 'b.onnx'}",
                "--height=100",
            ],
            "size_divisor",
        ),
    }
    for name, (args, field) in cases.items():
        proc = subprocess.run(base + args, cwd=REPO, capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr)
        assert lines[-1].startswith("error: ") and field in lines[-1], (name, proc.stderr)


@pytest.mark.parametrize(
    "args,named",
    [
        (["--no_such_flag=1"], "no_such_flag"),
        (["--config=configs/tiny.py", "--format=onnx", "--output=a.onnx"], "--checkpoint"),
        (
            ["--config=configs/tiny.py", "--checkpoint=c", "--format=onnx", "--output=o", "x"],
            "unexpected arguments",
        ),
    ],
)
def test_cli_usage_errors_exit_2_with_one_line(args, named):
    """The same error path as every tool: an unknown flag, a missing required flag, an extra
    argument (no model is built)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fcos_jax.export", *args], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], proc.stderr


def test_importing_fcos_jax_export_imports_neither_tensorflow_nor_jax2onnx():
    code = (
        "import sys, fcos_jax.export; "
        "print(sorted(m for m in ('tensorflow', 'jax2onnx', 'onnx') if m in sys.modules))"
    )
    proc = _run([sys.executable, "-c", code])
    assert proc.stdout.strip() == "[]"


def test_serving_inputs_place_each_resized_image_top_left_on_a_zero_canvas(torchvision_model):
    detector, images = torchvision_model
    inputs = export.serving_inputs(images, detector.config, (320, 512))
    assert inputs["images"].dtype == np.float32  # torchvision: normalised outside the artifact
    np.testing.assert_array_equal(inputs["image_hw"], [[320, 480], [320, 467]])
    np.testing.assert_array_equal(inputs["original_hw"], [[333, 500], [340, 497]])
    for row, image in enumerate(images):
        h, w = inputs["image_hw"][row]
        reference = detector.preprocess(image)["image"]
        np.testing.assert_array_equal(inputs["images"][row], reference)
        assert not inputs["images"][row, h:].any() and not inputs["images"][row, :, w:].any()
    with pytest.raises(ValueError, match=r"images\[0\].*canvas"):
        export.serving_inputs(images[:1], detector.config, (320, 320))


def test_the_serving_client_compiles_stablehlo_as_detector_does():
    """tests/export_client.py never imports fcos_jax, so it writes the CPU compile options out:
    they must be the library's (else its StableHLO run is not Detector's program)."""
    from export_client import CPU_COMPILER_OPTIONS  # tests/ is on sys.path, as subprocess_cli

    assert CPU_COMPILER_OPTIONS == compile_options.compiler_options("cpu")


def _op_counts(module_text: str) -> tuple[int, int]:
    """(convolutions, matrix products) in a StableHLO module's text."""
    return module_text.count("stablehlo.convolution"), module_text.count("stablehlo.dot_general")


def test_each_platform_of_an_artifact_holds_its_own_program(monkeypatch, tmp_path):
    """With Winograd made to apply to the wide 3x3 convolutions of a small model, a CUDA or TPU
    artifact exported on this CPU host holds the program traced as for an accelerator (XLA's
    convolutions, no Winograd products), the CPU artifact the Winograd one, and the default
    cpu,cuda artifact both, behind the platform index."""
    from test_predict import firing_variables, tiny_config

    from fcos_jax.models import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "WINOGRAD_MIN_CHANNELS", 256)  # stages 3 and 4 of the R-18
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_MIN_POSITIONS", 1)
    config = tiny_config()
    detector = inference.Detector(config, firing_variables(config))
    canvas = (96, 160)

    def module(platforms, name):
        path = export.export_detector(
            detector, "stablehlo", tmp_path / name, canvas, batch=1, platforms=platforms
        )
        exported = jax.export.deserialize(path.read_bytes())
        assert exported.platforms == platforms
        return exported.mlir_module()

    with cpu_kernels.accelerator_kernels():
        accelerator = _op_counts(module(("cpu",), "accelerator_trace"))
    cpu = _op_counts(module(("cpu",), "cpu"))
    assert _op_counts(module(("cuda",), "cuda")) == accelerator
    assert _op_counts(module(("tpu",), "tpu")) == accelerator
    assert cpu[0] < accelerator[0] and cpu[1] > accelerator[1]  # Winograd: products, not convs
    both = module(("cpu", "cuda"), "both")
    assert "_platform_index" in both
    assert _op_counts(both)[0] >= accelerator[0] and _op_counts(both)[1] >= cpu[1]
    print(f"convolutions, matrix products: cpu {cpu}, cuda and tpu {accelerator}")


def test_unknown_or_repeated_platforms_are_refused_naming_the_field():
    for platforms in ((), ("cpu", "cpu"), ("gpu",)):
        with pytest.raises(ValueError, match="platforms: one or more distinct of cpu, cuda, tpu"):
            export.check_platforms(platforms)


def test_a_canvas_other_than_detectors_is_named_in_a_warning():
    """--height/--width reproduce Detector only as one of the canvases of preprocess.scale; the
    command warns about any other (docs/export.md §4)."""
    config = load_config(REPO / "configs" / "fcos_r50_caffe_fpn_gn_1x.py")
    assert export.default_canvas(config) == (800, 1344)
    assert export.canvas_note(config, (800, 1344)) is None
    assert export.canvas_note(config, (1344, 800)) is None
    note = export.canvas_note(config, (640, 640))
    assert "640x640 is not a canvas of preprocess.scale (1333, 800) (800x1344 and 1344x800)" in note
    assert "--config.preprocess.scale" in note
    config.preprocess.scale = (1024, 640)  # the way to serve another resolution
    assert export.canvas_note(config, (640, 1024)) is None


def test_the_command_warns_about_such_a_canvas_before_it_restores(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "fcos_jax.export", "--config=configs/tiny.py", "--format=onnx"]
        + [f"--checkpoint={empty}", f"--output={tmp_path / 'a.onnx'}", "--height=96"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr  # the empty checkpoint directory
    assert "canvas 96x128 is not a canvas of preprocess.scale (128, 128)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
