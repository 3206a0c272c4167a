"""Convert between PyTorch checkpoints and our orbax checkpoints, in either direction.

PyTorch -> ours (step 0 of a new checkpoint directory):
  python -m fcos_jax.convert --format mmdet --config configs/fcos_r50_caffe_fpn_gn_1x.py \
      --input fcos_r50_caffe_fpn_gn_1x_4gpu_20190516-9f253a93.pth --output ckpt/fcos_r50_gn_1x
ours (a converted directory or a training workdir: its latest step) -> PyTorch:
  python -m fcos_jax.convert --to mmdet --config configs/shapes.py \
      --checkpoint workdirs/shapes --output shapes_mmdet.pth     # + shapes_mmdet.py, its config
  python -m fcos_jax.convert --to torchvision --config configs/torchvision_fcos_r50_fpn.py \
      --checkpoint workdirs/tv_fcos --output tv_fcos.pth

Errors print one line `error: ...` to stderr and exit with status 2.
"""

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from fcos_jax.checkpoint import store
from fcos_jax.convert import FORMATS, convert_file, describe, write_converted
from fcos_jax.convert.to_pytorch import TARGETS, export_checkpoint
from fcos_jax.utils import cli

_FORMAT = flags.DEFINE_enum("format", None, list(FORMATS), "Layout of the --input file.")
_TO = flags.DEFINE_enum("to", None, list(TARGETS), "Write --checkpoint as this PyTorch layout.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of the model.")
_INPUT = flags.DEFINE_string("input", None, "With --format: PyTorch .pth/.pt or .safetensors.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "With --to: our converted directory or training workdir (latest step)."
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "--format: output directory (gets checkpoints/0); --to: the .pth file."
)
flags.mark_flags_as_required(["config", "output"])


def _check_direction() -> str:
    """'import' or 'export' from the flags given; app.UsageError for a mix of both."""
    given = {name for name in ("format", "to", "input", "checkpoint") if flags.FLAGS[name].present}
    if given in ({"format", "input"}, {"to", "checkpoint"}):
        return "import" if "format" in given else "export"
    raise app.UsageError(
        "give --format and --input (PyTorch -> ours) or --to and --checkpoint (ours -> PyTorch), "
        f"not {', '.join(f'--{name}' for name in sorted(given)) or 'neither'}"
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.log_warnings_only()  # keep stderr for the one-line error
    direction = _check_direction()
    config = cli.config_from_flag()
    if direction == "export":
        for line in export_checkpoint(_CHECKPOINT.value, config, _TO.value, _OUTPUT.value):
            print(line)
        return
    fmt = _FORMAT.value
    store.check_output_free(_OUTPUT.value)  # fail before a long conversion
    converted = convert_file(_INPUT.value, fmt, config)
    source = f"{fmt}: {Path(_INPUT.value).name}"
    root = write_converted(converted, _OUTPUT.value, config, source)
    print(f"converted {_INPUT.value} ({fmt}) for {config.name} -> {root}/0")
    for line in describe(converted):
        print(line)


if __name__ == "__main__":
    cli.run(main)  # ConversionError and CheckpointError are ValueErrors: exit 2
