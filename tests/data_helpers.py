"""Helpers of the data tests: natural-looking images, tiny COCO-format folders, small configs."""

import io
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from fcos_jax.config import base as config_base


def natural_image(h: int, w: int, seed: int) -> np.ndarray:
    """[h, w, 3] uint8 RGB: smooth colour field, edges of filled shapes, fine texture."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(5):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(3, w // 3 + 4)), int(rng.integers(3, h // 3 + 4)))
        color = [float(c) for c in rng.uniform(0, 255, 3)]
        cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(image_rgb: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    """RGB uint8 array (or [H, W] grey) -> file bytes through PIL."""
    buf = io.BytesIO()
    Image.fromarray(image_rgb).save(buf, fmt, **kwargs)
    return buf.getvalue()


def write_coco_folder(
    root: Path,
    images: list[dict],
    categories: list[tuple[int, str]],
    split: str = "train",
    json_override: dict | None = None,
) -> tuple[Path, Path]:
    """Writes `root/{split}/` image files and `root/instances_{split}.json`.

    images: [{"id", "file_name", "data": bytes, "height", "width", "annotations": [{"id",
    "category_id", "bbox", optional "iscrowd", "area"}]}]. json_override replaces top-level keys.
    Returns (JSON path, image directory)."""
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    content = {"images": [], "annotations": [], "categories": []}
    for img in images:
        if img.get("data") is not None:
            (image_dir / img["file_name"]).write_bytes(img["data"])
        content["images"].append({k: img[k] for k in ("id", "file_name", "height", "width")})
        for ann in img.get("annotations", []):
            entry = {"image_id": img["id"], "iscrowd": 0, **ann}
            entry.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
            content["annotations"].append(entry)
    content["categories"] = [{"id": i, "name": n} for i, n in categories]
    content.update(json_override or {})
    json_path = root / f"instances_{split}.json"
    json_path.write_text(json.dumps(content))
    return json_path, image_dir


def random_dataset(
    root: Path,
    num_images: int,
    seed: int,
    split: str = "train",
    sizes=((96, 128), (128, 96), (80, 80), (64, 112)),
    categories=((3, "cat"), (7, "dog"), (9, "bird")),
) -> tuple[Path, Path]:
    """A small COCO folder of natural images, 1-4 random boxes each, float coordinates."""
    rng = np.random.default_rng(seed)
    images, ann_id = [], 1
    for i in range(num_images):
        h, w = sizes[i % len(sizes)]
        anns = []
        for _ in range(int(rng.integers(1, 5))):
            x, y = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
            bw, bh = rng.uniform(4, w - x), rng.uniform(4, h - y)
            cid = int(categories[int(rng.integers(len(categories)))][0])
            anns.append({"id": ann_id, "category_id": cid, "bbox": [x, y, bw, bh]})
            ann_id += 1
        data = encode(natural_image(h, w, seed * 1000 + i), "JPEG", quality=90)
        images.append(
            {
                "id": 100 + i,
                "file_name": f"img{i:03d}.jpg",
                "data": data,
                "height": h,
                "width": w,
                "annotations": anns,
            }
        )
    return write_coco_folder(root, images, list(categories), split)


def folder_config(data_dir: Path, train=None, val=None, **train_overrides):
    """Base config reading a COCO folder with its own class list; small scale and batch."""
    c = config_base.get_base_config()
    c.data.source = "coco_folder"
    c.data.classes = "dataset"
    c.data.data_dir = str(data_dir)
    c.data.folder.name = "testset"
    if train:
        c.data.folder.train_json, c.data.folder.train_images = (str(p) for p in train)
    if val:
        c.data.folder.val_json, c.data.folder.val_images = (str(p) for p in val)
    c.model.head.num_classes = 3
    c.preprocess.scale = (160, 128)
    c.augment.multiscale = ((160, 128),)
    c.train.batch_size = 4
    c.data.max_boxes = 8
    c.test.batch_size = 4
    c.data.min_image_side = 1
    c.data.num_parallel_calls = 2
    for key, value in train_overrides.items():
        setattr(c.train, key, value)
    return c


FOLDER_CLASSES = ((1, "rectangle"), (2, "ellipse"), (3, "triangle"), (4, "cross"))


def user_folder(root: Path, num_train: int, num_val: int, seed: int = 0) -> dict[str, Path]:
    """A COCO-format folder as users bring one: `root/{train,val}/` images and
    `root/annotations/{train,val}.json`, 96-128 px images of the shapes renderer, 4 classes
    (ids 1-4). Per split: every 3rd image a grayscale PNG, the others JPEGs, image 1 empty (no
    annotations), image 2 with a crowd box over its first object. Returns the four paths as
    {train_json, train_images, val_json, val_images}."""
    from fcos_jax.data import shapes

    paths = {}
    for split, count in (("train", num_train), ("val", num_val)):
        rng = np.random.default_rng([seed, len(split)])
        images = []
        for i in range(count):
            h, w = (int(v) for v in rng.integers(96, 129, 2))
            bgr, objects = shapes.render_image(rng, h, w)
            if i == 1:
                bgr, objects = np.full_like(bgr, 128), []
            anns = [
                {"id": 1000 * i + k + 1, "category_id": kind + 1, "bbox": box, "area": area}
                for k, (kind, box, area) in enumerate(objects)
            ]
            if i == 2 and anns:
                crowd = dict(anns[0], id=1000 * i + 999, iscrowd=1)
                crowd["bbox"] = [max(v - 2.0, 0.0) for v in crowd["bbox"][:2]] + [
                    v + 4.0 for v in crowd["bbox"][2:]
                ]
                anns.append(crowd)
            if i % 3 == 0:
                name, data = f"{i:04d}.png", encode(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), "PNG")
            else:
                name, data = f"{i:04d}.jpg", encode(bgr[..., ::-1].copy(), "JPEG", quality=92)
            images.append(
                {
                    "id": 1 + i,
                    "file_name": name,
                    "data": data,
                    "height": h,
                    "width": w,
                    "annotations": anns,
                }
            )
        json_path, image_dir = write_coco_folder(root, images, list(FOLDER_CLASSES), split)
        final_json = root / "annotations" / f"{split}.json"
        final_json.parent.mkdir(parents=True, exist_ok=True)
        json_path.rename(final_json)
        paths[f"{split}_json"], paths[f"{split}_images"] = final_json, image_dir
    return paths
