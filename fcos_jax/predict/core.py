"""Detect objects in image files and write what the command line asks for: the detections as
JSON, drawings, the first image's raw head outputs. Each file is decoded once; the decoded array
goes to `inference.Detector` and to the drawing."""

import json
from pathlib import Path

import cv2
import ml_collections
import numpy as np

from fcos_jax import draw, preprocess


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


def predict_files(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    images: list[str],
    *,
    output: str | None = None,
    draw_dir: str | None = None,
    draw_score_thr: float = 0.3,
    dump_head_outputs: str | None = None,
    batch_size: int | None = None,
) -> list[dict]:
    """Detects objects in the image files with `checkpoint` (a converted directory or training
    workdir) and returns one `detections_to_json` entry per image, which it writes to `output`
    (stdout when None). draw_dir: DIR/<stem>.png per image with the boxes scoring at least
    draw_score_thr; dump_head_outputs: an .npz of the first image's raw head outputs.

    Raises FileNotFoundError / ValueError / OSError with one line naming the file."""
    from fcos_jax import inference

    missing = [image for image in images if not Path(image).is_file()]
    if missing:
        raise FileNotFoundError(f"image file not found: {', '.join(missing)}")
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    rgb_images = [preprocess.load_rgb(image, image) for image in images]  # the one decode
    detector = inference.Detector.from_config(config, checkpoint)
    draw_paths = None
    if draw_dir:
        Path(draw_dir).mkdir(parents=True, exist_ok=True)
        draw_paths = _draw_paths(Path(draw_dir), images)
    report: list[dict | None] = [None] * len(images)
    # Each image is written and drawn as its batch comes back, while the next batch runs.
    for i, dets in detector.detect_each(rgb_images, batch_size=batch_size, names=images):
        report[i] = detections_to_json(images[i], rgb_images[i].shape[:2], dets)
        if draw_paths is not None:
            drawn = draw.draw_detections(rgb_images[i][:, :, ::-1], dets, draw_score_thr)
            if not cv2.imwrite(str(draw_paths[i]), drawn):
                raise OSError(f"--draw: could not write {draw_paths[i]}")
    text = json.dumps(report, indent=1)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    else:
        print(text)
    if dump_head_outputs:
        arrays = head_outputs_to_npz(detector.head_outputs(rgb_images[0], images[0]))
        Path(dump_head_outputs).parent.mkdir(parents=True, exist_ok=True)
        np.savez(dump_head_outputs, **arrays)
    return report
