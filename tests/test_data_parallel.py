"""The data-parallel contract, read from the compiled programs on 8 simulated devices.

  * train step (R-50 GN row; k = 1 and 4 micro-batches): the gradients are all-reduced once per
    optimizer step, outside every loop, carrying the trainable parameters' bytes (the head's
    weights, shared over five pyramid levels, once); the from-scratch BatchNorm config keeps one
    small reduction per statistic besides.
  * predict step: no collective at all, so none inside the NMS loops: each device decodes and
    suppresses its own images; the detections stay split over the devices.
  * Detector: a batch split over the local devices, each running its own images.
Each program is compiled as XLA:CPU compiles it and as an accelerator would
(`cpu_kernels.accelerator_kernels`: XLA's own convolutions only). Compiling is enough: nothing
runs but the Detector.

Run as a script (`XLA_FLAGS=--xla_force_host_platform_device_count=8 python
tests/test_data_parallel.py OUT.json`) it writes what the tests assert on; the test process keeps
its one device for the Detector's reference detections.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for path in (REPO, TESTS):  # when run as a script
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from test_predict import firing_variables, tiny_config  # noqa: E402

from fcos_jax import inference  # noqa: E402
from fcos_jax.config import load_config  # noqa: E402
from fcos_jax.parallel import collectives, sharding  # noqa: E402
from fcos_jax.testing.images import natural_image  # noqa: E402
from fcos_jax.training import communication  # noqa: E402

DEVICES = 8
R50_GN = REPO / "configs" / "fcos_r50_caffe_fpn_gn_1x.py"
SHAPES = REPO / "configs" / "shapes.py"
IMAGE_HW = (128, 128)  # small: the programs' communication does not depend on the image size
PATHS = ("xla_cpu", "accelerator")
# Detector images: three, of one padded shape (one batch, split over the devices).
DETECTOR_IMAGES = ((90, 130, 1), (91, 128, 2), (88, 131, 4))
# Scalars that may cross devices besides the gradients (normalisers' counts, loss terms).
SCALAR_BYTES = 64


def _config(path: Path, accumulate_steps: int):
    config = load_config(path)
    config.train.accumulate_steps = accumulate_steps
    config.train.batch_size = DEVICES * accumulate_steps
    config.test.batch_size = DEVICES
    return config


def _detector_images() -> list[np.ndarray]:
    return [natural_image(h, w, seed) for h, w, seed in DETECTOR_IMAGES]


def _detections(detector: inference.Detector) -> list[dict[str, list]]:
    return [
        {k: np.asarray(v).tolist() for k, v in dets.items() if k != "names"}
        for dets in detector(_detector_images(), batch_size=len(DETECTOR_IMAGES))
    ]


def _write_report(out: Path) -> None:
    """Everything the tests read, computed on DEVICES simulated devices."""
    import jax

    if jax.device_count() != DEVICES:
        raise SystemExit(f"expected {DEVICES} simulated CPU devices, found {jax.device_count()}")
    mesh = sharding.make_mesh()
    report = {"params": communication.parameter_bytes(_config(R50_GN, 1)), "train": {}}
    for k in (1, 4):
        for path in PATHS:
            hlo = communication.train_step_hlo(
                _config(R50_GN, k), mesh, IMAGE_HW, accelerator=path == "accelerator"
            )
            report["train"][f"k{k}/{path}"] = communication.report(hlo)
    shapes = _config(SHAPES, 1)
    report["batch_stats_bn"] = {
        "params": communication.parameter_bytes(shapes),
        "collectives": [
            vars(c)
            for c in collectives.collectives(communication.train_step_hlo(shapes, mesh, IMAGE_HW))
        ],
    }
    report["predict"] = {
        path: communication.report(
            communication.predict_step_hlo(
                _config(R50_GN, 1), mesh, IMAGE_HW, accelerator=path == "accelerator"
            )
        )
        for path in PATHS
    }
    config = tiny_config()
    detector = inference.Detector(config, firing_variables(config))
    item = detector.preprocess(_detector_images()[0])
    image = np.repeat(item["image"][None], DEVICES, axis=0)
    forward = detector._forward.lower(detector.variables, *detector._split(image)).compile()
    report["detector"] = {
        "devices": detector.mesh.size,
        "parameter_shapes": collectives.entry_parameter_shapes(forward.as_text()),
        "collectives": communication.report(forward.as_text()),
        "detections": _detections(detector),
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, out)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_parallel") / "report.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    ).strip()
    log = out.with_name("stderr.txt")
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, __file__, str(out)], env=env, stderr=handle)
    deadline = time.monotonic() + 1800
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the 8-device compile timed out"
        time.sleep(0.5)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("accumulate_steps", [1, 4])
def test_the_gradients_are_reduced_once_per_step(report, accumulate_steps, path):
    """All-reduced bytes: at least the trainable parameters' (each gradient reduced) and at most
    1.01 times them plus a few scalars (no gradient twice: not per level, not per micro-batch);
    nothing crosses devices inside a loop."""
    found = report["train"][f"k{accumulate_steps}/{path}"]
    trainable = report["params"]["trainable"]
    assert found["in loops"] == 0, found
    assert trainable <= found["all-reduce bytes"] <= 1.01 * trainable + SCALAR_BYTES, found
    assert found["largest all-reduce bytes"] >= 0.99 * trainable  # combined into one reduction
    assert set(found) <= {"all-reduce", "all-reduce bytes", "in loops", "largest all-reduce bytes"}
    print(f"train step k={accumulate_steps} {path}: {found}, trainable bytes {trainable}")


def test_frozen_parameters_send_no_gradient(report):
    params = report["params"]
    assert params["trainable"] < params["all"]  # the stem and stage 1 are frozen
    found = report["train"]["k1/xla_cpu"]
    assert found["all-reduce bytes"] < params["all"]


def test_batch_statistics_add_only_small_per_layer_reductions(report):
    """The from-scratch config (batch_stats_bn): besides the gradients (each reduced once), each
    BatchNorm layer reduces at most five channel vectors, none inside a loop: its batch mean and
    variance in the forward pass, up to three cotangents of them in the backward pass."""
    found = report["batch_stats_bn"]["collectives"]
    params = report["batch_stats_bn"]["params"]
    statistic_bytes = 5 * params["batch_stats"] // 2  # batch_stats holds 2 vectors per layer
    total = sum(c["bytes"] for c in found)
    assert not any(c["in_loop"] for c in found)
    assert all(c["kind"] == "all-reduce" for c in found)
    assert params["trainable"] <= total
    assert total <= 1.01 * params["trainable"] + statistic_bytes + SCALAR_BYTES
    print(
        f"batch_stats_bn: {len(found)} all-reduces carrying {total} bytes: gradients of "
        f"{params['trainable']} bytes, statistics {statistic_bytes}"
    )


@pytest.mark.parametrize("path", PATHS)
def test_the_predict_step_runs_each_devices_images_alone(report, path):
    """No collective anywhere in the predict step, hence none inside an NMS loop, and no gather
    of the detections."""
    assert report["predict"][path] == {"largest all-reduce bytes": 0}


def test_the_detector_splits_a_batch_over_the_local_devices(report):
    found = report["detector"]
    assert found["devices"] == DEVICES
    image_shape = next(s for s in found["parameter_shapes"] if len(s) == 4 and s[-1] == 3)
    assert image_shape[0] == 1  # a batch of DEVICES images: one per device
    assert found["collectives"] == {"largest all-reduce bytes": 0}


def test_the_detector_on_8_devices_detects_what_it_detects_on_one(report):
    config = tiny_config()
    single = _detections(inference.Detector(config, firing_variables(config)))
    split = report["detector"]["detections"]
    assert sum(len(d["scores"]) for d in single) > 0
    for a, b in zip(split, single, strict=True):
        assert a["labels"] == b["labels"] and a["category_ids"] == b["category_ids"]
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)


if __name__ == "__main__":
    _write_report(Path(sys.argv[1]))
