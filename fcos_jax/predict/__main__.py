"""Detect objects in image files with a converted or trained checkpoint.

  python -m fcos_jax.predict --config configs/fcos_r50_caffe_fpn_gn_1x.py \
      --checkpoint ckpt/fcos_r50_caffe_fpn_gn_1x [--output dets.json] [--draw out_dir] \
      [--dump-head-outputs heads.npz] image1.jpg [image2.png ...]

Writes JSON (to --output, else stdout; an existing --output file is replaced, an input image
never): one entry per image with its file name, size and the detections as columns: boxes
[[x1, y1, x2, y2], ...] in original-image pixels, scores, class channels (labels), category_ids
and names, sorted by score. An image that cannot be decoded or resizes to nothing is skipped
with a warning naming it (its entry holds `file` and `error`), the others run, and the exit
status is 1.
--draw DIR writes DIR/<image stem>.png with the labelled boxes scoring >= --draw_score_thr (0.3),
names unique within the run (`a.png`, `a_1.png`, ...); it never writes over an existing file: a
drawing that would (an input in DIR, an earlier run's drawing) stops predict with one line
before anything runs. --dump-head-outputs writes the first usable image's raw head outputs
(NHWC float32 `cls_logits_{l}`, `bbox_reg_{l}` (l, t, r, b distances in network-input pixels),
`centerness_{l}`, l = 0..4) as an .npz file.
All logic lives in `fcos_jax.predict` and `fcos_jax.inference`; config fields can be overridden
(`--config.test.score_thr=0.3`). `--config.data.eval_pad=canvas` pads every image into its canvas
(as evaluation's canvas mode and the exported artifacts do) instead of to the next multiple of 32.
Errors print one line `error: ...` to stderr and exit with status 2.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from fcos_jax import predict
from fcos_jax.utils import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file (configs/*.py).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Converted checkpoint directory or training workdir."
)
_OUTPUT = flags.DEFINE_string("output", None, "Detections JSON file (default: stdout).")
_DRAW = flags.DEFINE_string("draw", None, "Directory for PNG images with the boxes drawn.")
_DRAW_SCORE_THR = flags.DEFINE_float(
    "draw_score_thr", 0.3, "--draw shows detections scoring at least this (the JSON keeps all)."
)
_DUMP = flags.DEFINE_string(
    "dump-head-outputs", None, "An .npz file for the first image's raw per-level head outputs."
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Images per forward pass (default config.test.batch_size)."
)
_ALLOW_OTHER_CONFIG_NAME = cli.define_allow_other_config_name()
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv: list[str]) -> None:
    images = argv[1:]
    if not images:
        raise app.UsageError("give at least one IMAGE file")
    cli.log_warnings_only()  # orbax logs every restore step at INFO
    report = predict.predict_files(
        cli.config_from_flag(),
        _CHECKPOINT.value,
        images,
        output=_OUTPUT.value,
        draw_dir=_DRAW.value,
        draw_score_thr=_DRAW_SCORE_THR.value,
        dump_head_outputs=_DUMP.value,
        batch_size=_BATCH_SIZE.value,
        allow_other_config_name=_ALLOW_OTHER_CONFIG_NAME.value,
    )
    if any("error" in entry for entry in report):
        sys.exit(1)  # the others ran; the skipped ones are named in the log and the JSON


if __name__ == "__main__":
    cli.run(main)
