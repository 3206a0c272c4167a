"""evaluation/evaluator.py: the global evaluation batch on any device count, the model's vs the
data's classes, an annotations file's contents (refused before training or prediction
starts), and the ground truth one evaluator keeps for every evaluation.

Evaluation on real topologies (1 device, 4 devices, 2 processes x 2 devices) runs end to end in
test_train_cli.py.
"""

import contextlib
import copy
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from data_helpers import folder_config, random_dataset
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_coco_evaluation import CLASSES, _ground_truth_and_results

from fcos_jax.config import base as config_base
from fcos_jax.evaluation import evaluator
from fcos_jax.parallel import sharding


@pytest.mark.parametrize(
    ("requested", "devices", "expected"),
    [(1, 1, 1), (3, 1, 3), (1, 4, 4), (3, 4, 4), (8, 4, 8), (5, 4, 8), (3, 2, 4)],
)
def test_the_global_batch_rounds_up_to_the_devices(requested, devices, expected):
    config = config_base.get_base_config()
    config.test.batch_size = requested
    assert evaluator.eval_batch_size(config, SimpleNamespace(size=devices)) == expected


def test_a_non_positive_batch_is_refused_naming_the_field():
    config = config_base.get_base_config()
    config.test.batch_size = 0
    with pytest.raises(ValueError, match="test.batch_size"):
        evaluator.eval_batch_size(config, SimpleNamespace(size=1))


def test_validation_data_with_other_classes_than_the_model_is_refused():
    config = config_base.get_base_config()
    pipeline = SimpleNamespace(
        classes=[(1, "cat"), (2, "dog")], source="mydata validation (annotations/val.json)"
    )
    with pytest.raises(ValueError, match=r"annotations/val.json\): the validation data's classes"):
        evaluator.Evaluator(
            config, sharding.make_mesh(), classes=[(1, "cat"), (3, "bird")], pipeline=pipeline
        )


def test_an_annotations_file_without_a_class_of_the_model_is_refused_when_built(tmp_path):
    """Read and checked when the evaluator is built: before any prediction, not after it."""
    config = config_base.get_base_config()
    classes = [(1, "cat"), (2, "dog")]
    pipeline = SimpleNamespace(
        classes=classes, source="mydata validation", examples=SimpleNamespace(image_ids=[4, 5])
    )
    images = [{"id": 4, "height": 8, "width": 8}, {"id": 5, "height": 8, "width": 8}]
    path = tmp_path / "instances.json"
    path.write_text(
        json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "cat"}]})
    )
    with pytest.raises(ValueError, match=r"instances.json: the ground truth has no category 2 "):
        evaluator.Evaluator(
            config, sharding.make_mesh(), classes=classes, pipeline=pipeline, annotations=path
        )


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("batch_size", 0, "test.batch_size"), ("postprocess", "soft_nms", "test.postprocess")],
)
def test_training_with_an_unusable_evaluation_setting_stops_before_its_first_step(
    tmp_path, field, value, named
):
    """The evaluation is built before the first step: a setting it refuses stops the run before
    any step or checkpoint, not at the first evaluation."""
    from fcos_jax.training import trainer

    folder = tmp_path / "folder"
    train = random_dataset(folder, 4, seed=1)
    val = random_dataset(folder, 2, seed=2, split="val")
    config = folder_config(tmp_path / "data", train, val, eval_every=1)
    setattr(config.test, field, value)
    with pytest.raises(ValueError, match=named):
        trainer.train_and_evaluate(config, tmp_path / "workdir")
    assert not (tmp_path / "workdir" / "checkpoints").exists()


def test_each_evaluation_of_one_evaluator_equals_pycocotools_on_fresh_objects(tmp_path):
    """The ground truth's index is built once and kept: a second evaluation, on other detections,
    must still equal COCOeval run from the file, crowd regions included."""
    gt, first = _ground_truth_and_results(seed=2)
    gt["annotations"][0]["iscrowd"] = 1  # COCOeval marks it ignored in the index it is given
    _, second = _ground_truth_and_results(seed=3)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt))
    image_ids = [image["id"] for image in gt["images"]]
    pipeline = SimpleNamespace(
        classes=CLASSES, source="mydata validation", examples=SimpleNamespace(image_ids=image_ids)
    )
    built = evaluator.Evaluator(
        config_base.get_base_config(), sharding.make_mesh(), pipeline=pipeline, annotations=path
    )
    for results in (first, second, first):
        built.predict = lambda variables, results=results: results
        stats, _ = built.evaluate({})
        with contextlib.redirect_stdout(io.StringIO()):
            reference_gt = COCO(str(path))
            detections = reference_gt.loadRes(copy.deepcopy(results))  # it adds keys
            reference = COCOeval(reference_gt, detections, "bbox")
            reference.evaluate()
            reference.accumulate()
            reference.summarize()
        np.testing.assert_array_equal([stats[k] for k in evaluator.STAT_NAMES], reference.stats)
