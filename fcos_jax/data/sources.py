"""Example sources: TFDS `coco/2017`, prepared COCO-format folders and the built-in shapes dataset.

Every source is a random-access sequence of one split whose `read(position)` gives the same
example dict:
  image [] bytes (encoded file), image_id int, filename str, original_hw (h, w) int,
  bbox_xywh [A, 4] float32 (COCO x, y, w, h in original pixels), category_id [A] int64,
  is_crowd [A] bool, area [A] float32, ann_id [A] int64, position int.
`classes` is the dataset's own [(category_id, name)] list and `index()` the split's annotation
index (annotations.SplitIndex), built by reading every example once and cached as .npz under
`<data_dir>/fcos_jax_index/`.

COCO folders are prepared as `array_record` (TFDS random access); the shapes dataset is one more
such folder, written on first use (`shapes.write_once`). A `coco/2017` prepared in TFDS's
default `tfrecord` format is read by position through `tfrecord_access` (no conversion).
"""

import abc
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fcos_jax.config import classes as class_lists
from fcos_jax.data import annotations, coco_folder, shapes, tfrecord_access
from fcos_jax.parallel import sharding

log = logging.getLogger(__name__)

Example = dict[str, Any]
_INDEX_CHUNK = 256


def data_dir_of(config: Any) -> Path:
    """config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    path = config.data.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return Path(path).expanduser()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | np.bytes_) else str(value)


class Source(abc.ABC):
    """A random-access split (module docstring). Subclasses implement `_convert`."""

    def __init__(
        self,
        name: str,
        split: str,
        records: Any,
        class_list,
        cache_dir: Path | None,
        location: str,
    ):
        self.name = name
        self.location = location
        self.split = split
        self.classes = list(class_list)
        self._records = records
        self._cache_dir = cache_dir
        self._index: annotations.SplitIndex | None = None
        if len(records) == 0:
            raise ValueError(f"{name}: split {split!r} at {location} is empty")

    def __len__(self) -> int:
        return len(self._records)

    def __str__(self) -> str:
        return f"{self.name} {self.split} ({self.location})"

    @abc.abstractmethod
    def _convert(self, record: dict[str, Any], position: int) -> Example:
        """One stored record -> the example dict of every source."""

    def read(self, position: int) -> Example:
        """The example at `position` (0 <= position < len)."""
        return self._convert(self._records[int(position)], int(position))

    def read_many(self, positions) -> list[Example]:
        positions = [int(p) for p in positions]
        getitems = getattr(self._records, "__getitems__", None)
        raw = getitems(positions) if getitems else [self._records[p] for p in positions]
        return [self._convert(r, p) for r, p in zip(raw, positions, strict=True)]

    def _cache_path(self) -> Path | None:
        if self._cache_dir is None:
            return None
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.name}_{self.split}_{len(self)}")
        return self._cache_dir / f"{safe}.npz"

    def index(self) -> annotations.SplitIndex:
        """The annotation index of the split (module docstring), cached."""
        if self._index is not None:
            return self._index
        path = self._cache_path()
        if path is not None and path.is_file():
            self._index = annotations.SplitIndex.load(path)
            return self._index
        log.info("indexing %s %s (%d examples)", self.name, self.split, len(self))
        rows = []
        for start in range(0, len(self), _INDEX_CHUNK):
            for ex in self.read_many(range(start, min(start + _INDEX_CHUNK, len(self)))):
                ex.pop("image")
                rows.append(ex)
        index = annotations.SplitIndex.from_examples(rows)
        index.check_unique_ids(f"{self.name} {self.split}")
        if path is not None:
            index.save(path)
        self._index = index
        return index


class FolderSource(Source):
    """A split of a prepared COCO-format folder (coco_folder.py)."""

    def __init__(self, builder: coco_folder.FcosCocoFolder, split: str, cache_dir: Path | None):
        if split not in builder.info.splits:
            raise ValueError(
                f"{builder.data_dir}: no split {split!r} (have {sorted(builder.info.splits)})"
            )
        cats = [(int(i), str(n)) for i, n in builder.info.metadata["categories"]]
        records = builder.as_data_source(split)
        name = builder.builder_config.name
        json_path = builder.builder_config.splits.get(split, (str(builder.data_dir),))[0]
        super().__init__(name, split, records, cats, cache_dir, json_path)
        self.report = builder.info.metadata.get("report", {}).get(split, {})

    def _convert(self, record: dict[str, Any], position: int) -> Example:
        return {
            "image": record["image"],
            "image_id": int(record["image_id"]),
            "filename": _text(record["filename"]),
            "original_hw": tuple(int(v) for v in record["original_hw"]),
            "bbox_xywh": np.asarray(record["bbox_xywh"], np.float32).reshape(-1, 4),
            "category_id": np.asarray(record["category_id"], np.int64),
            "is_crowd": np.asarray(record["is_crowd"], bool),
            "area": np.asarray(record["area"], np.float32),
            "ann_id": np.asarray(record["ann_id"], np.int64),
            "position": position,
        }


class TfdsCocoSource(Source):
    """TFDS `coco/2017` (or `coco/2014`): labels 0..79 are COCO category ids in order; boxes are
    normalised (ymin, xmin, ymax, xmax) of the image read from the JPEG header."""

    def __init__(self, name: str, split: str, data_dir: Path, cache_dir: Path | None):
        decoders = {"image": tfds.decode.SkipDecoding()}
        try:
            records = tfds.data_source(
                name, split=split, data_dir=str(data_dir), decoders=decoders, download=False
            )
        except NotImplementedError:  # tfrecord shards (TFDS's default), or not prepared at all
            builder = tfds.builder(name, data_dir=str(data_dir))
            if not builder.is_prepared():
                raise FileNotFoundError(
                    f"{name} is not prepared under {data_dir} (data.data_dir); prepare it with "
                    f"`tfds build {name} --data_dir {data_dir}`"
                ) from None
            records = tfrecord_access.TfrecordDataSource(builder, split, decoders)
        cats = class_lists.coco_classes()
        self._category_ids = [cid for cid, _ in cats]
        super().__init__(name, split, records, cats, cache_dir, f"{data_dir}/{name}")

    def _convert(self, record: dict[str, Any], position: int) -> Example:
        data = record["image"]
        data = data if isinstance(data, bytes) else bytes(np.asarray(data).item())
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
        objects = record["objects"]
        norm = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)  # ymin, xmin, ymax, xmax
        xywh = np.stack(
            [
                norm[:, 1] * w,
                norm[:, 0] * h,
                (norm[:, 3] - norm[:, 1]) * w,
                (norm[:, 2] - norm[:, 0]) * h,
            ],
            axis=-1,
        ).astype(np.float32)
        labels = np.asarray(objects["label"], np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self._category_ids)):
            raise ValueError(
                f"{self.name} {self.split} image id {record['image/id']}: label outside 0..79"
            )
        return {
            "image": data,
            "image_id": int(record["image/id"]),
            "filename": _text(record["image/filename"]),
            "original_hw": (h, w),
            "bbox_xywh": xywh,
            "category_id": np.asarray(self._category_ids, np.int64)[labels],
            "is_crowd": np.asarray(objects["is_crowd"], bool).reshape(-1),
            "area": np.asarray(objects["area"], np.float32).reshape(-1),
            "ann_id": np.asarray(objects["id"], np.int64).reshape(-1),
            "position": position,
        }


def folder_of(config: Any, data_dir: Path) -> tuple[str, dict[str, tuple[Path, Path]]]:
    """(dataset name, {TFDS split: (instances JSON, image dir)}) of a COCO-format source: the
    configured folder (splits with an empty JSON are left out), or the shapes dataset, written
    under `data_dir` on first use."""
    d = config.data
    if d.source == "shapes":
        written = shapes.write_once(data_dir, **d.shapes)
        return "shapes", {d.train_split: written["train"], d.val_split: written["validation"]}
    f = d.folder
    splits = {}
    for split, json_path, image_dir in (
        (d.train_split, f.train_json, f.train_images),
        (d.val_split, f.val_json, f.val_images),
    ):
        if json_path:
            if not image_dir:
                raise ValueError(f"data.folder: {json_path} has no image directory")
            splits[split] = (Path(json_path).expanduser(), Path(image_dir).expanduser())
    if not splits:
        raise ValueError("data.folder: set train_json/train_images and/or val_json/val_images")
    return f.name or next(iter(splits.values()))[0].stem, splits


def open_source(config: Any, split: str) -> Source:
    """The source of `config.data.source` for one split (module docstring)."""
    d = config.data
    data_dir = data_dir_of(config)
    cache_dir = data_dir / "fcos_jax_index"
    if d.source == "coco_tfds":
        return TfdsCocoSource(d.tfds_name, split, data_dir, cache_dir)
    if d.source not in ("coco_folder", "shapes"):
        raise ValueError(
            f"data.source: expected coco_tfds, coco_folder or shapes, got {d.source!r}"
        )
    name, splits = folder_of(config, data_dir)
    builder = coco_folder.prepare_coco_folder(name, splits, data_dir)
    return FolderSource(builder, split, cache_dir)


def resolve_classes(config: Any, source: Source) -> list[tuple[int, str]]:
    """The class list of a run: config.data.classes by name, or the source's own ('dataset')."""
    if config.data.classes == "dataset":
        return list(source.classes)
    return class_lists.class_list(config.data.classes)


def open_split(config: Any, split: str) -> Source:
    """The source of one split, made ready to read first: the shapes dataset written, a
    COCO-format folder prepared as a TFDS dataset, the split's annotation index cached under
    `data_dir`. What is ready already is only checked.

    Several processes: every process opens its splits in the same order; one process per
    distinct `data_dir` prepares (process 0 on a shared file system, the first process of each
    host on local disks) and keeps the source it opened, while the others wait
    (`sharding.run_once_per_directory`) and then open the prepared split.
    """
    data_dir = data_dir_of(config)
    prepared: list[Source] = []  # the preparing process keeps what it opened

    def prepare() -> None:
        source = open_source(config, split)
        source.index()
        prepared.append(source)

    what = f"preparing the {config.data.source} data ({split}) under {data_dir}"
    sharding.run_once_per_directory(prepare, data_dir, what)
    return prepared[0] if prepared else open_source(config, split)
