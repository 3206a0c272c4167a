"""Python prediction API: load a config and checkpoint once, then detect objects in images.

    detector = Detector.from_config("configs/fcos_r50_caffe_fpn_gn_1x.py", "ckpt/fcos_r50")
    for dets in detector(["a.jpg", rgb_array]):
        dets["boxes"], dets["scores"], dets["names"]  # boxes: [N, 4] xyxy, original pixels

Images go through `fcos_jax.data.preprocess` (the mode's reference transform, padded to a multiple
of 32, or with `data.eval_pad = 'canvas'` into the smallest canvas that holds them, as evaluation
pads: `fcos_jax.data.canvas`), images of equal padded shape are batched, each batch is split over
this process's devices, and the forward pass and the post-processing run as two jitted programs
per padded shape, each device on its own images (compiled once;
`test.compilation_cache_dir` or JAX's own `JAX_COMPILATION_CACHE_DIR` keeps compilations across
runs). Never imports TensorFlow or torch.
"""

import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from fcos_jax.checkpoint import store
from fcos_jax.config import check as config_check
from fcos_jax.config import load_config
from fcos_jax.config.classes import ClassList, class_list, from_meta, resolve_num_classes
from fcos_jax.data import canvas, preprocess
from fcos_jax.detection import postprocess
from fcos_jax.models import build_model
from fcos_jax.parallel import sharding
from fcos_jax.utils import compile_cache, compile_options

PyTree = Any
ImageSource = preprocess.ImageSource


@functools.lru_cache(maxsize=8)
def _programs(model_config_json: str, postprocess_options_json: str):
    """(model, forward, detect) per model config and post-processing options, shared by every
    Detector of that config so their compiled programs are reused.

    Both programs split the batch over this process's devices (`sharding.on_each_shard`): each
    device runs the model on its own images, and decodes and suppresses them, alone.
      forward(variables, image [B, H, W, 3]) -> per-level head outputs [B, ...]
      detect(head_outputs, image_hw, scale, original_hw) -> `postprocess.detect`'s dict
    """
    model = build_model(ml_collections.ConfigDict(json.loads(model_config_json)))
    options = json.loads(postprocess_options_json)
    options["strides"] = tuple(options["strides"])
    mesh = local_mesh()
    split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    jit = functools.partial(jax.jit, compiler_options=compile_options.compiler_options())

    def detect(head_outputs, image_hw, scale, original_hw):
        return postprocess.detect(head_outputs, image_hw, scale, original_hw=original_hw, **options)

    forward = jit(
        sharding.on_each_shard(model.apply, mesh, replicated_args=1),
        in_shardings=(whole, split),
        out_shardings=split,
    )
    detect = jit(sharding.on_each_shard(detect, mesh), in_shardings=split, out_shardings=split)
    return model, forward, detect


def local_mesh() -> jax.sharding.Mesh:
    """The mesh of this process's own devices: a Detector is per process, and its batches are
    split over the devices this process can feed."""
    return sharding.make_mesh(jax.local_devices())


def _as_image_list(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    """A single image (path, bytes or [H, W, C] array) or a sequence of them -> list."""
    if isinstance(images, str | Path | bytes | bytearray):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        return [images]
    return list(images)


def _image_name(image: ImageSource, index: int) -> str:
    return str(image) if isinstance(image, str | Path) else f"images[{index}]"


class Detector:
    """FCOS inference with fixed variables, config and class list.

    `detector(images)` -> one dict per image of NumPy arrays, sorted by score:
      boxes [N, 4] float32 xyxy in original-image pixels, scores [N] float32,
      labels [N] int32 class channel, category_ids [N] int64, names [N] str.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        variables: dict[str, PyTree],
        classes: ClassList | None = None,
    ):
        config_check.check(config)
        if classes is None:
            if config.data.classes == "dataset":
                raise ValueError(
                    "classes: data.classes='dataset' takes the class list from the data; pass the "
                    "checkpoint's (Detector.from_config reads it from the checkpoint's meta)"
                )
            classes = class_list(config.data.classes)
        self.classes = list(classes)
        # model.head.num_classes = 0 takes the class count; a fixed head must match it.
        config = resolve_num_classes(config, self.classes, "classes")
        self.config = config
        options = json.dumps(postprocess.options_from_config(config), sort_keys=True)
        self.model, self._forward, self._detect = _programs(
            config.model.to_json(sort_keys=True), options
        )
        self.mesh = local_mesh()
        # Replicated over this process's devices: the same compiled programs (and
        # persistent-cache entries) whatever the variables came from.
        self.variables = sharding.replicate(variables, self.mesh)
        self._category_ids = np.array([cid for cid, _ in self.classes], dtype=np.int64)
        self._names = np.array([name for _, name in self.classes], dtype=object)
        self.canvases = canvas.eval_canvases(config)  # None: pad to a multiple of size_divisor

    @classmethod
    def from_config(
        cls,
        config_or_path: ml_collections.ConfigDict | str | Path,
        checkpoint_path: str | Path,
        compilation_cache_dir: str | Path | None = None,
        *,
        allow_other_config_name: bool = False,
    ) -> "Detector":
        """Loads `config` (a ConfigDict or a `configs/*.py` path) and restores the checkpoint
        (a converted directory or a training workdir: its newest intact step; or one step
        directory), verified against its checksums. The class list comes from the checkpoint's
        meta. A checkpoint of another config name is refused unless `allow_other_config_name`
        (another architecture always is). compilation_cache_dir overrides
        `config.test.compilation_cache_dir`."""
        if isinstance(config_or_path, str | Path):
            config = load_config(config_or_path)
        else:
            config = config_or_path
        compile_cache.enable_from_config(config, compilation_cache_dir)
        variables, meta = store.restore_inference(
            checkpoint_path, config, allow_other_config_name=allow_other_config_name
        )
        classes = from_meta(meta, str(checkpoint_path)) if "classes" in meta else None
        return cls(config, variables, classes)

    # ----------------------------------------------------------------------------------------

    def preprocess(self, image: ImageSource, name: str = "image") -> dict[str, np.ndarray]:
        """One image -> `fcos_jax.data.preprocess.preprocess` output for this detector's config, its
        image zero padded into its canvas in canvas mode (`data.eval_pad = 'canvas'`): the
        landscape canvas of `preprocess.scale` whenever the resized image fits it, else the
        portrait one (`canvas.canvas_for`, the rule the exported artifacts' clients follow)."""
        item = preprocess.preprocess(image, self.config.preprocess, name=name)
        if self.canvases is not None:
            canvas_hw = canvas.canvas_for(item["image_hw"], self.canvases, name)
            item["image"] = canvas.pad_to(item["image"], canvas_hw, name)
        return item

    def check_size(self, original_hw: Sequence[int], name: str = "image") -> None:
        """The ValueError `preprocess` raises for an image of size original_hw = (h, w) (it
        resizes to nothing, or no canvas holds it), from the size alone, with no pixel work."""
        resized_hw = preprocess.checked_resized_size(original_hw, self.config.preprocess, name)
        if self.canvases is not None:
            canvas.canvas_for(resized_hw, self.canvases, name)

    def _split(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
        """[B, ...] host arrays -> arrays split over this process's devices; B is padded to a
        multiple of the device count with copies of the last row (cut off by the caller)."""
        devices = self.mesh.size
        extra = -len(arrays[0]) % devices
        padded = [np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) for a in arrays]
        return tuple(jax.device_put(padded, sharding.batch_sharding(self.mesh)))

    def _dispatch(
        self,
        image: np.ndarray,
        image_hw: np.ndarray,
        scale: np.ndarray,
        original_hw: np.ndarray,
    ) -> dict[str, jax.Array]:
        """Starts the detection of a preprocessed batch on this process's devices (split over
        them, each running model, decoding and NMS on its own images); returns at once with the
        detections still on the devices, padded rows included."""
        # Two compiled programs (forward, post-processing), so the forward program is shared
        # with `forward`; outputs stay split on the devices in between.
        image, image_hw, scale, original_hw = self._split(
            np.asarray(image, np.float32),
            np.asarray(image_hw, np.int32),
            np.asarray(scale, np.float32),
            np.asarray(original_hw, np.int32),
        )
        return self._detect(self._forward(self.variables, image), image_hw, scale, original_hw)

    def detect_batch(
        self,
        image: np.ndarray,
        image_hw: np.ndarray,
        scale: np.ndarray,
        original_hw: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Preprocessed batch -> fixed-size detections (see `postprocess.detect`).

        image: [B, Hp, Wp, 3] float32; image_hw, original_hw: [B, 2] int; scale: [B, 2] (y, x).
        Returns boxes [B, D, 4] (original pixels), scores [B, D], labels [B, D], valid [B, D].
        The batch is split over this process's devices."""
        out = jax.device_get(self._dispatch(image, image_hw, scale, original_hw))
        return {k: v[: len(image)] for k, v in out.items()}

    def detect_each(
        self,
        images: ImageSource | Sequence[ImageSource],
        batch_size: int | None = None,
        names: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(index into `images`, its detections as `__call__` gives them) for every image, batch
        after batch. Batch i + 1 is on the devices before batch i is handed over, so what the
        caller does with batch i's images (writing, drawing) runs while the devices work."""
        images = _as_image_list(images)
        if names is None:
            names = [_image_name(img, i) for i, img in enumerate(images)]
        elif len(names) != len(images):
            raise ValueError(f"names: {len(names)} names for {len(images)} images")
        batch_size = int(batch_size or self.config.test.get("batch_size", 1) or 1)
        batch_size = -(-batch_size // self.mesh.size) * self.mesh.size  # every device works
        inputs = [self.preprocess(img, name) for img, name in zip(images, names, strict=True)]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(inputs):
            by_shape.setdefault(item["image"].shape, []).append(i)
        pending = None  # (image indices, detections on the devices) of the previous batch
        for indices in by_shape.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                filled = chunk + [chunk[-1]] * (batch_size - len(chunk))
                stacked = {k: np.stack([inputs[i][k] for i in filled]) for k in inputs[chunk[0]]}
                dets = self._dispatch(
                    stacked["image"], stacked["image_hw"], stacked["scale"], stacked["original_hw"]
                )
                if pending is not None:
                    yield from self._per_image_of(*pending)
                pending = (chunk, dets)
        if pending is not None:
            yield from self._per_image_of(*pending)

    def __call__(
        self,
        images: ImageSource | Sequence[ImageSource],
        batch_size: int | None = None,
        names: Sequence[str] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Detections of each image (paths, encoded bytes or [H, W, 3] uint8 RGB arrays).

        Images with the same padded shape run together, `batch_size` at a time (default
        `config.test.batch_size`, rounded up to a multiple of this process's devices, which
        split each batch); a short last batch is filled with copies (one compiled program per
        padded shape). names: one per image for error messages (default: the path, or
        `images[i]`)."""
        images = _as_image_list(images)
        results: list[dict[str, np.ndarray] | None] = [None] * len(images)
        for i, dets in self.detect_each(images, batch_size, names):
            results[i] = dets
        return results

    def forward(self, image: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Raw head outputs of a preprocessed batch `image [B, Hp, Wp, 3]` float32: per level
        {cls_logits [B, H, W, K] logits, bbox_reg [B, H, W, 4] (l, t, r, b) distances in
        network-input pixels, centerness [B, H, W, 1] logits}, float32 NumPy."""
        rows = len(image)
        (image,) = self._split(np.asarray(image, np.float32))
        outputs = jax.device_get(self._forward(self.variables, image))
        return [
            {k: np.asarray(v[:rows], dtype=np.float32) for k, v in level.items()}
            for level in outputs
        ]

    def head_outputs(
        self, image: ImageSource, name: str | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Raw head outputs of one image (path, bytes or RGB array), batch of 1: see `forward`.
        name: for error messages (default: the path, or `images[0]`)."""
        (image,) = _as_image_list(image)
        item = self.preprocess(image, name or _image_name(image, 0))
        return self.forward(item["image"][None])

    def _per_image_of(
        self, indices: list[int], dets: dict[str, jax.Array]
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(image index, its detections) of the first len(indices) rows of a dispatched batch."""
        dets = jax.device_get(dets)
        for row, i in enumerate(indices):
            yield i, self._per_image(dets, row)

    def _per_image(self, dets: dict[str, np.ndarray], row: int) -> dict[str, np.ndarray]:
        valid = np.asarray(dets["valid"][row], dtype=bool)
        labels = np.asarray(dets["labels"][row][valid], dtype=np.int32)
        return {
            "boxes": np.asarray(dets["boxes"][row][valid], dtype=np.float32).reshape(-1, 4),
            "scores": np.asarray(dets["scores"][row][valid], dtype=np.float32),
            "labels": labels,
            "category_ids": self._category_ids[labels],
            "names": self._names[labels],
        }
