"""Write the serving function (`serving.py`) as a StableHLO, TF SavedModel or ONNX artifact.

  stablehlo   `jax.export` for the chosen platforms (default CPU and CUDA), serialized to one
              file; load with
              `jax.export.deserialize(open(f, 'rb').read()).call(images, image_hw, ...)`
              (on CPU, under `jax.jit(..., compiler_options=compile_options.compiler_options())`
              it is compiled as `Detector` is, and gives its detections in its order within the
              absolute tolerances of docs/export.md §5).
  savedmodel  `jax2tf` (StableHLO inside an XlaCallModule op) in a SavedModel directory with a
              `serving_default` signature. Every top-k is written as a full stable sort
              (`postprocess.detect(sort_top_k=True)`): TF 2.21's reader (StableHLO 1.13) cannot
              read the `chlo.top_k` composite that jax 0.10 writes, and targeting its older
              StableHLO version only works for a static batch.
  onnx        `jax2onnx`, opset 23, weights inside the one .onnx file; onnxruntime runs it.

Each platform gets its own program whatever host exports it: the model's XLA:CPU-tuned
convolutions (Winograd, tap sums) are the `cpu` branch of `lax.platform_dependent`, so the CUDA
or TPU part of an artifact holds XLA's own convolutions, as a `Detector` on that accelerator
compiles. ONNX is traced with XLA's own convolutions only (`cpu_kernels.accelerator_kernels`):
ONNX Runtime runs its own convolution kernels on every device.

The batch dimension is symbolic (`batch`) unless a batch size is given. TensorFlow and jax2onnx
are imported here only, when their format is written.
"""

import logging
from pathlib import Path

import jax

from fcos_jax.export.serving import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    check_canvas,
    input_specs,
    serving_function,
)
from fcos_jax.inference import Detector
from fcos_jax.models import cpu_kernels

FORMATS = ("stablehlo", "savedmodel", "onnx")
PLATFORMS = ("cpu", "cuda", "tpu")  # what an artifact may be exported for
DEFAULT_PLATFORMS = ("cpu", "cuda")
BATCH_DIM = "batch"
ONNX_OPSET = 23


def _symbolic_batch(batch: int | None):
    return jax.export.symbolic_shape(BATCH_DIM)[0] if batch is None else int(batch)


def write_stablehlo(
    detector: Detector,
    output: Path,
    canvas_hw: tuple[int, int],
    batch: int | None,
    platforms: tuple[str, ...],
) -> None:
    """jax.export of the serving function for `platforms`, serialized to the file `output`."""
    specs = input_specs(detector.config, canvas_hw, _symbolic_batch(batch))
    exported = jax.export.export(jax.jit(serving_function(detector)), platforms=platforms)(*specs)
    output.write_bytes(exported.serialize())


def write_savedmodel(
    detector: Detector,
    output: Path,
    canvas_hw: tuple[int, int],
    batch: int | None,
    platforms: tuple[str, ...],
) -> None:
    """jax2tf conversion with a `serving_default` signature (named inputs, dict of outputs)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    specs = input_specs(detector.config, canvas_hw, batch or 1)
    dims = lambda spec: ", ".join([BATCH_DIM, *map(str, spec.shape[1:])])  # noqa: E731
    converted = jax2tf.convert(
        serving_function(detector, sort_top_k=True),
        polymorphic_shapes=None if batch else [f"({dims(spec)})" for spec in specs],
        with_gradient=False,
        native_serialization_platforms=platforms,
    )
    signature = [
        tf.TensorSpec((batch, *spec.shape[1:]), tf.as_dtype(spec.dtype), name=name)
        for name, spec in zip(INPUT_NAMES, specs, strict=True)
    ]
    module = tf.Module()
    module.serve = tf.function(
        lambda images, image_hw, original_hw, scale: converted(
            images, image_hw, original_hw, scale
        ),
        input_signature=signature,
        autograph=False,
    )
    tf.saved_model.save(module, str(output), signatures={"serving_default": module.serve})


def write_onnx(
    detector: Detector,
    output: Path,
    canvas_hw: tuple[int, int],
    batch: int | None,
    platforms: tuple[str, ...],
) -> None:
    """jax2onnx conversion, saved as one self-contained .onnx file (for any ONNX Runtime
    device: `platforms` does not apply)."""
    import onnx
    from jax2onnx import to_onnx

    # jax2onnx imports every plugin module and logs a traceback for each whose optional library
    # (equinox, dm_pix, ...) is not installed; none of them is needed here.
    logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
    # onnx_ir warns about every intermediate value whose type it leaves to onnxruntime.
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    specs = [
        jax.ShapeDtypeStruct((BATCH_DIM if batch is None else batch, *spec.shape[1:]), spec.dtype)
        for spec in input_specs(detector.config, canvas_hw, 1)
    ]
    with cpu_kernels.max_pool_as_taps(), cpu_kernels.accelerator_kernels():
        model = to_onnx(
            serving_function(detector, weights_barrier=False),
            specs,
            model_name="fcos",
            opset=ONNX_OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
        )
    onnx.save_model(model, str(output))


def check_platforms(platforms: tuple[str, ...]) -> tuple[str, ...]:
    """`platforms` as a tuple; ValueError unless one or more distinct entries of PLATFORMS."""
    platforms = tuple(platforms)
    unknown = [p for p in platforms if p not in PLATFORMS]
    if not platforms or unknown or len(set(platforms)) != len(platforms):
        raise ValueError(
            f"platforms: one or more distinct of {', '.join(PLATFORMS)}, got {','.join(platforms)}"
        )
    return platforms


WRITERS = {"stablehlo": write_stablehlo, "savedmodel": write_savedmodel, "onnx": write_onnx}


def export_detector(
    detector: Detector,
    fmt: str,
    output: str | Path,
    canvas_hw: tuple[int, int],
    batch: int | None = None,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
) -> Path:
    """Writes `detector` (config, weights, classes) in format `fmt` to `output` (a file; a
    directory for savedmodel) for images on the canvas (H, W); batch None = symbolic.
    platforms: the XLA platforms a StableHLO or SavedModel artifact carries a program for."""
    if fmt not in WRITERS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    check_canvas(detector.config, canvas_hw)
    if batch is not None and batch < 1:
        raise ValueError(f"batch: expected >= 1 (or none for a symbolic batch), got {batch}")
    platforms = check_platforms(platforms)
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"output exists: {output} (remove it or choose another path)")
    output.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[fmt](detector, output, tuple(int(s) for s in canvas_hw), batch, platforms)
    return output
