"""COCO evaluation of a model: the evaluation pipeline, a data-parallel predict step, COCOeval.

Every process runs the jitted predict step on its share of each global batch. The batch stays
split from input to output: each device runs the model, decodes and suppresses (NMS) its own
images, with no collective anywhere in the program, and each process fetches only its own
rows. Host work on batch i (its COCO results) runs while the devices compute batch i + 1; the
results of every process are gathered on process 0 once, at the end, for COCOeval.
`test.batch_size` is the global batch, rounded up to a multiple of the device count; dummy rows
that fill a batch are dropped by their `example_valid` mask: no image is lost or counted twice,
on any number of devices and processes.

The COCO half of the module (results JSON, ground truth from a split or an instances file,
COCOeval) also serves `eval.py --detections`, which scores a saved results file.
"""

import contextlib
import copy
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fcos_jax.config import classes as class_lists
from fcos_jax.detection import boxes as box_ops
from fcos_jax.detection import postprocess
from fcos_jax.models import build_model
from fcos_jax.parallel import sharding
from fcos_jax.utils import compile_options, jsonio

log = logging.getLogger(__name__)
PyTree = Any

PREDICT_INPUTS = ("image", "image_hw", "scale", "original_hw", "image_id", "example_valid")


def make_predict_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """jit `(variables, batch) -> detections`, batch and detections split over `data`.

    batch: image [B,H,W,3], image_hw [B,2], scale [B,2], original_hw [B,2], image_id [B],
    example_valid [B]. Returns boxes [B,D,4] (original pixels), scores, labels, valid [B,D],
    image_id [B], example_valid [B]: row b computed by the device holding image b.
    """
    model = build_model(config.model)
    options = postprocess.options_from_config(config)

    def predict(variables: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        outputs = model.apply(variables, batch["image"])
        dets = postprocess.detect(
            outputs, batch["image_hw"], batch["scale"], original_hw=batch["original_hw"], **options
        )
        return dict(dets, image_id=batch["image_id"], example_valid=batch["example_valid"])

    return jax.jit(
        sharding.on_each_shard(predict, mesh, replicated_args=1),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.batch_sharding(mesh),
        compiler_options=compile_options.compiler_options(),
    )


# COCO results travel between processes as rows of this many float64 values (exact for the ids
# and for the rounded Python floats of `detections_to_coco`).
_RESULT_COLUMNS = ("image_id", "category_id", "x", "y", "w", "h", "score")


def _results_to_rows(results: list[dict[str, Any]]) -> np.ndarray:
    rows = [(r["image_id"], r["category_id"], *r["bbox"], r["score"]) for r in results]
    return np.asarray(rows, np.float64).reshape(-1, len(_RESULT_COLUMNS))


def _rows_to_results(rows: np.ndarray) -> list[dict[str, Any]]:
    return [
        {
            "image_id": int(row[0]),
            "category_id": int(row[1]),
            "bbox": [float(v) for v in row[2:6]],
            "score": float(row[6]),
        }
        for row in rows
    ]


def eval_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
    """`test.batch_size` (the global evaluation batch) rounded up to a multiple of the mesh's
    devices; the rows added are masked dummies (`example_valid` False), so every image is
    predicted exactly once whatever the device and process count."""
    requested = int(config.test.batch_size)
    if requested < 1:
        raise ValueError(f"test.batch_size: expected >= 1, got {requested}")
    rounded = -(-requested // mesh.size) * mesh.size
    if rounded != requested and jax.process_index() == 0:
        log.info(
            "test.batch_size %d rounded up to %d for %d devices (the %d extra rows of each batch "
            "are masked dummies)",
            requested,
            rounded,
            mesh.size,
            rounded - requested,
        )
    return rounded


class Evaluator:
    """Box AP of a model's variables on the validation split (`data.val_split`), on every
    device of every process (`test.batch_size` is the global batch, see `eval_batch_size`).

    Built once for a run: the validation pipeline (this process's share of every global batch),
    the class check and the compiled predict step serve each evaluation.

    classes: the model's class list (channel -> category id, name), e.g. from the checkpoint's
      meta; the validation data's own list must equal it (default: the data's).
    annotations: an instances JSON for the ground truth (default: built from the dataset). It is
      read and checked here, before any prediction, by every process (so that all stop
      together, none waiting in a collective): it must hold every image of the split and every
      category of the class list (`check_covers`). Categories it has beyond the class list are
      left out of the AP. Only process 0, which runs COCOeval, keeps it.

    The ground truth's pycocotools index is built once, at the first evaluation, and serves every
    evaluation after it (COCOeval only marks crowd annotations as ignored in it, the same way
    each time).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        *,
        classes: list[tuple[int, str]] | None = None,
        pipeline: Any = None,
        annotations: str | Path | None = None,
    ) -> None:
        from fcos_jax.data import pipeline as data_pipeline  # TensorFlow only where data is read

        self.mesh = mesh
        self.pipeline = pipeline or data_pipeline.EvalPipeline(
            config,
            batch_size=eval_batch_size(config, mesh),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        data_classes = [tuple(c) for c in self.pipeline.classes]
        if classes is not None and [tuple(c) for c in classes] != data_classes:
            raise ValueError(
                f"{self.pipeline.source}: the validation data's classes "
                f"{_short(self.pipeline.classes)} differ from the model's {_short(classes)} "
                "(channel -> category id, name)"
            )
        self.classes = list(self.pipeline.classes)
        self._instances = None  # the annotations file's dict until the index is built
        self._ground_truth: COCO | None = None  # the index, process 0's, built once
        if annotations:
            instances = read_instances(annotations)
            check_covers(
                instances,
                self.pipeline.examples.image_ids,
                [cid for cid, _ in self.classes],
                str(annotations),
            )
            if jax.process_index() == 0:
                self._instances = instances
        self.legacy_plus_one = bool(config.legacy_plus_one)
        self.predict_step = make_predict_step(config, mesh)

    def evaluate(
        self,
        variables: PyTree,
        *,
        per_class: bool = False,
        results_path: str | Path | None = None,
    ) -> tuple[dict[str, float], str]:
        """({AP, AP50, ...}, the COCOeval report) of `variables`; on processes other than 0,
        ({}, ""). results_path: where process 0 writes the COCO results json (optional)."""
        results = self.predict(variables)
        if jax.process_index() != 0:
            return {}, ""
        if results_path:
            Path(results_path).parent.mkdir(parents=True, exist_ok=True)
            Path(results_path).write_text(json.dumps(results))
        if self._ground_truth is None:
            dataset = self._instances or ground_truth_from_index(
                self.pipeline.source.index(), self.classes
            )
            self._ground_truth, self._instances = load_ground_truth(dataset), None
        return coco_evaluate(
            self._ground_truth,
            results,
            [int(i) for i in self.pipeline.examples.image_ids],
            per_class=per_class,
            category_ids=[cid for cid, _ in self.classes],
        )

    def predict(self, variables: PyTree) -> list[dict[str, Any]]:
        """COCO results of every image of the pipeline, on every process.

        Each process converts its own rows while the devices compute the next batch, and the
        processes' results are gathered once at the end."""
        mesh = self.mesh
        variables = sharding.replicate(variables, mesh)
        results: list[dict[str, Any]] = []
        image_ids: list[int] = []

        def convert(dets: dict[str, jax.Array]) -> None:
            """This process's rows of one batch -> COCO results (host work)."""
            dets = sharding.local_rows(dets)
            for row in np.flatnonzero(dets["example_valid"]):
                image_ids.append(int(dets["image_id"][row]))
                keep = dets["valid"][row]
                results.extend(
                    detections_to_coco(
                        image_ids[-1],
                        dets["boxes"][row][keep],
                        dets["scores"][row][keep],
                        dets["labels"][row][keep],
                        self.classes,
                        self.legacy_plus_one,
                    )
                )

        pending = None  # the previous batch's detections, still on the devices
        for batch in self.pipeline:
            batch = sharding.to_global({k: batch[k] for k in PREDICT_INPUTS}, mesh)
            dets = self.predict_step(variables, batch)  # runs while `convert` works below
            if pending is not None:
                convert(pending)
            pending = dets
        if pending is not None:
            convert(pending)
        all_ids = sharding.gather_from_processes(np.asarray(image_ids, np.int64))
        unique, counts = np.unique(all_ids, return_counts=True)
        if (counts > 1).any():
            raise RuntimeError(
                f"evaluation: image id {int(unique[counts > 1][0])} was predicted twice"
            )
        expected = len(self.pipeline.examples)
        if len(unique) != expected:
            raise RuntimeError(f"evaluation: {len(unique)} images predicted, {expected} expected")
        if jax.process_count() == 1:
            return results
        return _rows_to_results(sharding.gather_from_processes(_results_to_rows(results)))


def _short(classes: list[tuple[int, str]], limit: int = 5) -> str:
    shown = ", ".join(f"{int(cid)}:{name}" for cid, name in list(classes)[:limit])
    return f"[{shown}{', ...' if len(classes) > limit else ''}] ({len(classes)})"


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    checkpoint_path: str | Path,
    *,
    annotations: str | Path | None = None,
    results_path: str | Path | None = None,
    per_class: bool = False,
    allow_other_config_name: bool = False,
) -> dict[str, float]:
    """`eval.py`: restores params and BN statistics (converted or trained; a workdir's newest
    intact step, verified) and evaluates them on every device of every process; process 0
    prints the AP table. The class list (and, with `model.head.num_classes = 0`, the head's
    size) comes from the checkpoint's meta; a checkpoint of another config name is refused
    unless `allow_other_config_name`. Returns the stats."""
    from fcos_jax.checkpoint import store

    mesh = sharding.make_mesh()
    # The checkpoint first: a damaged or mismatched one stops before any data is prepared.
    step, variables, meta = store.restore_inference_step(
        checkpoint_path,
        config,
        sharding.replicated(mesh),
        allow_other_config_name=allow_other_config_name,
    )
    classes = None
    if "classes" in meta:
        classes = class_lists.from_meta(meta, str(checkpoint_path))
        config = class_lists.resolve_num_classes(config, classes, str(checkpoint_path))
    evaluator = Evaluator(config, mesh, classes=classes, annotations=annotations)
    stats, report = evaluator.evaluate(variables, per_class=per_class, results_path=results_path)
    if jax.process_index() == 0:
        source = meta.get("source", checkpoint_path)
        print(f"{config.name} ({source}, step {step}):\n{report}", flush=True)
    return stats


def evaluate_results_file(
    config: ml_collections.ConfigDict,
    results_path: str | Path,
    annotations: str | Path | None = None,
    *,
    per_class: bool = False,
) -> dict[str, float]:
    """`eval.py --detections`: COCOeval of a saved COCO results json against `annotations` (or
    the ground truth of the config's validation split). Prints and returns the stats."""
    path = Path(results_path)
    results = jsonio.read_json(path, "detections file")
    if not isinstance(results, list):
        raise ValueError(f"{path}: a COCO results file is a list of detections")
    if annotations:
        ground_truth = load_ground_truth(read_instances(annotations))
    else:
        from fcos_jax.data import sources

        source = sources.open_split(config, config.data.val_split)
        classes = sources.resolve_classes(config, source)
        ground_truth = load_ground_truth(ground_truth_from_index(source.index(), classes))
    stats, report = coco_evaluate(ground_truth, results, per_class=per_class)
    print(f"{path}:\n{report}", flush=True)
    return stats


# COCO results and pycocotools' COCOeval. Detections arrive as arrays in original-image
# pixels and class channels; they leave as COCO results (`[x, y, w, h]`, dataset category
# ids), with the +1 in w/h when `legacy_plus_one` (mmdet v1's `xyxy2xywh`, docs/modes.md
# §2.6) through `boxes.xyxy_to_coco_xywh`.

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
    class_list: Sequence[tuple[int, str]],
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


def ground_truth_from_index(index: Any, class_list: Sequence[tuple[int, str]]) -> dict[str, Any]:
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
    ground_truth = COCO()
    ground_truth.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
    return ground_truth


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
