"""COCO evaluation of a model: the evaluation pipeline, a sharded predict step, COCOeval.

Every process runs the jitted predict step on its share of each global batch; the detections
come back replicated (gathered), so process 0 holds every image's detections once and writes the
COCO results and the AP table. `test.batch_size` is the global batch, rounded up to a multiple of
the device count; dummy rows that fill a batch are dropped by their `example_valid` mask: no image
is lost or counted twice, on any number of devices and processes.
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

from fcos_jax import classes as class_lists
from fcos_jax import compile_cache, compile_options, evaluation, jsonio, postprocess, sharding
from fcos_jax.models import build_model

log = logging.getLogger(__name__)
PyTree = Any

PREDICT_INPUTS = ("image", "image_hw", "scale", "original_hw", "image_id", "example_valid")


def make_predict_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """jit `(variables, batch) -> detections`, batch sharded on `data`, outputs replicated.

    batch: image [B,H,W,3], image_hw [B,2], scale [B,2], original_hw [B,2], image_id [B],
    example_valid [B]. Returns boxes [B,D,4] (original pixels), scores, labels, valid [B,D],
    image_id [B], example_valid [B].
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
        predict,
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
        compiler_options=compile_options.compiler_options(),
    )


def predict_dataset(
    config: ml_collections.ConfigDict,
    variables: PyTree,
    mesh: Mesh,
    pipeline: Any,
    class_list: list[tuple[int, str]],
    predict_step: Callable | None = None,
) -> list[dict[str, Any]]:
    """COCO results of every image of `pipeline` (an `EvalPipeline`), on every process."""
    predict_step = predict_step or make_predict_step(config, mesh)
    variables = sharding.replicate(variables, mesh)
    results: list[dict[str, Any]] = []
    seen: set[int] = set()
    for batch in pipeline:
        batch = sharding.to_global({k: batch[k] for k in PREDICT_INPUTS}, mesh)
        dets = jax.device_get(predict_step(variables, batch))
        for row in np.flatnonzero(dets["example_valid"]):
            image_id = int(dets["image_id"][row])
            if image_id in seen:
                raise RuntimeError(f"evaluation: image id {image_id} was predicted twice")
            seen.add(image_id)
            keep = dets["valid"][row]
            results += evaluation.detections_to_coco(
                image_id,
                dets["boxes"][row][keep],
                dets["scores"][row][keep],
                dets["labels"][row][keep],
                class_list,
                config.legacy_plus_one,
            )
    expected = len(pipeline.examples)
    if len(seen) != expected:
        raise RuntimeError(f"evaluation: {len(seen)} images predicted, {expected} expected")
    return results


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


def evaluate(
    config: ml_collections.ConfigDict,
    variables: PyTree,
    mesh: Mesh,
    *,
    classes: list[tuple[int, str]] | None = None,
    pipeline: Any = None,
    annotations: str | Path | None = None,
    per_class: bool = False,
    results_path: str | Path | None = None,
    predict_step: Callable | None = None,
) -> tuple[dict[str, float], str]:
    """Box AP of `variables` on the validation split (`data.val_split`), on every device of
    every process (`test.batch_size` is the global batch, see `eval_batch_size`).

    classes: the model's class list (channel -> category id, name), e.g. from the checkpoint's
      meta; the validation data's own list must equal it (default: the data's).
    annotations: an instances JSON for the ground truth (default: built from the dataset).
    results_path: where process 0 writes the COCO results json (optional).
    Returns ({AP, AP50, ...}, the COCOeval report); on processes other than 0, ({}, "").
    """
    from fcos_jax.data import pipeline as data_pipeline  # TensorFlow only where data is read

    pipeline = pipeline or data_pipeline.EvalPipeline(
        config,
        batch_size=eval_batch_size(config, mesh),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if classes is not None and [tuple(c) for c in classes] != [tuple(c) for c in pipeline.classes]:
        raise ValueError(
            f"{pipeline.source}: the validation data's classes {_short(pipeline.classes)} differ "
            f"from the model's {_short(classes)} (channel -> category id, name)"
        )
    class_list = pipeline.classes
    results = predict_dataset(config, variables, mesh, pipeline, class_list, predict_step)
    if jax.process_index() != 0:
        return {}, ""
    if results_path:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        Path(results_path).write_text(json.dumps(results))
    if annotations:
        ground_truth = evaluation.load_ground_truth(annotations)
    else:
        ground_truth = evaluation.load_ground_truth(
            evaluation.ground_truth_from_index(pipeline.source.index(), class_list)
        )
    image_ids = [int(i) for i in pipeline.examples.image_ids]
    return evaluation.coco_evaluate(ground_truth, results, image_ids, per_class=per_class)


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
    from fcos_jax import checkpoint
    from fcos_jax.data import sources

    compile_cache.enable_from_config(config)
    mesh = sharding.make_mesh()
    # The checkpoint first: a damaged or mismatched one stops before any data is prepared.
    step, variables, meta = checkpoint.restore_inference_step(
        checkpoint_path,
        config,
        sharding.replicated(mesh),
        allow_other_config_name=allow_other_config_name,
    )
    # One process per data_dir prepares the split (a COCO-format folder, the index cache) while
    # the others wait, as training does.
    sources.prepare_splits(config, [config.data.val_split])
    classes = None
    if "classes" in meta:
        classes = class_lists.from_meta(meta, str(checkpoint_path))
        config = class_lists.resolve_num_classes(config, classes, str(checkpoint_path))
    stats, report = evaluate(
        config,
        variables,
        mesh,
        classes=classes,
        annotations=annotations,
        per_class=per_class,
        results_path=results_path,
    )
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
        ground_truth = evaluation.load_ground_truth(annotations)
    else:
        from fcos_jax.data import sources

        sources.prepare_splits(config, [config.data.val_split])
        source = sources.open_source(config, config.data.val_split)
        classes = sources.resolve_classes(config, source)
        ground_truth = evaluation.load_ground_truth(
            evaluation.ground_truth_from_index(source.index(), classes)
        )
    stats, report = evaluation.coco_evaluate(ground_truth, results, per_class=per_class)
    print(f"{path}:\n{report}", flush=True)
    return stats
