"""Export a converted or trained checkpoint as one self-contained serving artifact.

  python -m fcos_jax.export --config configs/fcos_r50_caffe_fpn_gn_1x.py \
      --checkpoint ckpt/fcos_r50 --format onnx --output fcos_r50.onnx [--batch N] \
      [--height 800 --width 1344] [--platforms cpu,cuda,tpu]

--format stablehlo (a file), savedmodel (a directory) or onnx (a file). The canvas defaults to
the landscape canvas of `preprocess.scale` (800 x 1344 for (1333, 800)); export a second artifact
with --height and --width swapped for the images that do not fit it. Any other canvas is
exported with a warning: it is not one of Detector's canvases, so its detections differ from
Detector's (serve another resolution with --config.preprocess.scale, which moves both canvases
and the client's resize). Without --batch the batch is symbolic.
--platforms (StableHLO and SavedModel; default cpu,cuda): each platform's program is its own,
whatever host exports it (XLA:CPU's tuned convolutions appear in the cpu program only).
The artifact's inputs and outputs: `fcos_jax/export/serving.py`. Errors print one line
`error: ...` to stderr and exit with status 2.
"""

from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from fcos_jax.utils import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file (configs/*.py).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Converted checkpoint directory or training workdir."
)
_FORMAT = flags.DEFINE_enum("format", None, ["stablehlo", "savedmodel", "onnx"], "Artifact format.")
_OUTPUT = flags.DEFINE_string("output", None, "Output file (a directory for savedmodel).")
_BATCH = flags.DEFINE_integer("batch", None, "Fixed batch size (default: symbolic).")
_HEIGHT = flags.DEFINE_integer("height", None, "Canvas height (default: from the config).")
_WIDTH = flags.DEFINE_integer("width", None, "Canvas width (default: from the config).")
_PLATFORMS = flags.DEFINE_list(
    "platforms",
    "cpu,cuda",
    "XLA platforms the artifact carries a program for (stablehlo, savedmodel): cpu, cuda, tpu.",
)
_ALLOW_OTHER_CONFIG_NAME = cli.define_allow_other_config_name()
flags.mark_flags_as_required(["config", "checkpoint", "format", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.log_warnings_only()  # orbax logs every restore step at INFO
    from fcos_jax import export, inference

    config = cli.config_from_flag()
    if not Path(_CHECKPOINT.value).exists():
        raise FileNotFoundError(f"--checkpoint: not found: {_CHECKPOINT.value}")
    if Path(_OUTPUT.value).exists():
        raise FileExistsError(f"--output: {_OUTPUT.value} exists (remove it or choose another)")
    default_h, default_w = export.default_canvas(config)
    canvas_hw = (_HEIGHT.value or default_h, _WIDTH.value or default_w)
    export.check_canvas(config, canvas_hw)  # before the (slow) restore
    note = export.canvas_note(config, canvas_hw)
    if note is not None:
        logging.warning("export: %s", note)
    platforms = export.check_platforms(tuple(_PLATFORMS.value))
    detector = inference.Detector.from_config(  # CheckpointError
        config, _CHECKPOINT.value, allow_other_config_name=_ALLOW_OTHER_CONFIG_NAME.value
    )
    output = export.export_detector(
        detector, _FORMAT.value, _OUTPUT.value, canvas_hw, _BATCH.value, platforms
    )
    batch = "symbolic" if _BATCH.value is None else _BATCH.value
    print(
        f"exported {config.name} ({_FORMAT.value}, canvas {canvas_hw[0]}x{canvas_hw[1]}, "
        f"batch {batch}) -> {output}"
    )


if __name__ == "__main__":
    cli.run(main)
