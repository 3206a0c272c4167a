"""Sources: TFDS coco/2017 (mocked), tfrecord random access, prepared folders and shapes."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_helpers import encode, folder_config, natural_image, random_dataset

from fcos_jax.config import base as config_base
from fcos_jax.config import classes
from fcos_jax.data import coco_folder, shapes, sources, tfrecord_access

# Three fake coco/2017 examples: (image id, h, w, [(label, is_crowd, (ymin, xmin, ymax, xmax))]).
FAKE_COCO = [
    (139, 48, 64, [(0, False, (0.25, 0.125, 0.75, 0.5)), (79, True, (0.0, 0.0, 1.0, 1.0))]),
    (285, 64, 40, [(11, False, (0.5, 0.1, 0.6, 0.9))]),
    (632, 32, 32, []),
]


def _fake_coco_source(builder, split, decoders=None, **kwargs):
    """What `tfds.data_source('coco/2017', decoders={'image': SkipDecoding()})` returns per
    example: JPEG bytes, ids, and `objects` lists (TFDS's NumPy decoding of a Sequence)."""
    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
    examples = []
    for image_id, h, w, objects in FAKE_COCO:
        examples.append(
            {
                "image": encode(natural_image(h, w, image_id), "JPEG"),
                "image/filename": f"{image_id:012d}.jpg".encode(),
                "image/id": image_id,
                "objects": {
                    "id": [image_id * 10 + k for k in range(len(objects))],
                    "area": [int(100 * (k + 1)) for k in range(len(objects))],
                    "bbox": [np.asarray(b, np.float32) for _, _, b in objects],
                    "label": [np.int64(label) for label, _, _ in objects],
                    "is_crowd": [np.bool_(c) for _, c, _ in objects],
                },
            }
        )
    features = builder.info.features
    assert set(examples[0]) == set(features.keys())
    assert set(examples[0]["objects"]) == set(features["objects"].feature.keys())
    return examples


def test_coco_2017_source_maps_labels_to_ids_and_normalized_boxes_to_pixels(tmp_path):
    with tfds.testing.mock_data(num_examples=3, as_data_source_fn=_fake_coco_source):
        source = sources.TfdsCocoSource("coco/2017", "train", tmp_path, tmp_path / "cache")
        assert source.classes == classes.coco_classes()
        first = source.read(0)
        assert first["image_id"] == 139 and first["filename"] == "000000000139.jpg"
        assert first["original_hw"] == (48, 64)
        # (ymin, xmin, ymax, xmax) normalised -> COCO x, y, w, h in pixels of the 48x64 image.
        np.testing.assert_allclose(first["bbox_xywh"], [[8, 12, 24, 24], [0, 0, 64, 48]])
        assert first["category_id"].tolist() == [1, 90]  # label 0 = person, 79 = toothbrush
        assert first["is_crowd"].tolist() == [False, True]
        assert source.read(1)["category_id"].tolist() == [13]  # label 11 = stop sign
        assert source.read(2)["bbox_xywh"].shape == (0, 4)
        index = source.index()
    assert index.image_ids.tolist() == [139, 285, 632]
    assert index.ann_offsets.tolist() == [0, 2, 3, 3]
    assert (tmp_path / "cache" / "coco_2017_train_3.npz").is_file()


def test_coco_2017_source_feeds_the_training_pipeline(tmp_path):
    from fcos_jax.data import pipeline

    config = config_base.get_base_config()
    config.data.data_dir = str(tmp_path)
    config.preprocess.scale = (128, 96)
    config.augment.multiscale = ((128, 96),)
    config.train.batch_size, config.data.min_image_side = 2, 1
    with tfds.testing.mock_data(num_examples=3, as_data_source_fn=_fake_coco_source):
        train = pipeline.TrainPipeline(config, process_index=0, process_count=1)
        batches = [next(train) for _ in range(train.steps_per_epoch)]
    # Image 632 has no box; 139's crowd box is dropped. 139 is landscape and 285 portrait, so each
    # fills its own canvas's batch of 2 by repetition.
    assert train.examples.counts["images_without_boxes_skipped"] == 1
    assert train.examples.counts["crowd_boxes_dropped"] == 1
    assert train.canvases == [(96, 128), (128, 96)] and len(batches) == 2
    by_id = {int(b["image_id"][0]): b for b in batches}
    assert sorted(by_id) == [139, 285]
    assert by_id[139]["image"].shape == (2, 96, 128, 3) and by_id[285]["image"].shape[1:3] == (
        128,
        96,
    )
    for image_id, channel in ((139, 0), (285, 11)):  # person, stop sign in the 80-class list
        b = by_id[image_id]
        assert (b["image_id"] == image_id).all()
        assert b["labels"][b["box_valid"]].tolist() == [channel, channel]


def test_missing_tfds_dataset_is_an_error_naming_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"coco/2017 is not prepared under {tmp_path}"):
        sources.TfdsCocoSource("coco/2017", "train", tmp_path, None)


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    json_path, image_dir = random_dataset(root / "src", 7, seed=4)
    splits = {"train": (str(json_path), str(image_dir))}
    out = {}
    for fmt in ("array_record", "tfrecord"):
        config = coco_folder.CocoFolderConfig(name="fmt-1", splits=splits)
        builder = coco_folder.FcosCocoFolder(config=config, data_dir=str(root / fmt))
        builder.download_and_prepare(file_format=fmt)
        out[fmt] = builder
    return out


def test_tfrecord_random_access_gives_tfds_order_and_decoding(both_formats):
    reference = both_formats["array_record"].as_data_source("train")
    decoders = {"image": tfds.decode.SkipDecoding()}
    records = tfrecord_access.TfrecordDataSource(both_formats["tfrecord"], "train", decoders)
    sequential = list(both_formats["tfrecord"].as_dataset(split="train").as_numpy_iterator())
    assert len(records) == len(reference) == len(sequential) == 7
    for i in [3, 0, 6, 1, 5, 2, 4]:  # any order
        got, want = records[i], reference[i]
        assert got["image_id"] == want["image_id"] == sequential[i]["image_id"]
        assert got["image"] == want["image"]
        np.testing.assert_array_equal(got["bbox_xywh"], want["bbox_xywh"])


def test_truncated_tfrecord_file_is_an_error_naming_it(both_formats, tmp_path):
    path = both_formats["tfrecord"].info.splits["train"].file_instructions[0].filename
    data = open(path, "rb").read()
    broken = tmp_path / "broken.tfrecord"
    broken.write_bytes(data[: len(data) - 30])
    with pytest.raises(ValueError, match="broken.tfrecord: truncated TFRecord"):
        tfrecord_access.record_offsets(broken)


def test_folder_source_reads_examples_and_caches_its_index(tmp_path):
    train = random_dataset(tmp_path / "src", 5, seed=5)
    config = folder_config(tmp_path / "tfds", train=train)
    source = sources.open_source(config, "train")
    assert source.classes == [(3, "cat"), (7, "dog"), (9, "bird")]
    assert sources.resolve_classes(config, source) == source.classes
    index = source.index()
    assert sorted(index.image_ids.tolist()) == [100, 101, 102, 103, 104]
    cached = list((tmp_path / "tfds" / "fcos_jax_index").glob("*.npz"))
    assert len(cached) == 1
    again = sources.open_source(config, "train").index()
    np.testing.assert_array_equal(again.bbox_xywh, index.bbox_xywh)
    with pytest.raises(ValueError, match="no split 'validation'"):
        sources.open_source(config, "validation")


def test_shapes_source_writes_once_and_reads_through_the_folder_builder(tmp_path):
    config = config_base.get_base_config()
    config.data.source, config.data.classes = "shapes", "shapes"
    config.data.data_dir = str(tmp_path)
    config.data.shapes.num_train, config.data.shapes.num_val = 6, 3
    source = sources.open_source(config, "validation")
    assert len(source) == 3
    assert sources.resolve_classes(config, source) == classes.shapes_classes() == source.classes
    root = shapes.dataset_dir(tmp_path, **config.data.shapes)
    json_path = root / "annotations" / "instances_train.json"
    stamp = json_path.stat().st_mtime_ns
    assert len(sources.open_source(config, "train")) == 6
    assert json_path.stat().st_mtime_ns == stamp


def test_bad_source_settings_name_the_field(tmp_path):
    config = config_base.get_base_config()
    config.data.source = "voc"
    with pytest.raises(ValueError, match="data.source"):
        sources.open_source(config, "train")
    config.data.source = "coco_folder"
    with pytest.raises(ValueError, match="data.folder: set train_json"):
        sources.open_source(config, "train")
    config.data.folder.train_json = str(tmp_path / "x.json")
    with pytest.raises(ValueError, match="has no image directory"):
        sources.open_source(config, "train")
