"""A TFDS builder for any COCO-format folder (an instances JSON and an image directory per split).

`prepare_coco_folder(name, splits, data_dir)` validates each JSON (annotations.load_coco_json),
checks every image once and writes an `array_record` dataset (random access: the epoch plan reads
any example by position) under `data_dir/fcos_coco_folder/<name>-<digest>/`. The digest covers the
JSON contents and the image directories, so an edited JSON is prepared again and an unchanged one
is reused. Category ids and names come from the JSON and are kept in the dataset metadata.

Images are stored as their file bytes when they are 8-bit RGB or grey JPEG/PNG. Any other image
(CMYK, RGBA, palette, 16-bit, BMP/TIFF/WebP...) is decoded once with `cv2.imdecode(IMREAD_COLOR)`,
which is exactly what `predict` sees for that file, and stored as a lossless PNG of that decode.
A missing, corrupt or truncated image, or one whose size differs from the JSON, is skipped with a
warning naming the file; the counts and the skipped files are in `metadata["report"][split]`.

Example features (one per image, shuffled by TFDS):
  image [] bytes (encoded), image_id [] int64, filename [] text, original_hw [2] int32 (h, w),
  bbox_xywh [A, 4] float32 (COCO x, y, w, h, original pixels), category_id [A] int64,
  is_crowd [A] bool, area [A] float32, ann_id [A] int64.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from fcos_jax.data import annotations

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(), dtype=tf.string),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "filename": tfds.features.Text(),
            "original_hw": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "bbox_xywh": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "category_id": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "is_crowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            "area": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "ann_id": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        }
    )


@dataclasses.dataclass(frozen=True)
class CheckedImage:
    """The outcome of checking one image file: bytes to store, or why it is skipped."""

    data: bytes | None
    hw: tuple[int, int] | None
    converted: str = ""  # e.g. "JPEG/CMYK": what was converted to PNG
    problem: str = ""  # why the image is skipped
    exif_rotated: bool = False


def _png_bit_depth(data: bytes) -> int:
    return data[24] if len(data) > 24 and data[:8] == b"\x89PNG\r\n\x1a\n" else 8


def check_image(path: Path) -> CheckedImage:
    """Reads and fully decodes one image file (module docstring: stored as is, converted, or
    skipped). JPEGs are decoded at 1/8 scale (`PIL.Image.draft`), which still reads every byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return CheckedImage(None, None, problem=f"cannot read ({e.strerror or e})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if fmt == "JPEG" else 1
            if fmt == "JPEG":
                im.draft(mode, (max(1, w // 8), max(1, h // 8)))
            im.load()
    except Exception as e:  # PIL raises many types for corrupt/truncated files
        return CheckedImage(None, None, problem=f"corrupt or truncated ({type(e).__name__}: {e})")
    keep = fmt in ("JPEG", "PNG") and mode in ("RGB", "L") and _png_bit_depth(data) == 8
    rotated = orientation not in (1, None)
    if keep:
        return CheckedImage(data, (h, w), exif_rotated=rotated)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        return CheckedImage(None, None, problem=f"cv2 cannot decode this {fmt}/{mode} image")
    ok, png = cv2.imencode(".png", decoded)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 BGR image
        return CheckedImage(None, None, problem="cannot re-encode as PNG")
    return CheckedImage(
        png.tobytes(), decoded.shape[:2], converted=f"{fmt}/{mode}", exif_rotated=rotated
    )


class CocoFolderConfig(tfds.core.BuilderConfig):
    """One COCO-format folder: splits maps a TFDS split name to (instances JSON, image dir)."""

    def __init__(self, *, name: str, splits: dict[str, tuple[str, str]], **kwargs):
        super().__init__(name=name, **kwargs)
        self.splits = {k: (str(j), str(d)) for k, (j, d) in splits.items()}


class FcosCocoFolder(tfds.core.GeneratorBasedBuilder):
    """COCO-format folder -> TFDS (module docstring). Build through `prepare_coco_folder`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Image bytes, COCO boxes in original pixels, category ids."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="A COCO-format folder prepared by fcos_jax.data.coco_folder.",
            features=_features(),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        config: CocoFolderConfig = self.builder_config
        coco_by_split = {s: annotations.load_coco_json(j) for s, (j, _) in config.splits.items()}
        categories = {s: c.categories for s, c in coco_by_split.items()}
        first = next(iter(categories.values()))
        for split, cats in categories.items():
            if cats != first:
                raise ValueError(
                    f"{coco_by_split[split].path}: categories differ from the other splits' "
                    f"({cats} vs {first})"
                )
        self.info.metadata["categories"] = [[int(i), n] for i, n in first]
        self.info.metadata["report"] = {}
        return {
            split: self._generate_examples(split, coco_by_split[split], Path(image_dir))
            for split, (_, image_dir) in config.splits.items()
        }

    def _generate_examples(self, split: str, coco: annotations.CocoJson, image_dir: Path):
        if not coco.images:
            raise ValueError(f"{coco.path}: empty dataset (no images)")
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {image_dir} (for {coco.path})")
        counts: collections.Counter = collections.Counter(coco.fixes)
        skipped: list[list[str]] = []
        paths = [image_dir / img["file_name"] for img in coco.images]
        yielded = 0
        workers = min(8, 2 * (os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for img, path, checked in zip(
                coco.images, paths, pool.map(check_image, paths), strict=True
            ):
                name = f"{path} (image id {img['id']})"
                problem = checked.problem
                if not problem and checked.hw != (img["height"], img["width"]):
                    problem = (
                        f"decoded size {checked.hw} differs from the JSON's "
                        f"{(img['height'], img['width'])}"
                    )
                if problem:
                    counts["images_skipped"] += 1
                    skipped.append([str(path), problem])
                    log.warning("skipping %s: %s", name, problem)
                    continue
                if checked.converted:
                    counts["images_converted"] += 1
                    log.info("%s: %s converted to 8-bit BGR PNG", name, checked.converted)
                if checked.exif_rotated:
                    counts["images_exif_oriented"] += 1
                    log.warning(
                        "%s has an EXIF orientation: annotations are read in stored pixel order "
                        "(TFDS, PIL), but cv2.imdecode (predict, evaluation) rotates it",
                        name,
                    )
                anns = coco.annotations.get(img["id"], [])
                yielded += 1
                yield (
                    img["id"],
                    {
                        "image": checked.data,
                        "image_id": img["id"],
                        "filename": img["file_name"],
                        "original_hw": np.asarray(checked.hw, np.int32),
                        "bbox_xywh": np.asarray([a["bbox"] for a in anns], np.float32).reshape(
                            -1, 4
                        ),
                        "category_id": np.asarray([a["category_id"] for a in anns], np.int64),
                        "is_crowd": np.asarray([a["iscrowd"] for a in anns], np.bool_),
                        "area": np.asarray([a["area"] for a in anns], np.float32),
                        "ann_id": np.asarray([a["id"] for a in anns], np.int64),
                    },
                )
        if counts["images_skipped"]:
            log.warning(
                "%s: skipped %d of %d images (listed in the dataset metadata)",
                coco.path,
                counts["images_skipped"],
                len(coco.images),
            )
        if yielded == 0:
            raise ValueError(f"{coco.path}: empty dataset (every image in {image_dir} was skipped)")
        self.info.metadata["report"][split] = {"counts": dict(counts), "skipped": skipped}


def folder_digest(splits: dict[str, tuple[str | Path, str | Path]]) -> str:
    """12 hex digits over each split's name, JSON bytes and absolute image directory."""
    h = hashlib.sha256(FcosCocoFolder.VERSION.__str__().encode())
    for split in sorted(splits):
        json_path, image_dir = (Path(p) for p in splits[split])
        if not json_path.is_file():
            raise FileNotFoundError(f"annotation file not found: {json_path}")
        h.update(split.encode() + b"\0" + json_path.read_bytes())
        h.update(b"\0" + str(image_dir.resolve()).encode() + b"\0")
    return h.hexdigest()[:12]


def prepare_coco_folder(
    name: str, splits: dict[str, tuple[str | Path, str | Path]], data_dir: str | Path | None
) -> FcosCocoFolder:
    """Prepares (once) and returns the builder of a COCO-format folder (module docstring).

    name: a short dataset name ([A-Za-z0-9_.-]); splits: {TFDS split: (JSON, image dir)};
    data_dir: TFDS data_dir (None: the TFDS default)."""
    if not splits:
        raise ValueError("coco_folder: no splits given")
    if not name or not all(c.isalnum() or c in "_.-" for c in name):
        raise ValueError(f"data.folder.name: expected [A-Za-z0-9_.-]+, got {name!r}")
    config = CocoFolderConfig(
        name=f"{name}-{folder_digest(splits)}",
        splits={k: (str(j), str(d)) for k, (j, d) in splits.items()},
        description=f"COCO-format folder {name}",
    )
    builder = FcosCocoFolder(config=config, data_dir=data_dir and str(data_dir))
    if not builder.is_prepared():
        log.info("preparing COCO-format folder %s under %s", name, builder.data_dir)
        builder.download_and_prepare(file_format="array_record")
    return builder
