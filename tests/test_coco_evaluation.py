"""COCO results and COCOeval (evaluation/evaluator.py) against pycocotools run on files."""

import contextlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fcos_jax.evaluation import evaluator

CLASSES = [(3, "car"), (7, "train"), (11, "hydrant")]


def _ground_truth_and_results(seed=0):
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in (5, 9, 12, 40):
        images.append({"id": image_id, "height": 300, "width": 400})
        for _ in range(rng.integers(1, 6)):
            x, y = rng.uniform(0, 300), rng.uniform(0, 200)
            w, h = rng.uniform(8, 100), rng.uniform(8, 100)
            category = CLASSES[rng.integers(0, 3)][0]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
            for _ in range(2):  # a jittered true positive and a random false positive
                jitter = rng.normal(0, 4, 4)
                results.append(
                    {"image_id": image_id, "category_id": category,
                     "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                     "score": float(rng.uniform(0.3, 1.0))}
                )  # fmt: skip
                results.append(
                    {"image_id": image_id, "category_id": CLASSES[rng.integers(0, 3)][0],
                     "bbox": [rng.uniform(0, 300), rng.uniform(0, 200), 30.0, 30.0],
                     "score": float(rng.uniform(0.0, 0.6))}
                )  # fmt: skip
    categories = [{"id": i, "name": n} for i, n in CLASSES]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def test_coco_evaluate_equals_pycocotools_on_the_same_files(tmp_path):
    gt, results = _ground_truth_and_results()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        reference_gt = COCO(str(tmp_path / "gt.json"))
        reference = COCOeval(reference_gt, reference_gt.loadRes(str(tmp_path / "dt.json")), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    ground_truth = evaluator.load_ground_truth(evaluator.read_instances(tmp_path / "gt.json"))
    stats, report = evaluator.coco_evaluate(ground_truth, results)
    np.testing.assert_array_equal([stats[k] for k in evaluator.STAT_NAMES], reference.stats)
    assert report.count("Average Precision") == 6 and report.count("Average Recall") == 6
    assert 0.2 < stats["AP50"] < 1.0


def test_per_class_table_lists_each_category_with_its_ap():
    gt, results = _ground_truth_and_results(seed=1)
    _, report = evaluator.coco_evaluate(evaluator.load_ground_truth(gt), results, per_class=True)
    lines = report.strip().splitlines()[-3:]
    assert [line.split()[0] for line in lines] == ["car", "train", "hydrant"]
    assert all(0.0 <= float(line.split()[-1]) <= 1.0 for line in lines)


def test_detections_to_coco_adds_one_pixel_in_legacy_mode_and_maps_channels_to_ids():
    boxes = np.array([[10.0, 20.0, 29.0, 59.0]])
    legacy = evaluator.detections_to_coco(4, boxes, np.array([0.9]), np.array([2]), CLASSES, True)
    modern = evaluator.detections_to_coco(4, boxes, np.array([0.9]), np.array([2]), CLASSES, False)
    assert legacy == [{"image_id": 4, "category_id": 11, "bbox": [10.0, 20.0, 20.0, 40.0],
                       "score": 0.9}]  # fmt: skip
    assert modern[0]["bbox"] == [10.0, 20.0, 19.0, 39.0]


def test_a_label_outside_the_class_list_is_an_error():
    with pytest.raises(ValueError, match="label channel"):
        evaluator.detections_to_coco(1, np.zeros((1, 4)), np.ones(1), np.array([3]), CLASSES, 0)


def test_ground_truth_from_index_keeps_coco_boxes_and_crowd_regions():
    index = SimpleNamespace(
        image_ids=np.array([3, 8]),
        original_hw=np.array([[50, 60], [70, 80]]),
        ann_offsets=np.array([0, 2, 2]),
        bbox_xywh=np.array([[1.0, 2.0, 10.0, 20.0], [5.0, 5.0, 3.0, 4.0]], np.float32),
        category_ids=np.array([7, 3]),
        is_crowd=np.array([False, True]),
        areas=np.array([200.0, 12.0], np.float32),
        ann_ids=np.array([41, 42]),
    )
    gt = evaluator.ground_truth_from_index(index, CLASSES)
    assert gt["images"] == [{"id": 3, "height": 50, "width": 60}, {"id": 8, "height": 70,
                            "width": 80}]  # fmt: skip
    assert [a["bbox"] for a in gt["annotations"]] == [[1.0, 2.0, 10.0, 20.0], [5.0, 5.0, 3.0, 4.0]]
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1]
    assert [a["id"] for a in gt["annotations"]] == [41, 42]
    evaluator.load_ground_truth(gt)  # pycocotools accepts it


def test_no_detections_give_zero_ap_and_unknown_images_are_refused():
    gt, _ = _ground_truth_and_results()
    ground_truth = evaluator.load_ground_truth(gt)
    stats, _ = evaluator.coco_evaluate(ground_truth, [])
    assert stats["AP"] == 0.0
    bad = [{"image_id": 999, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(ValueError, match="999"):
        evaluator.coco_evaluate(ground_truth, bad)


def test_missing_annotation_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluator.read_instances(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("content", "named"),
    [([], "not a list"), ({"images": [], "annotations": []}, "no 'categories' list")],
)
def test_an_annotations_file_that_is_no_ground_truth_is_named(tmp_path, content, named):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"instances.json: .*{named}"):
        evaluator.read_instances(path)


def test_evaluating_some_categories_equals_pycocotools_restricted_to_them(tmp_path):
    gt, results = _ground_truth_and_results(seed=3)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    some = [CLASSES[0][0], CLASSES[2][0]]
    with contextlib.redirect_stdout(io.StringIO()):
        reference_gt = COCO(str(tmp_path / "gt.json"))
        reference = COCOeval(reference_gt, reference_gt.loadRes(str(tmp_path / "dt.json")), "bbox")
        reference.params.catIds = some
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    ground_truth = evaluator.load_ground_truth(gt)
    stats, report = evaluator.coco_evaluate(
        ground_truth, results, category_ids=some, per_class=True
    )
    np.testing.assert_array_equal([stats[k] for k in evaluator.STAT_NAMES], reference.stats)
    every, _ = evaluator.coco_evaluate(ground_truth, results)
    assert every["AP"] != stats["AP"]
    assert "car" in report and "hydrant" in report and "train" not in report


def test_a_ground_truth_without_an_image_or_a_category_to_evaluate_is_named():
    gt, _ = _ground_truth_and_results()
    classes = [cid for cid, _ in CLASSES]
    evaluator.check_covers(gt, [5, 9], classes, "gt.json")  # a subset is fine
    with pytest.raises(ValueError, match=r"gt.json: the ground truth lacks 2 of the 3 .*ids 7, 8"):
        evaluator.check_covers(gt, [5, 7, 8], classes, "gt.json")
    with pytest.raises(ValueError, match="gt.json: the ground truth has no category 4 "):
        evaluator.check_covers(gt, [5], [*classes, 4], "gt.json")
