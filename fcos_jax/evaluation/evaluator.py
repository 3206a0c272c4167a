"""COCO evaluation of a model: the evaluation pipeline, a data-parallel predict step, COCOeval.

Every process runs the jitted predict step on its share of each global batch. The batch stays
split from input to output: each device runs the model, decodes and suppresses (NMS) its own
images, with no collective anywhere in the program, and each process fetches only its own
rows. Host work on batch i (its COCO results) runs while the devices compute batch i + 1; the
results of every process are gathered on process 0 once, at the end, for COCOeval.
`test.batch_size` is the global batch, rounded up to a multiple of the device count; dummy rows
that fill a batch are dropped by their `example_valid` mask: no image is lost or counted twice,
on any number of devices and processes.
"""

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from fcos_jax.config import classes as class_lists
from fcos_jax.detection import postprocess
from fcos_jax.evaluation import coco
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
# and for the rounded Python floats of `coco.detections_to_coco`).
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
    annotations: an instances JSON for the ground truth (default: built from the dataset at each
      evaluation). It is read and checked here, before any prediction, by every process (so
      that all stop together, none waiting in a collective): it must hold every image of the
      split and every category of the class list (`coco.check_covers`). Categories it has beyond
      the class list are left out of the AP.
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
        self.ground_truth = None  # the annotations' instances dict; None: the split's
        if annotations:
            self.ground_truth = coco.read_instances(annotations)
            coco.check_covers(
                self.ground_truth,
                self.pipeline.examples.image_ids,
                [cid for cid, _ in self.classes],
                str(annotations),
            )
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
        dataset = self.ground_truth
        if dataset is None:
            dataset = coco.ground_truth_from_index(self.pipeline.source.index(), self.classes)
        return coco.coco_evaluate(
            coco.load_ground_truth(dataset),
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
                    coco.detections_to_coco(
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
        ground_truth = coco.load_ground_truth(coco.read_instances(annotations))
    else:
        from fcos_jax.data import sources

        source = sources.open_split(config, config.data.val_split)
        classes = sources.resolve_classes(config, source)
        ground_truth = coco.load_ground_truth(coco.ground_truth_from_index(source.index(), classes))
    stats, report = coco.coco_evaluate(ground_truth, results, per_class=per_class)
    print(f"{path}:\n{report}", flush=True)
    return stats
