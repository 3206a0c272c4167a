"""Serving runtimes on CPU: our jit, the exported artifacts, and torchvision in the same run.

  .venv/bin/python benchmarks/serving.py [--runs 7] [--height 800] [--width 1344] [--heads]

FCOS R-50 (torchvision's fcos_resnet50_fpn with seeded random weights, converted for ours, as
benchmarks/inference.py builds it), batch 1, one natural-looking image resized to fill the
800x1344 canvas, normalised (the torchvision config's serving input), the whole detector timed:
  torchvision   model.backbone + head + postprocess_detections, channels_last, inference_mode,
                2 threads (benchmarks/inference.py's "forward+post")
  jit           `Detector.detect_batch`: our forward and post-processing programs
  stablehlo     the `jax.export` artifact, `jax.export.deserialize(...).call`
  savedmodel    the jax2tf SavedModel's `serving_default` (TensorFlow's own XLA)
  onnxruntime   the jax2onnx file in onnxruntime (CPUExecutionProvider, default options)
  openvino      the same .onnx file compiled by OpenVINO for CPU, when `openvino` is installed
Each runtime runs in its own subprocess: median and min wall seconds of `--runs` runs after one
warm-up (which compiles), the median process CPU seconds per run, the first run's time
(compile included) and the detection count; the worst box and score differences of its
detections against our jit (paired by compare's rule), and with `--heads` the worst head-output
differences of a forward-only export (jax2tf, jax2onnx) against our jit.
"""

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from common import answer_as_worker, run_worker, timed  # noqa: E402  (benchmarks/common.py)
from inference import make_inputs  # noqa: E402  (benchmarks/inference.py)

RUNTIMES = ("torchvision", "jit", "stablehlo", "savedmodel", "onnxruntime", "openvino")
ARTIFACT_FORMAT = {"stablehlo": "stablehlo", "savedmodel": "savedmodel", "onnxruntime": "onnx"}


def _detector(weights: str):
    """Our Detector of the torchvision config (canvas mode) with the benchmark's weights."""
    from fcos_jax import inference
    from fcos_jax.config import load_config
    from fcos_jax.convert import convert_file

    config = load_config(REPO / "configs" / "torchvision_fcos_r50_fpn.py")
    config.data.eval_pad = "canvas"
    converted = convert_file(weights, "torchvision", config)
    variables = {"params": converted.params, "batch_stats": converted.batch_stats}
    return inference.Detector(config, variables)


def serving_inputs(image_path: str) -> dict:
    """The artifact inputs for the benchmark's NCHW normalised input: one image filling the
    canvas (original size = canvas size, scale 1)."""
    import numpy as np

    image = np.load(image_path).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    h, w = image.shape[1:3]
    return {
        "images": np.ascontiguousarray(image),
        "image_hw": np.array([[h, w]], np.int32),
        "original_hw": np.array([[h, w]], np.int32),
        "scale": np.ones((1, 2), np.float32),
    }


# --------------------------------------------------------------------------------------------
# Workers (one runtime each, in its own process)


def _run_and_time(fn, runs: int) -> dict:
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    result = timed(fn, runs)
    result["first_s"] = first
    return result, out


def worker(runtime: str, args) -> dict:
    import numpy as np

    inputs = serving_inputs(args.input)
    if runtime == "torchvision":
        from inference import torch_worker

        args.torch_threads, args.torch_memory_format, args.batches = 2, "channels_last", None
        tv = torch_worker(args)
        return {"time": tv["forward+post"], "detections": tv["detections"]}
    if runtime == "jit":
        import jax

        detector = _detector(args.weights)
        image = jax.device_put(inputs["images"])
        call = lambda: detector.detect_batch(  # noqa: E731  (device_get: blocks until done)
            image, inputs["image_hw"], inputs["scale"], inputs["original_hw"]
        )
        timing, dets = _run_and_time(call, args.runs)
        n = int(dets["valid"][0].sum())
        out = {"boxes": dets["boxes"][0, :n], "scores": dets["scores"][0, :n]}
        out["labels"] = dets["labels"][0, :n]
    else:
        artifact = args.artifact
        if runtime == "stablehlo":
            import jax

            exported = jax.export.deserialize(Path(artifact).read_bytes())
            device_inputs = [jax.device_put(inputs[k]) for k in ("images", "image_hw")]
            device_inputs += [jax.device_put(inputs[k]) for k in ("original_hw", "scale")]
            call = lambda: jax.device_get(exported.call(*device_inputs))  # noqa: E731
        elif runtime == "savedmodel":
            import tensorflow as tf

            serve = tf.saved_model.load(artifact).signatures["serving_default"]
            tensors = {k: tf.constant(v) for k, v in inputs.items()}
            call = lambda: {k: v.numpy() for k, v in serve(**tensors).items()}  # noqa: E731
        elif runtime == "onnxruntime":
            import onnxruntime as ort

            session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            call = lambda: dict(zip(names, session.run(None, inputs), strict=True))  # noqa: E731
        else:  # openvino
            import openvino as ov

            compiled = ov.Core().compile_model(artifact, "CPU")
            names = [o.get_any_name() for o in compiled.outputs]

            def call():
                result = compiled(inputs)
                outputs = zip(names, compiled.outputs, strict=True)
                return {name: result[output] for name, output in outputs}

        timing, outputs = _run_and_time(call, args.runs)
        n = int(outputs["num_detections"][0])
        out = {"boxes": outputs["boxes"][0, :n], "scores": outputs["scores"][0, :n]}
        out["labels"] = outputs["classes"][0, :n]  # coco91: category id = channel
    np.savez(args.detections, **out)
    return {"time": timing, "detections": len(out["scores"])}


def heads_worker(args) -> dict:
    """Worst |difference| of each head output (over levels) of forward-only jax2tf and jax2onnx
    exports against our jit, on the benchmark input."""
    import jax
    import numpy as np
    import onnxruntime as ort
    import tensorflow as tf
    from jax.experimental import jax2tf
    from jax2onnx import to_onnx

    detector = _detector(args.weights)
    image = serving_inputs(args.input)["images"]
    forward = lambda x: detector.model.apply(detector.variables, x)  # noqa: E731
    ours = jax.device_get(jax.jit(forward)(image))
    tf_out = jax2tf.convert(forward, with_gradient=False)(tf.constant(image))
    found = {"savedmodel": jax.tree.map(lambda t: t.numpy(), tf_out)}
    onnx_path = str(Path(args.detections).with_suffix(".heads.onnx"))
    to_onnx(forward, [image], return_mode="file", output_path=onnx_path)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    flat = session.run(None, {session.get_inputs()[0].name: image})
    found["onnxruntime"] = jax.tree.unflatten(jax.tree.structure(ours), flat)
    report = {}
    for runtime, levels in found.items():
        pairs = list(zip(levels, ours, strict=True))
        report[runtime] = {
            key: max(float(np.abs(a[key] - b[key]).max()) for a, b in pairs) for key in ours[0]
        }
    return report


# --------------------------------------------------------------------------------------------
# Orchestration


def export_artifacts(directory: Path, weights: Path) -> dict[str, tuple[Path, float]]:
    """{runtime: (artifact, export seconds)} through `python -m fcos_jax.export`'s library."""
    from fcos_jax import export

    detector = _detector(str(weights))
    canvas_hw = export.default_canvas(detector.config)
    artifacts = {}
    for runtime, fmt in ARTIFACT_FORMAT.items():
        start = time.perf_counter()
        path = export.export_detector(detector, fmt, directory / f"fcos.{fmt}", canvas_hw)
        artifacts[runtime] = (path, time.perf_counter() - start)
    artifacts["openvino"] = artifacts["onnxruntime"]
    return artifacts


def match(path: Path, reference: Path) -> dict:
    """compare's matching of a runtime's detections against our jit's, and the worst box and
    score differences of the detections of equal rank and label."""
    import numpy as np

    from fcos_jax import compare

    found, ref = dict(np.load(path)), dict(np.load(reference))
    problems = compare.match_detections(found, ref)
    same = len(found["scores"]) == len(ref["scores"])
    rank = found["labels"] == ref["labels"] if same else np.zeros(0, bool)
    box = np.abs(found["boxes"] - ref["boxes"])[rank] if same else np.zeros(0)
    return {
        "problems": len(problems),
        "box": float(np.max(box, initial=0.0)),
        "score": float(np.abs(found["scores"] - ref["scores"]).max()) if same else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument("--heads", action="store_true", help="also compare head outputs")
    parser.add_argument("--worker", choices=(*RUNTIMES, "heads"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    parser.add_argument("--detections", help=argparse.SUPPRESS)
    args = parser.parse_args()

    workers = {runtime: functools.partial(worker, runtime) for runtime in RUNTIMES}
    if answer_as_worker(args, {**workers, "heads": heads_worker}):
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights, _, image = make_inputs(tmp, args.height, args.width, 1)
        artifacts = export_artifacts(tmp, weights)
        runtimes = list(RUNTIMES)
        if subprocess.run([sys.executable, "-c", "import openvino"]).returncode:
            runtimes.remove("openvino")  # not installed
        results = {}
        for runtime in runtimes:
            flags = [
                "--weights", str(weights), "--input", str(image), "--runs", str(args.runs),
                "--detections", str(tmp / f"{runtime}.npz"),
            ]  # fmt: skip
            if runtime in artifacts:
                flags += ["--artifact", str(artifacts[runtime][0])]
            results[runtime] = run_worker(__file__, runtime, flags)
        matches = {
            runtime: match(tmp / f"{runtime}.npz", tmp / "jit.npz")
            for runtime in runtimes
            if runtime not in ("torchvision", "jit")
        }
        heads = None
        if args.heads:
            flags = [
                "--weights", str(weights), "--input", str(image),
                "--detections", str(tmp / "heads.npz"),
            ]  # fmt: skip
            heads = run_worker(__file__, "heads", flags)

    base = results["torchvision"]["time"]["median"]
    print(
        f"\nFCOS R-50 FPN whole detector (forward + post-processing), batch 1, "
        f"{args.height}x{args.width} canvas, float32, CPU ({os.cpu_count()} cores), median (min) "
        f"wall seconds of {args.runs} runs, ratio = runtime / torchvision channels_last"
    )
    print("| runtime | wall s | ratio | CPU s | first run s | export s | dets | vs jit |")
    print("|---|---|---|---|---|---|---|---|")
    for runtime in runtimes:
        t = results[runtime]["time"]
        export_s = f"{artifacts[runtime][1]:.0f}" if runtime in artifacts else "-"
        first = f"{t['first_s']:.1f}" if "first_s" in t else "-"
        m = matches.get(runtime)
        versus = (
            "-"
            if m is None
            else f"{m['problems']} unmatched; box {m['box']:.1e} px, score {m['score']:.1e}"
        )
        print(
            f"| {runtime} | {t['median']:.3f} ({t['min']:.3f}) | {t['median'] / base:.2f} | "
            f"{t['cpu']:.2f} | {first} | {export_s} | "
            f"{results[runtime]['detections']} | {versus} |"
        )
    if heads:
        for runtime in ("savedmodel", "onnxruntime"):
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in heads[runtime].items())
            print(f"head outputs, {runtime} vs jit, worst |difference| over levels: {diffs}")
    print(
        f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
        "(other processes on this machine slow every runtime)"
    )


if __name__ == "__main__":
    main()
