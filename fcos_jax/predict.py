"""Detect objects in image files with a converted or trained checkpoint.

  python -m fcos_jax.predict --config configs/fcos_r50_caffe_fpn_gn_1x.py \
      --checkpoint ckpt/fcos_r50_caffe_fpn_gn_1x [--output dets.json] [--draw out_dir] \
      [--dump-head-outputs heads.npz] image1.jpg [image2.png ...]

Writes JSON (to --output, else stdout): one entry per image with its file name, size and the
detections as columns: boxes [[x1, y1, x2, y2], ...] in original-image pixels, scores,
class channels (labels), category_ids and names, sorted by score.
--draw DIR writes DIR/<image stem>.png with the labelled boxes scoring >= --draw_score_thr (0.3);
--dump-head-outputs writes the first image's raw head outputs (NHWC float32 `cls_logits_{l}`,
`bbox_reg_{l}` (l, t, r, b distances in network-input pixels), `centerness_{l}`, l = 0..4) as an
.npz file.
All logic lives in `fcos_jax.inference`; config fields can be overridden (`--config.test.score_thr
=0.3`). `--config.data.eval_pad=canvas` pads every image into its canvas (as evaluation's canvas
mode and the exported artifacts do) instead of to the next multiple of 32.
"""

import json
from pathlib import Path

import cv2
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from fcos_jax import cli, draw

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


def detections_to_json(file_name: str, original_hw, dets: dict[str, np.ndarray]) -> dict:
    """One image's detections as a JSON-ready dict (columns, boxes xyxy in original pixels)."""
    return {
        "file": file_name,
        "height": int(original_hw[0]),
        "width": int(original_hw[1]),
        "boxes": [[float(v) for v in box] for box in dets["boxes"]],
        "scores": [float(s) for s in dets["scores"]],
        "labels": [int(c) for c in dets["labels"]],
        "category_ids": [int(c) for c in dets["category_ids"]],
        "names": [str(n) for n in dets["names"]],
    }


def _draw_paths(directory: Path, images: list[str]) -> list[Path]:
    """DIR/<stem>.png per image; repeated stems get a numeric suffix."""
    seen: dict[str, int] = {}
    paths = []
    for image in images:
        stem = Path(image).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        paths.append(directory / (f"{stem}.png" if count == 0 else f"{stem}_{count}.png"))
    return paths


def head_outputs_to_npz(head_outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-level head outputs -> flat {'cls_logits_0': [1, H, W, K], ...} float32 arrays."""
    return {
        f"{key}_{level}": np.asarray(value, dtype=np.float32)
        for level, outputs in enumerate(head_outputs)
        for key, value in outputs.items()
    }


def run(config, checkpoint: str, images: list[str]) -> None:
    """The command line's work; raises on bad input (main turns that into one line)."""
    from fcos_jax import inference, preprocess

    missing = [image for image in images if not Path(image).is_file()]
    if missing:
        raise FileNotFoundError(f"image file not found: {', '.join(missing)}")
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    detector = inference.Detector.from_config(config, checkpoint)
    all_dets = detector(images, batch_size=_BATCH_SIZE.value)
    bgr_images = [preprocess.read_image(image) for image in images]
    report = [
        detections_to_json(image, bgr.shape[:2], dets)
        for image, bgr, dets in zip(images, bgr_images, all_dets, strict=True)
    ]
    text = json.dumps(report, indent=1)
    if _OUTPUT.value:
        Path(_OUTPUT.value).parent.mkdir(parents=True, exist_ok=True)
        Path(_OUTPUT.value).write_text(text + "\n")
    else:
        print(text)
    if _DRAW.value:
        directory = Path(_DRAW.value)
        directory.mkdir(parents=True, exist_ok=True)
        for path, bgr, dets in zip(
            _draw_paths(directory, images), bgr_images, all_dets, strict=True
        ):
            if not cv2.imwrite(str(path), draw.draw_detections(bgr, dets, _DRAW_SCORE_THR.value)):
                raise OSError(f"--draw: could not write {path}")
    if _DUMP.value:
        arrays = head_outputs_to_npz(detector.head_outputs(images[0]))
        Path(_DUMP.value).parent.mkdir(parents=True, exist_ok=True)
        np.savez(_DUMP.value, **arrays)


def main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
    images = argv[1:]
    if not images:
        raise app.UsageError("give at least one IMAGE file")
    run(cli.config_from_flag(), _CHECKPOINT.value, images)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "checkpoint"])  # cli.run: exit 2 if missing
    cli.run(main)
