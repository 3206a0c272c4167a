"""Runs exported detectors the way a serving client does, in a process that never imports fcos_jax.

  python tests/export_client.py FORMAT JOBS.json

JOBS.json: [{"artifact": path, "inputs": in.npz, "outputs": out.npz}, ...]; each in.npz holds the
serving inputs (images, image_hw, original_hw, scale), each out.npz gets the outputs (boxes,
classes, num_detections, scores). Exits 3 when fcos_jax was imported after all.
"""

import json
import sys

import numpy as np

INPUTS = ("images", "image_hw", "original_hw", "scale")
# What fcos_jax.utils.compile_options.compiler_options() gives on CPU, written out (this client
# never imports fcos_jax; tests/test_export.py checks the two agree): compiled with them the
# artifact runs the same XLA program as Detector, so its detections equal Detector's to rounding.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    )
}


def stablehlo_runner(path):
    import jax

    exported = jax.export.deserialize(open(path, "rb").read())
    options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    call = jax.jit(exported.call, compiler_options=options)
    return lambda inputs: call(*[inputs[name] for name in INPUTS])


def savedmodel_runner(path):
    import tensorflow as tf

    serve = tf.saved_model.load(path).signatures["serving_default"]
    return lambda inputs: serve(**{name: tf.constant(inputs[name]) for name in INPUTS})


def onnx_runner(path):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return lambda inputs: dict(zip(names, session.run(None, inputs), strict=True))


RUNNERS = {"stablehlo": stablehlo_runner, "savedmodel": savedmodel_runner, "onnx": onnx_runner}


def main(fmt: str, jobs_path: str) -> None:
    runners = {}
    for job in json.loads(open(jobs_path).read()):
        if job["artifact"] not in runners:
            runners[job["artifact"]] = RUNNERS[fmt](job["artifact"])
        inputs = dict(np.load(job["inputs"]))
        outputs = runners[job["artifact"]](inputs)
        np.savez(job["outputs"], **{k: np.asarray(v) for k, v in outputs.items()})
    if "fcos_jax" in sys.modules:
        print("fcos_jax was imported", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main(*sys.argv[1:])
