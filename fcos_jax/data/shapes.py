"""The built-in synthetic detection dataset, written as a COCO-format folder. No TensorFlow here.

Each image (sides drawn uniformly in [min_side, max_side] pixels) has a textured background
(smooth colour noise, faint stripes, pixel noise) and 0-6 filled shapes of the classes in
`classes.SHAPES_NAMES` (rectangle, ellipse, triangle in four orientations, cross). The class is
told by the shape only: colours are random (kept away from the background's local colour), sizes
log-uniform with sqrt(w*h) in [20, 160] px, aspect ratios in [1/2, 2]; later shapes may cover
earlier ones partly (a new box may cover at most 35% of an existing one and vice versa). A box is
the tight extent of the shape's drawn pixels (COCO [x, y, w, h]: w counts pixel columns), its
area the drawn pixel count.

Everything is a pure function of (seed, split, image number), so the same arguments write the same
bytes. Layout under `root`: `annotations/instances_{split}.json` and `{split}/{id:06d}.jpg`.
`write_once` keeps one such folder per setting under a data directory (the `shapes` source's).
"""

import concurrent.futures
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np

from fcos_jax.config import classes

log = logging.getLogger(__name__)

SPLITS = {"train": 0, "validation": 1}  # split name -> code mixed into each image's seed
MIN_SIZE, MAX_SIZE = 20.0, 160.0  # geometric-mean box side, pixels
MAX_OBJECTS = 6
EMPTY_PROBABILITY = 0.03  # share of images without any shape
JPEG_QUALITY = 92


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """[h, w, 3] float32 textured background, 0-255."""
    base = rng.uniform(40, 215, size=3)
    coarse = base + rng.normal(0, 35, size=(h // 40 + 2, w // 40 + 2, 3))
    image = cv2.resize(coarse.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    period, angle = rng.uniform(6, 30), rng.uniform(0, np.pi)
    phase = (np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(angle))) + (
        np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(angle))
    )
    stripes = np.sin(phase * np.float32(2 * np.pi / period)) * np.float32(rng.uniform(0, 14))
    image += stripes[..., None]
    return image


def _shape_mask(kind: int, rng: np.random.Generator, bw: int, bh: int) -> np.ndarray:
    """Filled shape `kind` (index into SHAPES_NAMES) drawn in a [bh, bw] box: bool mask."""
    x1, y1 = bw - 1, bh - 1
    mask = np.zeros((bh, bw), dtype=np.uint8)
    name = classes.SHAPES_NAMES[kind]
    if name == "rectangle":
        mask[:] = 1
    elif name == "ellipse":
        cv2.ellipse(mask, (bw // 2, bh // 2), (max(bw // 2, 1), max(bh // 2, 1)), 0, 0, 360, 1, -1)
    elif name == "triangle":
        apex = int(rng.integers(4))  # up, down, left, right
        cx, cy = bw // 2, bh // 2
        points = {
            0: [(cx, 0), (0, y1), (x1, y1)],
            1: [(cx, y1), (0, 0), (x1, 0)],
            2: [(0, cy), (x1, 0), (x1, y1)],
            3: [(x1, cy), (0, 0), (0, y1)],
        }[apex]
        cv2.fillPoly(mask, [np.asarray(points, dtype=np.int32)], 1)
    elif name == "cross":
        tw, th = max(bw // 3, 2), max(bh // 3, 2)
        cx0, cy0 = (bw - tw) // 2, (bh - th) // 2
        mask[:, cx0 : cx0 + tw] = 1
        mask[cy0 : cy0 + th, :] = 1
    else:  # pragma: no cover - SHAPES_NAMES and this function change together
        raise ValueError(f"no drawing rule for shape {name!r}")
    return mask.astype(bool)


def _overlaps_too_much(box: np.ndarray, placed: list[np.ndarray], limit: float = 0.35) -> bool:
    """True when box (x0, y0, x1, y1) covers more than `limit` of a placed box or vice versa."""
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0]) + 1
        ih = min(box[3], other[3]) - max(box[1], other[1]) + 1
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        area_a = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
        area_b = (other[2] - other[0] + 1) * (other[3] - other[1] + 1)
        if inter > limit * area_a or inter > limit * area_b:
            return True
    return False


def render_image(
    rng: np.random.Generator, h: int, w: int
) -> tuple[np.ndarray, list[tuple[int, list[float], int]]]:
    """One image: [h, w, 3] uint8 BGR and its objects [(class index, [x, y, w, h], area)]."""
    image = _background(rng, h, w)
    count = 0 if rng.random() < EMPTY_PROBABILITY else int(rng.integers(1, MAX_OBJECTS + 1))
    placed: list[np.ndarray] = []
    objects = []
    for _ in range(count):
        for _attempt in range(20):
            kind = int(rng.integers(len(classes.SHAPES_NAMES)))
            size = np.exp(rng.uniform(np.log(MIN_SIZE), np.log(MAX_SIZE)))
            aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
            bw = int(np.clip(round(size * np.sqrt(aspect)), 8, w - 2))
            bh = int(np.clip(round(size / np.sqrt(aspect)), 8, h - 2))
            x0 = int(rng.integers(0, w - bw + 1))
            y0 = int(rng.integers(0, h - bh + 1))
            box = np.array([x0, y0, x0 + bw - 1, y0 + bh - 1])
            if not _overlaps_too_much(box, placed):
                break
        else:
            continue
        mask = _shape_mask(kind, rng, bw, bh)
        region = image[y0 : y0 + bh, x0 : x0 + bw]
        local = region.reshape(-1, 3).mean(axis=0)
        color = rng.uniform(0, 255, size=3)
        for _attempt in range(10):
            if np.abs(color - local).sum() > 150:
                break
            color = rng.uniform(0, 255, size=3)
        region[mask] = color
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        tight = [
            float(x0 + cols[0]),
            float(y0 + rows[0]),
            float(cols[-1] - cols[0] + 1),
            float(rows[-1] - rows[0] + 1),
        ]
        placed.append(box)
        objects.append((kind, tight, int(mask.sum())))
    # Pixel noise, uniform in [0, 14).
    image += rng.random(size=image.shape, dtype=np.float32) * np.float32(14)
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8), objects


def write_split(
    root: str | Path, split: str, num_images: int, seed: int, min_side: int, max_side: int
) -> tuple[Path, Path]:
    """Writes one split; returns (instances JSON path, image directory)."""
    if split not in SPLITS:
        raise ValueError(f"shapes split: expected one of {sorted(SPLITS)}, got {split!r}")
    if not 32 <= min_side <= max_side:
        raise ValueError(
            f"data.shapes: need 32 <= min_side <= max_side, got {min_side}, {max_side}"
        )
    if num_images < 1:
        raise ValueError(f"data.shapes: a split needs at least one image, got {num_images}")
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)

    def write_image(number: int) -> tuple[dict, list]:
        rng = np.random.default_rng([seed, SPLITS[split], number])
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        image, objects = render_image(rng, h, w)
        name = f"{number + 1:06d}.jpg"
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:  # pragma: no cover - cv2 always encodes uint8 BGR
            raise RuntimeError(f"cv2 could not encode {name}")
        (image_dir / name).write_bytes(encoded.tobytes())
        return {"id": number + 1, "file_name": name, "height": h, "width": w}, objects

    # Images are independent (each has its own generator); NumPy and cv2 release the GIL.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(write_image, range(num_images)))
    images, annotations = [], []
    for image_info, objects in results:
        images.append(image_info)
        for kind, bbox, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_info["id"],
                    "category_id": kind + 1,
                    "bbox": bbox,
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": cid, "name": name} for cid, name in classes.shapes_classes()]
    json_path = root / "annotations" / f"instances_{split}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    content = {"images": images, "annotations": annotations, "categories": categories}
    json_path.write_text(json.dumps(content))
    return json_path, image_dir


def write_shapes_dataset(
    root: str | Path,
    *,
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 200,
    min_side: int = 256,
    max_side: int = 320,
) -> dict[str, tuple[Path, Path]]:
    """Writes train and validation splits under `root` (module docstring).

    Returns {split: (instances JSON path, image directory)}."""
    return {
        "train": write_split(root, "train", num_train, seed, min_side, max_side),
        "validation": write_split(root, "validation", num_val, seed, min_side, max_side),
    }


def dataset_dir(
    data_dir: str | Path, *, seed: int, num_train: int, num_val: int, min_side: int, max_side: int
) -> Path:
    """`<data_dir>/fcos_shapes/<settings>`: one folder per setting of the dataset."""
    tag = f"seed{seed}_n{num_train}-{num_val}_side{min_side}-{max_side}"
    return Path(data_dir) / "fcos_shapes" / tag


def write_once(
    data_dir: str | Path, *, seed: int, num_train: int, num_val: int, min_side: int, max_side: int
) -> dict[str, tuple[Path, Path]]:
    """The dataset of these settings in `dataset_dir`, written there on first use.

    Returns {split: (instances JSON path, image directory)}. It is written into a temporary
    folder and renamed into place, so no reader sees half a dataset; when two hosts write it at
    once, the first rename wins."""
    settings = dict(
        seed=seed, num_train=num_train, num_val=num_val, min_side=min_side, max_side=max_side
    )
    root = dataset_dir(data_dir, **settings)
    splits = {
        split: (root / "annotations" / f"instances_{split}.json", root / split) for split in SPLITS
    }
    if all(j.is_file() for j, _ in splits.values()):
        return splits
    tmp = root.with_name(f"{root.name}.tmp-{uuid.uuid4().hex}")  # unique across hosts
    log.info("writing the shapes dataset to %s", root)
    write_shapes_dataset(tmp, **settings)
    if root.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(root)
    return splits
