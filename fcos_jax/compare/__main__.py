"""Compare our FCOS with a PyTorch reference on one image, from the same PyTorch checkpoint.

  python -m fcos_jax.compare --format mmdet --config configs/fcos_r50_caffe_fpn_gn_1x.py \
      --input fcos_r50_caffe_fpn_gn_1x_4gpu_20190516-9f253a93.pth image.jpg
  python -m fcos_jax.compare --format torchvision --config configs/torchvision_fcos_r50_fpn.py \
      --input fcos_resnet50_fpn_coco-99b0c9b7.pth image.jpg

Our side converts `--input` in memory, or restores `--checkpoint DIR` (a converted checkpoint or
training workdir) to check what is on disk against the original file. A file `convert --to` wrote
is an `--input` like any other: with `--checkpoint WORKDIR`, the exported file in PyTorch against
the model it came from (an mmdetection file runs as the config written next to it states):

  python -m fcos_jax.compare --format mmdet --config configs/shapes.py \
      --input shapes_mmdet.pth --checkpoint workdirs/shapes image.jpg
 The references:
`fcos_jax/compare/references.py`. Both heads run on the SAME input tensor (the reference's
preprocessed image, NCHW -> NHWC), and our preprocessing is checked against it. Prints, per
level, the max and mean |difference| of cls_logits, bbox_reg (l, t, r, b in input pixels) and
centerness, then whether the final detections agree (count, labels, boxes within 0.01 px, scores
within 1e-4).
Exit status 0 when everything is within tolerance (per level max|diff| <= 1e-4 * max|ref|),
1 otherwise; errors print one line `error: ...` to stderr and exit with status 2.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from fcos_jax import compare
from fcos_jax.utils import cli

_FORMAT = flags.DEFINE_enum("format", None, ["mmdet", "torchvision"], "Reference to compare with.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of our model.")
_INPUT = flags.DEFINE_string("input", None, "The PyTorch checkpoint (.pth) of the reference.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Our side from this converted checkpoint or workdir (default: --input converted in memory).",
)
_ALLOW_OTHER_CONFIG_NAME = cli.define_allow_other_config_name()
flags.mark_flags_as_required(["format", "config", "input"])


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("give exactly one IMAGE file")
    cli.log_warnings_only()
    config = cli.config_from_flag()
    ok = compare.compare(
        _FORMAT.value,
        config,
        _INPUT.value,
        argv[1],
        _CHECKPOINT.value,
        allow_other_config_name=_ALLOW_OTHER_CONFIG_NAME.value,
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cli.run(main, errors=(compare.CompareError,))
