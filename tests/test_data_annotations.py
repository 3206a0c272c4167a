"""COCO JSON validation: each bad case is an error naming the file and id, or a counted fix."""

import json
import re

import numpy as np
import pytest

from fcos_jax.data import annotations

CATS = [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}]


def _image(i, w=100, h=80):
    return {"id": i, "file_name": f"{i}.jpg", "width": w, "height": h}


def _ann(i, image_id=1, cat=1, bbox=(10, 10, 20, 20), **extra):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(bbox), **extra}


def _write(tmp_path, images, anns, cats=CATS, drop_top=None):
    content = {"images": images, "annotations": anns, "categories": cats}
    if drop_top:
        del content[drop_top]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    return path


def test_valid_json_is_read_with_categories_sorted_and_annotations_grouped(tmp_path):
    anns = [_ann(1, iscrowd=0, area=400.0), _ann(2, image_id=2, cat=5, iscrowd=1, area=7.0)]
    path = _write(tmp_path, [_image(1), _image(2)], anns, cats=list(reversed(CATS)))
    coco = annotations.load_coco_json(path)
    assert coco.categories == [(1, "a"), (5, "b")]
    assert [img["id"] for img in coco.images] == [1, 2]
    assert coco.annotations[1][0]["bbox"] == (10.0, 10.0, 20.0, 20.0)
    assert coco.annotations[2][0]["iscrowd"] is True
    assert coco.annotations[2][0]["area"] == 7.0
    assert not coco.fixes


@pytest.mark.parametrize(
    ("where", "field"),
    [("images", "width"), ("images", "file_name"), ("annotations", "bbox"), ("categories", "name")],
)
def test_missing_field_is_an_error_naming_file_record_and_field(tmp_path, where, field):
    records = {
        "images": [_image(1)],
        "annotations": [_ann(7)],
        "categories": [dict(c) for c in CATS],
    }
    del records[where][0][field]
    path = _write(tmp_path, records["images"], records["annotations"], records["categories"])
    with pytest.raises(ValueError, match=rf"instances\.json: {where}\[0\].*missing.*{field}"):
        annotations.load_coco_json(path)


def test_missing_top_level_field_is_an_error(tmp_path):
    path = _write(tmp_path, [_image(1)], [], drop_top="categories")
    with pytest.raises(ValueError, match="instances.json: missing required top-level field"):
        annotations.load_coco_json(path)


@pytest.mark.parametrize(
    ("images", "anns", "cats", "message"),
    [
        ([_image(1), _image(1) | {"file_name": "x.jpg"}], [], CATS, "duplicate image id 1"),
        ([_image(1)], [_ann(4), _ann(4)], CATS, "duplicate annotation id 4"),
        ([_image(1)], [], CATS + [{"id": 5, "name": "c"}], "duplicate category id 5"),
        ([_image(1), _image(2) | {"file_name": "1.jpg"}], [], CATS, "same file_name"),
    ],
)
def test_duplicate_ids_are_errors_naming_the_id(tmp_path, images, anns, cats, message):
    path = _write(tmp_path, images, anns, cats)
    with pytest.raises(ValueError, match=message):
        annotations.load_coco_json(path)


def test_unknown_category_is_an_error_naming_annotation_and_image(tmp_path):
    path = _write(tmp_path, [_image(3)], [_ann(11, image_id=3, cat=2)])
    with pytest.raises(ValueError, match=r"annotation id 11 \(image id 3\).*unknown category_id 2"):
        annotations.load_coco_json(path)


def test_annotation_of_unknown_image_is_an_error(tmp_path):
    path = _write(tmp_path, [_image(1)], [_ann(12, image_id=99)])
    with pytest.raises(ValueError, match="annotation id 12 refers to unknown image id 99"):
        annotations.load_coco_json(path)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, "a", 4], [0, 0, float("nan"), 3]])
def test_malformed_bbox_is_an_error(tmp_path, bbox):
    content = {"images": [_image(1)], "annotations": [_ann(5)], "categories": CATS}
    content["annotations"][0]["bbox"] = bbox
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))  # NaN is written as a bare NaN token
    with pytest.raises(ValueError, match="annotation id 5 .*invalid bbox"):
        annotations.load_coco_json(path)


def test_bad_image_size_and_non_integer_id_are_errors(tmp_path):
    with pytest.raises(ValueError, match="image id 1 has invalid height/width"):
        annotations.load_coco_json(_write(tmp_path, [_image(1, w=0)], []))
    with pytest.raises(ValueError, match=r"images\[0\].id must be an integer"):
        annotations.load_coco_json(_write(tmp_path, [_image(1) | {"id": "1"}], []))


def test_missing_iscrowd_and_area_and_outside_boxes_are_counted_fixes(tmp_path):
    anns = [
        _ann(1, bbox=(90, 10, 20, 20)),  # reaches past x = 100
        _ann(2, bbox=(-3, 0, 10, 10), iscrowd=0),
        _ann(3, bbox=(5, 5, 8, 6), iscrowd=0, area=48.0),
    ]
    coco = annotations.load_coco_json(_write(tmp_path, [_image(1)], anns))
    assert coco.fixes["iscrowd_missing"] == 1
    assert coco.fixes["area_missing"] == 2
    assert coco.fixes["boxes_outside_image"] == 2
    first = coco.annotations[1][0]
    assert first["iscrowd"] is False and first["area"] == 400.0


def test_file_not_found_and_invalid_json_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        annotations.load_coco_json(tmp_path / "nothere.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        annotations.load_coco_json(bad)


def test_crowd_annotation_ids_above_int32_are_accepted(tmp_path):
    coco = annotations.load_coco_json(_write(tmp_path, [_image(1)], [_ann(900100259690)]))
    assert coco.annotations[1][0]["id"] == 900100259690


def _example(position, image_id, n):
    return {
        "position": position,
        "image_id": image_id,
        "filename": f"{image_id}.jpg",
        "original_hw": (10 + n, 20),
        "bbox_xywh": np.arange(4 * n, dtype=np.float32).reshape(n, 4),
        "category_id": np.full(n, 3),
        "is_crowd": np.zeros(n, bool),
        "area": np.ones(n),
        "ann_id": np.arange(n) + 10 * image_id,
    }


def test_split_index_offsets_and_npz_round_trip(tmp_path):
    index = annotations.SplitIndex.from_examples(
        [_example(0, 5, 2), _example(1, 6, 0), _example(2, 7, 3)]
    )
    assert len(index) == 3
    assert index.ann_offsets.tolist() == [0, 2, 2, 5]
    np.testing.assert_array_equal(
        index.bbox_xywh[index.annotations(2)], _example(2, 7, 3)["bbox_xywh"]
    )
    assert index.ann_ids[index.annotations(0)].tolist() == [50, 51]
    index.save(tmp_path / "index.npz")
    loaded = annotations.SplitIndex.load(tmp_path / "index.npz")
    for name in ("positions", "image_ids", "filenames", "original_hw", "ann_offsets", "bbox_xywh"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))


def test_split_index_rejects_duplicate_image_ids():
    index = annotations.SplitIndex.from_examples([_example(0, 5, 1), _example(1, 5, 1)])
    with pytest.raises(ValueError, match=r"myset: duplicate image ids \[5\]"):
        index.check_unique_ids("myset")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("area", "big", "a finite number"),
        ("area", None, "a finite number"),
        ("area", float("inf"), "a finite number"),
        ("area", True, "a finite number"),
        ("iscrowd", "no", "0 or 1"),
        ("iscrowd", 2, "0 or 1"),
    ],
)
def test_a_bad_annotation_field_names_the_file_annotation_and_value(
    tmp_path, field, value, expected
):
    path = _write(tmp_path, [_image(3)], [_ann(8, image_id=3, **{field: value})])
    message = rf"instances\.json: annotation id 8 \(image id 3\) has an invalid {field} "
    with pytest.raises(ValueError, match=message + re.escape(f"{value!r} (expected {expected})")):
        annotations.load_coco_json(path)


@pytest.mark.parametrize("field", ["bbox", "category_id"])
def test_bad_bbox_and_category_id_name_the_annotation(tmp_path, field):
    bad = {"bbox": [1, 2, "wide", 4], "category_id": "1"}[field]
    path = _write(tmp_path, [_image(3)], [_ann(9, image_id=3, **{field: bad})])
    with pytest.raises(ValueError, match=rf"annotation id 9 \(image id 3\).*{field}"):
        annotations.load_coco_json(path)


def test_a_json_without_categories_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"instances\.json: categories is empty"):
        annotations.load_coco_json(_write(tmp_path, [_image(1)], [], cats=[]))
    with pytest.raises(ValueError, match=r"instances\.json: categories must be a list, got dict"):
        annotations.load_coco_json(_write(tmp_path, [_image(1)], [], cats={"id": 1}))
