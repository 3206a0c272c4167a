"""The COCO-folder TFDS builder: round trip, reuse, and every bad-image case."""

import io
import json
import logging

import cv2
import numpy as np
import pytest
import tensorflow as tf
from data_helpers import encode, natural_image, random_dataset, write_coco_folder
from PIL import Image

from fcos_jax.data import coco_folder, transforms

CATS = [(1, "thing")]


def _records(builder, split="train"):
    source = builder.as_data_source(split)
    return {int(ex["image_id"]): ex for ex in (source[i] for i in range(len(source)))}


def test_round_trip_keeps_bytes_ids_and_annotations_of_the_json(tmp_path):
    json_path, image_dir = random_dataset(tmp_path / "src", 6, seed=1)
    builder = coco_folder.prepare_coco_folder(
        "rt", {"train": (json_path, image_dir)}, tmp_path / "tfds"
    )
    content = json.loads(json_path.read_text())
    records = _records(builder)
    assert sorted(records) == sorted(img["id"] for img in content["images"])
    assert builder.info.metadata["categories"] == [[3, "cat"], [7, "dog"], [9, "bird"]]
    for img in content["images"]:
        ex = records[img["id"]]
        assert ex["image"] == (image_dir / img["file_name"]).read_bytes()
        assert ex["filename"].decode() == img["file_name"]
        assert ex["original_hw"].tolist() == [img["height"], img["width"]]
        anns = [a for a in content["annotations"] if a["image_id"] == img["id"]]
        np.testing.assert_array_equal(
            ex["bbox_xywh"], np.asarray([a["bbox"] for a in anns], np.float32)
        )
        assert ex["category_id"].tolist() == [a["category_id"] for a in anns]
        assert ex["ann_id"].tolist() == [a["id"] for a in anns]
        assert not ex["is_crowd"].any()


def test_prepared_folder_is_reused_and_an_edited_json_is_prepared_again(tmp_path, monkeypatch):
    json_path, image_dir = random_dataset(tmp_path / "src", 2, seed=2)
    splits = {"train": (json_path, image_dir)}
    first = coco_folder.prepare_coco_folder("reuse", splits, tmp_path / "tfds")

    def fail(*args, **kwargs):
        raise AssertionError("prepared again")

    with monkeypatch.context() as m:
        m.setattr(coco_folder.FcosCocoFolder, "download_and_prepare", fail)
        again = coco_folder.prepare_coco_folder("reuse", splits, tmp_path / "tfds")
    assert again.data_dir == first.data_dir
    content = json.loads(json_path.read_text())
    content["annotations"][0]["bbox"][0] += 1.0
    json_path.write_text(json.dumps(content))
    edited = coco_folder.prepare_coco_folder("reuse", splits, tmp_path / "tfds")
    assert edited.data_dir != first.data_dir
    assert (
        _records(edited)[content["annotations"][0]["image_id"]]["bbox_xywh"][0, 0]
        == (content["annotations"][0]["bbox"][0])
    )


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """One image of each awkward kind; returns (builder, {name: original bytes})."""
    root = tmp_path_factory.mktemp("bad")
    rgb = natural_image(40, 56, 7)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=90)
    cmyk = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buf, "PNG")
    palette = buf.getvalue()
    good = encode(rgb, "JPEG", quality=90)
    files = {
        "good.jpg": good,
        "grey.jpg": encode(rgb[..., 0], "JPEG", quality=90),
        "cmyk.jpg": cmyk,
        "rgba.png": encode(np.dstack([rgb, rgb[..., :1]]), "PNG"),
        "grey16.png": cv2.imencode(".png", rgb[..., 1].astype(np.uint16) * 257)[1].tobytes(),
        "rgb16.png": cv2.imencode(".png", rgb.astype(np.uint16) * 250)[1].tobytes(),
        "palette.png": palette,
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "truncated.jpg": good[: len(good) // 2],
        "wrong_size.jpg": encode(natural_image(30, 56, 8), "JPEG"),
        "missing.jpg": None,
    }
    images = [
        {
            "id": i + 1,
            "file_name": name,
            "data": data,
            "height": 40,
            "width": 56,
            "annotations": [{"id": i + 1, "category_id": 1, "bbox": [1, 2, 10, 12]}],
        }
        for i, (name, data) in enumerate(files.items())
    ]
    json_path, image_dir = write_coco_folder(root, images, CATS)
    builder = coco_folder.prepare_coco_folder(
        "bad", {"train": (json_path, image_dir)}, root / "tfds"
    )
    return builder, files


def test_corrupt_truncated_missing_and_mis_sized_images_are_skipped_and_named(bad_folder):
    builder, _ = bad_folder
    report = builder.info.metadata["report"]["train"]
    skipped = {path.rsplit("/", 1)[-1]: why for path, why in report["skipped"]}
    assert set(skipped) == {"corrupt.jpg", "truncated.jpg", "wrong_size.jpg", "missing.jpg"}
    assert "truncated" in skipped["truncated.jpg"]
    assert "differs from the JSON" in skipped["wrong_size.jpg"]
    assert report["counts"]["images_skipped"] == 4
    names = {ex["filename"].decode() for ex in _records(builder).values()}
    assert "good.jpg" in names and "truncated.jpg" not in names


def test_skipped_images_are_logged_with_their_path(tmp_path, caplog):
    good = encode(natural_image(20, 20, 1), "JPEG")
    images = [
        {"id": 1, "file_name": "a.jpg", "data": good, "height": 20, "width": 20},
        {"id": 2, "file_name": "b.jpg", "data": good[:100], "height": 20, "width": 20},
    ]
    json_path, image_dir = write_coco_folder(tmp_path, images, CATS)
    with caplog.at_level(logging.WARNING, logger="fcos_jax.data.coco_folder"):
        coco_folder.prepare_coco_folder("log", {"train": (json_path, image_dir)}, tmp_path / "t")
    assert any("b.jpg (image id 2)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "name",
    ["good.jpg", "grey.jpg", "cmyk.jpg", "rgba.png", "grey16.png", "rgb16.png", "palette.png"],
)
def test_stored_image_decodes_to_what_cv2_reads_from_the_file(bad_folder, name):
    """Grey, CMYK, RGBA, palette and 16-bit files become 8-bit BGR exactly as predict's cv2 sees
    them, both through cv2 and through the training decoder (TF)."""
    builder, files = bad_folder
    stored = {ex["filename"].decode(): ex["image"] for ex in _records(builder).values()}[name]
    expected = cv2.imdecode(np.frombuffer(files[name], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(stored, np.uint8), 1), expected)
    decoded_tf = transforms.decode_image(tf.constant(stored)).numpy()
    np.testing.assert_array_equal(decoded_tf[..., ::-1], expected)


def test_images_needing_conversion_are_counted(bad_folder):
    builder, _ = bad_folder
    counts = builder.info.metadata["report"]["train"]["counts"]
    assert counts["images_converted"] == 5  # cmyk, rgba, grey16, rgb16, palette


def test_empty_dataset_is_an_error_naming_the_json(tmp_path):
    json_path, image_dir = write_coco_folder(tmp_path, [], CATS)
    with pytest.raises(Exception, match=f"{json_path}: empty dataset"):
        coco_folder.prepare_coco_folder("empty", {"train": (json_path, image_dir)}, tmp_path / "t")


def test_dataset_whose_images_are_all_unreadable_is_an_error(tmp_path):
    images = [{"id": 1, "file_name": "x.jpg", "data": b"junk", "height": 5, "width": 5}]
    json_path, image_dir = write_coco_folder(tmp_path, images, CATS)
    with pytest.raises(Exception, match="empty dataset.*every image"):
        coco_folder.prepare_coco_folder("junk", {"train": (json_path, image_dir)}, tmp_path / "t")


def test_missing_image_directory_and_json_name_the_path(tmp_path):
    images = [{"id": 1, "file_name": "x.jpg", "data": None, "height": 5, "width": 5}]
    json_path, _ = write_coco_folder(tmp_path, images, CATS)
    with pytest.raises(Exception, match="image directory not found: .*nowhere"):
        coco_folder.prepare_coco_folder(
            "nodir", {"train": (json_path, tmp_path / "nowhere")}, tmp_path / "t"
        )
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*none.json"):
        coco_folder.prepare_coco_folder(
            "nojson", {"train": (tmp_path / "none.json", tmp_path)}, tmp_path / "t"
        )


def test_bad_dataset_name_is_an_error():
    with pytest.raises(ValueError, match="data.folder.name"):
        coco_folder.prepare_coco_folder("a b", {"train": ("x", "y")}, None)
