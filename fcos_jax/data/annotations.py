"""COCO instances JSON validation and the annotation index of a split. No TensorFlow here.

`load_coco_json` checks a JSON once, when a COCO-format folder is prepared: a missing required
field, a duplicate id, an annotation of an unknown image or category, a non-finite box, an
`area` that is not a finite number or an `iscrowd` that is not 0/1 is an error naming the file
and the id, and so is a JSON without categories; a missing `iscrowd`/`area` is filled in and
counted. Boxes reaching outside their image are counted here and clipped later
(`examples.clean_annotations`).

`SplitIndex` holds every example of a split without pixels: record position in the source, image
id, file name, original (height, width) and the raw COCO annotations (`[x, y, w, h]` in original
pixels), flat with per-image offsets. The epoch plan and the evaluation plan are built from it.
"""

import collections
import dataclasses
import logging
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fcos_jax.utils import jsonio

log = logging.getLogger(__name__)

_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox")
_CATEGORY_FIELDS = ("id", "name")
_INT32_MAX = 2**31 - 1  # image ids travel as int32 in batches
_INT63_MAX = 2**63 - 1  # COCO's crowd annotation ids exceed int32 (e.g. 900100259690)


@dataclasses.dataclass
class CocoJson:
    """A validated instances JSON.

    categories: [(category_id, name)] sorted by id.
    images: [{"id", "file_name", "height", "width"}] in file order.
    annotations: image id -> [{"id", "category_id", "bbox" (x, y, w, h), "iscrowd", "area"}].
    fixes: counted repairs ("iscrowd_missing", "area_missing", "boxes_outside_image").
    """

    path: Path
    categories: list[tuple[int, str]]
    images: list[dict[str, Any]]
    annotations: dict[int, list[dict[str, Any]]]
    fixes: collections.Counter


def _require(record: dict, fields: tuple[str, ...], where: str, path: Path) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: {where} is not an object: {record!r:.80}")
    missing = [f for f in fields if f not in record]
    if missing:
        ident = f" (id {record['id']})" if "id" in record else ""
        raise ValueError(f"{path}: {where}{ident} is missing required field(s) {missing}")


def _int_id(value: Any, what: str, path: Path, limit: int = _INT63_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{path}: {what} must be an integer, got {value!r}")
    if not 0 <= int(value) <= limit:
        raise ValueError(f"{path}: {what} {value} is outside 0..{limit}")
    return int(value)


def _annotation_field(ann: dict, field: str, where: str, path: Path) -> Any:
    """`ann[field]` checked: `area` a finite number, `iscrowd` 0, 1 or a bool; ValueError naming
    the file, the annotation and the value otherwise."""
    value = ann[field]
    if field == "area":
        good = isinstance(value, int | float) and not isinstance(value, bool)
        good = good and math.isfinite(value)
        expected = "a finite number"
    else:
        good = value in (0, 1) and isinstance(value, int | bool)
        expected = "0 or 1"
    if not good:
        raise ValueError(f"{path}: {where} has an invalid {field} {value!r} (expected {expected})")
    return value


def load_coco_json(path: str | Path) -> CocoJson:
    """Reads and validates a COCO instances JSON (module docstring). Raises ValueError naming the
    file and the offending id; FileNotFoundError when the file is missing."""
    path = Path(path)
    data = jsonio.read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with images/annotations/categories")
    for key in ("images", "categories"):
        if key not in data:
            raise ValueError(f"{path}: missing required top-level field {key!r}")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: {key} must be a list, got {type(data[key]).__name__}")
    if not data["categories"]:
        raise ValueError(
            f"{path}: categories is empty; a detection dataset needs at least one category "
            "(id, name) for its annotations"
        )
    fixes: collections.Counter = collections.Counter()

    categories: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        _require(cat, _CATEGORY_FIELDS, f"categories[{i}]", path)
        cid = _int_id(cat["id"], f"categories[{i}].id", path)
        if cid in categories:
            raise ValueError(f"{path}: duplicate category id {cid}")
        categories[cid] = str(cat["name"])

    images: list[dict[str, Any]] = []
    image_ids: set[int] = set()
    file_names: dict[str, int] = {}
    for i, img in enumerate(data["images"]):
        _require(img, _IMAGE_FIELDS, f"images[{i}]", path)
        iid = _int_id(img["id"], f"images[{i}].id", path, _INT32_MAX)
        if iid in image_ids:
            raise ValueError(f"{path}: duplicate image id {iid}")
        name = str(img["file_name"])
        if name in file_names:
            raise ValueError(
                f"{path}: image id {iid} has the same file_name {name!r} as image id "
                f"{file_names[name]}"
            )
        h, w = img["height"], img["width"]
        if not all(isinstance(v, int | np.integer) and v > 0 for v in (h, w)):
            raise ValueError(f"{path}: image id {iid} has invalid height/width {h!r}/{w!r}")
        image_ids.add(iid)
        file_names[name] = iid
        images.append({"id": iid, "file_name": name, "height": int(h), "width": int(w)})
    sizes = {img["id"]: (img["height"], img["width"]) for img in images}

    annotations: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    ann_ids: set[int] = set()
    outside_examples: list[int] = []
    for i, ann in enumerate(data.get("annotations", [])):
        _require(ann, _ANNOTATION_FIELDS, f"annotations[{i}]", path)
        aid = _int_id(ann["id"], f"annotations[{i}].id", path)
        if aid in ann_ids:
            raise ValueError(f"{path}: duplicate annotation id {aid}")
        ann_ids.add(aid)
        iid, cid = ann["image_id"], ann["category_id"]
        if iid not in sizes:
            raise ValueError(f"{path}: annotation id {aid} refers to unknown image id {iid!r}")
        if cid not in categories:
            raise ValueError(
                f"{path}: annotation id {aid} (image id {iid}) has unknown category_id {cid!r} "
                f"(categories: {sorted(categories)})"
            )
        where = f"annotation id {aid} (image id {iid})"
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, list | tuple)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
        ):
            raise ValueError(
                f"{path}: {where} has an invalid bbox {bbox!r} "
                "(expected 4 finite numbers [x, y, w, h])"
            )
        for field in ("iscrowd", "area"):
            if field in ann:
                _annotation_field(ann, field, where, path)
            else:
                fixes[f"{field}_missing"] += 1
        x, y, bw, bh = (float(v) for v in bbox)
        h, w = sizes[iid]
        if x < 0 or y < 0 or x + bw > w or y + bh > h:
            fixes["boxes_outside_image"] += 1
            if len(outside_examples) < 5:
                outside_examples.append(aid)
        annotations[iid].append(
            {
                "id": aid,
                "category_id": int(cid),
                "bbox": (x, y, bw, bh),
                "iscrowd": bool(ann.get("iscrowd", 0)),
                "area": float(ann.get("area", bw * bh)),
            }
        )
    if fixes["iscrowd_missing"] or fixes["area_missing"]:
        log.warning(
            "%s: %d annotations without iscrowd (taken as 0), %d without area (taken as w*h)",
            path,
            fixes["iscrowd_missing"],
            fixes["area_missing"],
        )
    if fixes["boxes_outside_image"]:
        log.warning(
            "%s: %d boxes reach outside their image (clipped when used), e.g. annotation ids %s",
            path,
            fixes["boxes_outside_image"],
            outside_examples,
        )
    return CocoJson(
        path=path,
        categories=sorted(categories.items()),
        images=images,
        annotations=dict(annotations),
        fixes=fixes,
    )


@dataclasses.dataclass
class SplitIndex:
    """Every example of a split, annotations only (module docstring). N examples, A annotations.

    positions: [N] int64 record position in the source; image_ids: [N] int64;
    filenames: [N] str; original_hw: [N, 2] int32 (height, width);
    ann_offsets: [N + 1] int64, the annotations of example i are rows ann_offsets[i]:[i + 1] of
    bbox_xywh [A, 4] float32 (COCO x, y, w, h, original pixels), category_ids [A] int64,
    is_crowd [A] bool, areas [A] float32, ann_ids [A] int64.
    """

    positions: np.ndarray
    image_ids: np.ndarray
    filenames: np.ndarray
    original_hw: np.ndarray
    ann_offsets: np.ndarray
    bbox_xywh: np.ndarray
    category_ids: np.ndarray
    is_crowd: np.ndarray
    areas: np.ndarray
    ann_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)

    def annotations(self, i: int) -> slice:
        """Rows of example i in the flat annotation arrays."""
        return slice(int(self.ann_offsets[i]), int(self.ann_offsets[i + 1]))

    @classmethod
    def from_examples(cls, examples: list[dict[str, Any]]) -> "SplitIndex":
        """From source example dicts (sources.py) without their `image`, in position order."""
        counts = [len(ex["category_id"]) for ex in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(counts)

        def cat(key: str, dtype, shape=()) -> np.ndarray:
            parts = [np.asarray(ex[key], dtype=dtype).reshape((-1, *shape)) for ex in examples]
            return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)

        return cls(
            positions=np.asarray([ex["position"] for ex in examples], dtype=np.int64),
            image_ids=np.asarray([ex["image_id"] for ex in examples], dtype=np.int64),
            filenames=np.asarray([ex["filename"] for ex in examples], dtype=str),
            original_hw=np.asarray([ex["original_hw"] for ex in examples], np.int32).reshape(-1, 2),
            ann_offsets=offsets,
            bbox_xywh=cat("bbox_xywh", np.float32, (4,)),
            category_ids=cat("category_id", np.int64),
            is_crowd=cat("is_crowd", bool),
            areas=cat("area", np.float32),
            ann_ids=cat("ann_id", np.int64),
        )

    def save(self, path: str | Path) -> None:
        """Writes the index to an .npz file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp-{uuid.uuid4().hex}.npz")  # unique per process
        np.savez(tmp, **dataclasses.asdict(self))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "SplitIndex":
        with np.load(path, allow_pickle=False) as f:
            return cls(**{field.name: f[field.name] for field in dataclasses.fields(cls)})

    def check_unique_ids(self, where: str) -> None:
        """Raises ValueError naming `where` and the id when an image id appears twice."""
        ids, counts = np.unique(self.image_ids, return_counts=True)
        if (counts > 1).any():
            dup = ids[counts > 1][:5].tolist()
            raise ValueError(f"{where}: duplicate image ids {dup}")
