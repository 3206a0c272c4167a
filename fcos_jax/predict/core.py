"""Detect objects in image files and write what the command line asks for: the detections as
JSON, drawings, the first usable image's raw head outputs. Each file is decoded once; the
decoded array goes to `inference.Detector` and to the drawing. An image that cannot be used is
skipped and reported; nothing is written over an input or an existing drawing."""

import json
import logging
from pathlib import Path

import cv2
import ml_collections
import numpy as np

from fcos_jax.data import preprocess
from fcos_jax.predict import draw

log = logging.getLogger(__name__)


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


def draw_paths(directory: Path, images: list[str]) -> list[Path]:
    """DIR/<stem>.png per image, unique within the run: a name already taken gets _1, _2, ..."""
    taken: set[str] = set()
    paths = []
    for image in images:
        stem = Path(image).stem
        name, n = f"{stem}.png", 0
        while name in taken:
            n += 1
            name = f"{stem}_{n}.png"
        taken.add(name)
        paths.append(directory / name)
    return paths


def check_outputs(
    images: list[str], output: str | None, drawings: list[Path], dump: str | None
) -> None:
    """Refuses, in one line, to write over an input image, and to write a drawing over any
    existing file (an earlier drawing included: predict never replaces a file it did not write
    in this run). `--output` and `--dump-head-outputs` replace an existing file of their own."""
    inputs = {Path(image).resolve(): image for image in images}
    planned = {path.resolve() for path in drawings}
    for flag, target in (("--output", output), ("--dump-head-outputs", dump)):
        if target and Path(target).resolve() in inputs:
            raise ValueError(
                f"{flag}: {target} is the input image {inputs[Path(target).resolve()]}; predict "
                "never writes over an input"
            )
        if target and Path(target).resolve() in planned:
            raise ValueError(f"{flag}: {target} is also where --draw would write a drawing")
    existing = [path for path in drawings if path.exists()]
    if existing:
        raise FileExistsError(
            f"--draw: {existing[0]} exists ({len(existing)} of {len(drawings)} drawings would "
            "replace existing files); predict never writes over a file: give a new or empty "
            "directory"
        )


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
    allow_other_config_name: bool = False,
) -> list[dict]:
    """Detects objects in the image files with `checkpoint` (a converted directory or training
    workdir) and returns one `detections_to_json` entry per image, which it writes to `output`
    (stdout when None). draw_dir: DIR/<stem>.png per image with the boxes scoring at least
    draw_score_thr; dump_head_outputs: an .npz of the first usable image's raw head outputs;
    allow_other_config_name: see `inference.Detector.from_config`. Nothing is written over an
    input or an existing drawing (`check_outputs`).

    An image that cannot be decoded or resizes to nothing is skipped with a warning naming it,
    and its entry is `{"file", "error"}`; the others still run. Raises FileNotFoundError /
    ValueError / OSError with one line naming the file (a missing image; every image skipped)."""
    from fcos_jax import inference

    missing = [image for image in images if not Path(image).is_file()]
    if missing:
        raise FileNotFoundError(f"image file not found: {', '.join(missing)}")
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    drawings = draw_paths(Path(draw_dir), images) if draw_dir else []
    check_outputs(images, output, drawings, dump_head_outputs)  # before the slow restore
    problems: dict[int, str] = {}
    rgb_images = {}
    for i, image in enumerate(images):  # the one decode of each file
        try:
            rgb_images[i] = preprocess.load_rgb(image, image)
        except ValueError as error:
            problems[i] = str(error)
    _check_any_left(images, problems)
    detector = inference.Detector.from_config(
        config, checkpoint, allow_other_config_name=allow_other_config_name
    )
    # The detector's size rule, ahead, finds the images it cannot take (an empty resize, no
    # canvas): the others then run as one call, with no error midway.
    for i, rgb in list(rgb_images.items()):
        try:
            detector.check_size(rgb.shape[:2], images[i])
        except ValueError as error:
            problems[i] = str(error)
    _check_any_left(images, problems)
    usable = [i for i in rgb_images if i not in problems]
    if draw_dir:
        Path(draw_dir).mkdir(parents=True, exist_ok=True)
    found = {}
    # Each image is drawn as its batch comes back, while the next batch runs.
    batches = detector.detect_each(
        [rgb_images[i] for i in usable], batch_size=batch_size, names=[images[i] for i in usable]
    )
    for k, dets in batches:
        i = usable[k]
        found[i] = dets
        if draw_dir:
            drawn = draw.draw_detections(rgb_images[i][:, :, ::-1], dets, draw_score_thr)
            if not cv2.imwrite(str(drawings[i]), drawn):
                raise OSError(f"--draw: could not write {drawings[i]}")
    for i in sorted(problems):
        log.warning("predict: skipped %s", problems[i])
    if problems:
        log.warning("predict: %d of %d images skipped", len(problems), len(images))
    report = [
        detections_to_json(image, rgb_images[i].shape[:2], found[i])
        if i in found
        else {"file": image, "error": problems[i]}
        for i, image in enumerate(images)
    ]
    text = json.dumps(report, indent=1)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    else:
        print(text)
    if dump_head_outputs:
        first = min(found)
        arrays = head_outputs_to_npz(detector.head_outputs(rgb_images[first], images[first]))
        Path(dump_head_outputs).parent.mkdir(parents=True, exist_ok=True)
        np.savez(dump_head_outputs, **arrays)
    return report


def _check_any_left(images: list[str], problems: dict[int, str]) -> None:
    """ValueError (the first problem, and how many images had one) when no image is usable."""
    if len(problems) == len(images):
        more = f" (and {len(images) - 1} other images)" if len(images) > 1 else ""
        raise ValueError(f"{problems[min(problems)]}{more}")
