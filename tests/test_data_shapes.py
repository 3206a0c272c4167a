"""The built-in shapes dataset: deterministic, valid COCO, boxes tight around the drawn shapes."""

import json

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from fcos_jax.config import classes
from fcos_jax.data import annotations, shapes


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return root, shapes.write_shapes_dataset(root, seed=3, num_train=40, num_val=12)


def _files(split_dir):
    return {p.name: p.read_bytes() for p in sorted(split_dir.iterdir())}


def test_same_seed_writes_identical_bytes_and_another_seed_does_not(written, tmp_path):
    root, splits = written
    again = shapes.write_shapes_dataset(tmp_path / "a", seed=3, num_train=40, num_val=12)
    other = shapes.write_shapes_dataset(tmp_path / "b", seed=4, num_train=40, num_val=12)
    for split in ("train", "validation"):
        assert splits[split][0].read_bytes() == again[split][0].read_bytes()
        assert _files(splits[split][1]) == _files(again[split][1])
        assert _files(splits[split][1]) != _files(other[split][1])
    assert splits["train"][0].read_bytes() != splits["validation"][0].read_bytes()


def test_written_json_is_valid_coco_with_every_class(written):
    _, splits = written
    for json_path, image_dir in splits.values():
        coco = COCO(str(json_path))  # pycocotools' own reader
        checked = annotations.load_coco_json(json_path)
        assert not checked.fixes
        assert coco.getCatIds() == [cid for cid, _ in classes.shapes_classes()]
        for img in coco.dataset["images"]:
            decoded = cv2.imread(str(image_dir / img["file_name"]))
            assert decoded.shape == (img["height"], img["width"], 3)
            assert 256 <= img["height"] <= 320 and 256 <= img["width"] <= 320
    train = COCO(str(splits["train"][0]))
    per_class = {cid: len(train.getAnnIds(catIds=[cid])) for cid in train.getCatIds()}
    assert all(n >= 5 for n in per_class.values()), per_class


def test_boxes_lie_in_the_image_and_span_the_size_range(written):
    _, splits = written
    content = json.loads(splits["train"][0].read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in content["images"]}
    sides = []
    for ann in content["annotations"]:
        x, y, w, h = ann["bbox"]
        ih, iw = sizes[ann["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= iw and y + h <= ih
        assert 0 < ann["area"] <= w * h
        sides.append(np.sqrt(w * h))
    assert min(sides) < 30 and max(sides) > 100


def test_fill_ratio_tells_the_classes_apart(written):
    """area / box area: rectangle 1, ellipse pi/4, triangle 1/2, cross 5/9 (thirds)."""
    _, splits = written
    content = json.loads(splits["train"][0].read_text())
    expected = {"rectangle": (0.97, 1.0), "ellipse": (0.7, 0.85), "triangle": (0.42, 0.6)}
    expected["cross"] = (0.45, 0.65)
    names = dict(classes.shapes_classes())
    for ann in content["annotations"]:
        low, high = expected[names[ann["category_id"]]]
        ratio = ann["area"] / (ann["bbox"][2] * ann["bbox"][3])
        assert low <= ratio <= high, (names[ann["category_id"]], ratio)


def _isolated(boxes, k):
    """True when no other box comes within 3 px of box k (COCO x, y, w, h)."""
    x, y, w, h = boxes[k]
    for j, (ox, oy, ow, oh) in enumerate(boxes):
        if j != k and ox < x + w + 3 and x < ox + ow + 3 and oy < y + h + 3 and y < oy + oh + 3:
            return False
    return True


def test_box_is_the_tight_extent_of_the_shape_color():
    """In rendered pixels (before JPEG), the shape's colour (read at the box centre) reaches every
    side of its box and hardly appears in the 2 px ring outside it."""
    checked = 0
    for seed in range(25):
        image, objects = shapes.render_image(np.random.default_rng(seed), 200, 240)
        image = image.astype(np.int32)
        boxes = [[int(v) for v in bbox] for _, bbox, _ in objects]
        for k, (x, y, w, h) in enumerate(boxes):
            if not _isolated(boxes, k):
                continue
            cx, cy = x + w // 2, y + h // 2
            color = np.median(image[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3), axis=0)
            close = np.abs(image - color).sum(-1) < 45
            inside = close[y : y + h, x : x + w]
            assert inside[0].any() and inside[-1].any(), (seed, boxes[k])
            assert inside[:, 0].any() and inside[:, -1].any(), (seed, boxes[k])
            ring = np.zeros(close.shape, bool)
            ring[max(y - 2, 0) : y + h + 2, max(x - 2, 0) : x + w + 2] = True
            ring[y : y + h, x : x + w] = False
            assert close[ring].mean() < 0.1, (seed, boxes[k])
            checked += 1
    assert checked >= 20


def test_bad_settings_are_errors_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="data.shapes: need 32 <= min_side <= max_side"):
        shapes.write_split(tmp_path, "train", 2, 0, 300, 200)
    with pytest.raises(ValueError, match="at least one image"):
        shapes.write_split(tmp_path, "train", 0, 0, 256, 320)
    with pytest.raises(ValueError, match="shapes split"):
        shapes.write_split(tmp_path, "test", 2, 0, 256, 320)
