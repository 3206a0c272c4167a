"""Convert a PyTorch FCOS or backbone checkpoint into our orbax checkpoint layout (step 0).

  python -m fcos_jax.convert --format mmdet --config configs/fcos_r50_caffe_fpn_gn_1x.py \
      --input fcos_r50_caffe_fpn_gn_1x_4gpu_20190516-9f253a93.pth --output ckpt/fcos_r50_gn_1x

Errors print one line `error: ...` to stderr and exit with status 2.
"""

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from fcos_jax import checkpoint, cli
from fcos_jax.convert import FORMATS, convert_file, describe, write_converted

_FORMAT = flags.DEFINE_enum("format", None, list(FORMATS), "Layout of the --input file.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of the target model.")
_INPUT = flags.DEFINE_string("input", None, "PyTorch .pth/.pt or .safetensors file.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (gets checkpoints/0).")
flags.mark_flags_as_required(["format", "config", "input", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.log_warnings_only()  # keep stderr for the one-line error
    config, fmt = cli.config_from_flag(), _FORMAT.value
    checkpoint.check_output_free(_OUTPUT.value)  # fail before a long conversion
    converted = convert_file(_INPUT.value, fmt, config)
    source = f"{fmt}: {Path(_INPUT.value).name}"
    root = write_converted(converted, _OUTPUT.value, config, source)
    print(f"converted {_INPUT.value} ({fmt}) for {config.name} -> {root}/0")
    for line in describe(converted):
        print(line)


if __name__ == "__main__":
    cli.run(main)  # ConversionError and CheckpointError are ValueErrors: exit 2
