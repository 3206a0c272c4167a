"""COCO results json and pycocotools COCOeval (box AP).

Detections arrive as arrays in original-image pixels and class channels; they leave as COCO
results (`[x, y, w, h]`, dataset category ids), with the +1 in w/h when `legacy_plus_one` (mmdet
v1's `xyxy2xywh`, docs/modes.md §2.6) through `boxes.xyxy_to_coco_xywh`.
"""

import contextlib
import copy
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fcos_jax.detection import boxes as box_ops
from fcos_jax.utils import jsonio

ClassList = Sequence[tuple[int, str]]

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def detections_to_coco(
    image_id: int,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_list: ClassList,
    legacy_plus_one: bool,
) -> list[dict[str, Any]]:
    """One image's detections as COCO results.

    boxes: [N, 4] xyxy, original-image pixels; scores: [N]; labels: [N] int class channels.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    if not (len(boxes) == len(labels) == len(scores)):
        raise ValueError(
            f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_list)):
        raise ValueError(
            f"image {image_id}: label channel outside 0..{len(class_list) - 1} of the class list"
        )
    xywh = box_ops.xyxy_to_coco_xywh(boxes, legacy_plus_one)
    return [
        {
            "image_id": int(image_id),
            "category_id": int(class_list[int(label)][0]),
            "bbox": [round(float(v), 3) for v in box],
            "score": round(float(score), 5),
        }
        for box, score, label in zip(xywh, scores, labels, strict=True)
    ]


def ground_truth_from_index(index: Any, class_list: ClassList) -> dict[str, Any]:
    """A COCO ground-truth dict from a dataset's split index, for datasets without an annotations
    file. Boxes stay as the dataset stores them (COCO xywh, original pixels), crowd regions
    included, so COCOeval sees what it would see in an instances JSON.

    index: `fcos_jax.data.annotations.SplitIndex` (image_ids, original_hw, ann_offsets,
    bbox_xywh, category_ids, is_crowd, areas, ann_ids).
    """
    images, annotations = [], []
    for i, image_id in enumerate(index.image_ids):
        height, width = (int(v) for v in index.original_hw[i])
        images.append({"id": int(image_id), "height": height, "width": width})
        for row in range(int(index.ann_offsets[i]), int(index.ann_offsets[i + 1])):
            annotations.append(
                {
                    "id": int(index.ann_ids[row]),
                    "image_id": int(image_id),
                    "category_id": int(index.category_ids[row]),
                    "bbox": [float(v) for v in index.bbox_xywh[row]],
                    "area": float(index.areas[row]),
                    "iscrowd": int(index.is_crowd[row]),
                }
            )
    categories = [{"id": int(i), "name": str(n)} for i, n in class_list]
    return {"images": images, "annotations": annotations, "categories": categories}


def read_instances(path: str | Path) -> dict[str, Any]:
    """An instances JSON file (COCO ground truth) as a dict; ValueError naming the file when it
    is not a JSON object with `images`, `annotations` and `categories` lists."""
    dataset = jsonio.read_json(path, "annotations file")
    if not isinstance(dataset, dict):
        kind = type(dataset).__name__
        raise ValueError(f"{path}: a COCO ground truth is a JSON object, not a {kind}")
    for field in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(field), list):
            raise ValueError(f"{path}: ground truth has no '{field}' list")
    return dataset


def check_covers(
    dataset: dict[str, Any], image_ids: Sequence[int], category_ids: Sequence[int], name: str
) -> None:
    """ValueError naming `name` when the ground truth `dataset` lacks an image to be evaluated or
    a category of the model's class list. COCOeval would not say so: detections on an image it
    lacks count as false positives, and detections of a category it lacks are dropped."""
    known_images = {int(image["id"]) for image in dataset["images"]}
    missing = sorted({int(i) for i in image_ids} - known_images)
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{name}: the ground truth lacks {len(missing)} of the {len(set(image_ids))} images "
            f"to evaluate (ids {shown})"
        )
    known_categories = {int(category["id"]) for category in dataset["categories"]}
    missing = sorted({int(c) for c in category_ids} - known_categories)
    if missing:
        raise ValueError(
            f"{name}: the ground truth has no category {', '.join(map(str, missing[:5]))} of the "
            "model's class list"
        )


def load_ground_truth(dataset: dict[str, Any]) -> COCO:
    """A pycocotools COCO object of an instances dict (`read_instances`, `ground_truth_from_index`);
    the dict is copied (COCOeval marks its annotations), not changed."""
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(
    ground_truth: COCO,
    results: list[dict[str, Any]],
    image_ids: Sequence[int] | None = None,
    per_class: bool = False,
    category_ids: Sequence[int] | None = None,
) -> tuple[dict[str, float], str]:
    """Runs COCOeval (bbox). Returns ({stat name: value}, the printed report).

    The report is COCOeval's standard 12-line table, followed by one AP line per category when
    `per_class`. `image_ids` and `category_ids` restrict the evaluation (default: every
    ground-truth image and category); a model's evaluation gives its class list's ids, as
    mmdetection 2 and 3 do, so that categories the model does not predict are not averaged in.
    With no detections at all every stat is 0 (pycocotools cannot load an empty result list).
    """
    image_ids = sorted(ground_truth.getImgIds()) if image_ids is None else list(image_ids)
    unknown = {r["image_id"] for r in results} - set(ground_truth.getImgIds())
    if unknown:
        raise ValueError(f"detections for image ids not in the ground truth: {sorted(unknown)[:5]}")
    if not results:
        stats = dict.fromkeys(STAT_NAMES, 0.0)
        return stats, "no detections: every AP and AR is 0\n"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        detections = ground_truth.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(ground_truth, detections, "bbox")
        evaluator.params.imgIds = image_ids
        if category_ids is not None:
            evaluator.params.catIds = sorted(int(c) for c in category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    report = summary.getvalue()
    if per_class:
        report += per_class_table(evaluator, ground_truth)
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}
    return stats, report


def per_class_table(evaluator: COCOeval, ground_truth: COCO) -> str:
    """AP@[.5:.95] per category (area all, 100 detections), as lines `name  AP`."""
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    lines = []
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        ap = float(values.mean()) if values.size else float("nan")
        name = ground_truth.cats[category_id]["name"]
        lines.append(f"{name:<20s} {ap:.3f}")
    return "\n".join(lines) + "\n"
