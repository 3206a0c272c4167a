"""The tf.data input pipelines: training (epoch plan) and evaluation (predict's preprocessing).

Training (the epoch plan, docs/architecture.md#conventions):
  1. Index time (`prepare_examples`): crowd boxes dropped, boxes clipped, boxes with w or h < 1
     dropped, at most `train.max_boxes` kept (the largest); images left without a box or with a
     side < `data.min_image_side` are skipped and counted. Steps per epoch are then known.
  2. Every image gets the smallest canvas (H, W) that holds it at the largest training scale
     (`data.canvases`, default: landscape and portrait of the largest scale, /32), as mmdet's
     group sampler groups by aspect. Nothing recompiles after each canvas's first batch.
  3. `plan_epoch(seed, epoch)`: each canvas group is shuffled and filled up to whole global batches
     by repeating its own images, the batches are shuffled, and every slot draws its scale
     (`train.multiscale`, 'value' or 'range' mode) and flip (`train.flip_ratio`). The plan depends
     on (seed, epoch) and the index only, so every process computes the same one and loads its
     slice `[p * L, (p + 1) * L)` of each global batch (L = batch_size / process_count): all
     processes feed the same canvas at every step, and the global batch does not depend on the
     number of processes.
  4. The iterator state is {seed, epoch, step_in_epoch, ...}: a small JSON-able dict. A pipeline
     built with that state yields exactly the batch the saved run would have yielded next.

Evaluation: every image of the split, in index order, grouped by padded shape (the next multiple
of `size_divisor`, as `predict` pads; `data.eval_pad='canvas'` pads to landscape and portrait
canvases of the test scale instead). Each image goes through `fcos_jax.preprocess.preprocess`, the
very function `predict` calls (cv2 decode and resize for the mmdet modes), so the pixels are
identical. The last batch of
a shape is filled with dummies marked `example_valid=False`: no image is dropped or repeated.

Batch dict (this process's slice, NumPy; `sharding.to_global` makes global arrays of it):
  image [L, H, W, 3] float32, boxes [L, M, 4] float32 xyxy in network-input pixels,
  labels [L, M] int32 class channel, box_valid [L, M] bool, image_id [L] int32,
  image_hw [L, 2] int32 (resized, unpadded), scale [L, 2] float32 (y, x; original pixels =
  input pixels / scale); evaluation adds original_hw [L, 2] int32 and example_valid [L] bool.
"""

import atexit
import collections
import dataclasses
import gc
import logging
import math
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from fcos_jax import classes as class_lists
from fcos_jax import preprocess
from fcos_jax.canvas import (
    assign_canvases,
    check_canvases,
    default_canvases,
    eval_canvases,
    round_up,
)
from fcos_jax.data import annotations, epoch_plan, examples, geometry, sources, transforms

log = logging.getLogger(__name__)

SINGLE_SCALE_MODES = ("mmdet_v1",)  # post-processing modes that divide by one scale factor


# --------------------------------------------------------------------------------------------
# Index time


@dataclasses.dataclass
class Examples:
    """Usable examples of a split (N), ground truth in original pixels.

    rows: [N] int64 row in the SplitIndex; positions [N] record position in the source;
    image_ids [N] int64; filenames [N] str; original_hw [N, 2] int32; box_offsets [N + 1]:
    example i owns rows box_offsets[i]:[i + 1] of boxes [B, 4] float32 xyxy and labels [B] int32.
    counts: what was dropped or skipped (module docstring).
    """

    rows: np.ndarray
    positions: np.ndarray
    image_ids: np.ndarray
    filenames: np.ndarray
    original_hw: np.ndarray
    box_offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    counts: dict[str, int]

    def __len__(self) -> int:
        return len(self.rows)

    def ground_truth(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """boxes [n, 4] float32 xyxy original pixels, labels [n] int32 of example i."""
        rows = slice(int(self.box_offsets[i]), int(self.box_offsets[i + 1]))
        return self.boxes[rows], self.labels[rows]


def prepare_examples(
    index: annotations.SplitIndex,
    class_list: Sequence[tuple[int, str]],
    *,
    legacy_plus_one: bool,
    max_boxes: int,
    training: bool,
    min_image_side: int = 0,
    where: str = "dataset",
) -> Examples:
    """Cleans every example's boxes (examples.clean_annotations) and keeps at most `max_boxes`
    (the largest); when `training`, drops images without a box or with a side < min_image_side.
    Raises ValueError naming `where` when nothing is left."""
    if max_boxes < 1:
        raise ValueError(f"train.max_boxes: expected >= 1, got {max_boxes}")
    channel_of = examples.channel_lookup(class_list)
    counts: collections.Counter = collections.Counter()
    kept_rows, kept_boxes, kept_labels = [], [], []
    for i in range(len(index)):
        rows = index.annotations(i)
        hw = index.original_hw[i]
        what = f"{where}: image id {int(index.image_ids[i])} ({index.filenames[i]})"
        boxes, labels = examples.clean_annotations(
            index.bbox_xywh[rows],
            index.category_ids[rows],
            index.is_crowd[rows],
            hw,
            channel_of,
            legacy_plus_one,
            counts,
            what,
        )
        if training and min(hw) < min_image_side:
            counts["small_images_skipped"] += 1
            continue
        if training and len(boxes) == 0:
            counts["images_without_boxes_skipped"] += 1
            continue
        if len(boxes) > max_boxes:
            counts["images_over_max_boxes"] += 1
            counts["boxes_over_max_dropped"] += len(boxes) - max_boxes
            boxes, labels = examples.keep_largest(boxes, labels, max_boxes, legacy_plus_one)
        kept_rows.append(i)
        kept_boxes.append(boxes)
        kept_labels.append(labels)
    if not kept_rows:
        raise ValueError(f"{where}: no usable images ({dict(counts)})")
    if counts["images_over_max_boxes"]:
        log.warning(
            "%s: %d images have more than max_boxes=%d boxes; %d smallest boxes dropped",
            where,
            counts["images_over_max_boxes"],
            max_boxes,
            counts["boxes_over_max_dropped"],
        )
    skipped = counts["images_without_boxes_skipped"] + counts["small_images_skipped"]
    if skipped:
        log.info("%s: %d images skipped for training (%s)", where, skipped, dict(counts))
    rows = np.asarray(kept_rows, np.int64)
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in kept_boxes])
    return Examples(
        rows=rows,
        positions=index.positions[rows],
        image_ids=index.image_ids[rows],
        filenames=index.filenames[rows],
        original_hw=index.original_hw[rows],
        box_offsets=offsets,
        boxes=np.concatenate(kept_boxes).reshape(-1, 4).astype(np.float32),
        labels=np.concatenate(kept_labels).astype(np.int32),
        counts=dict(counts),
    )


# --------------------------------------------------------------------------------------------
# Canvases


def largest_resized_hw(
    original_hw: np.ndarray, scales: Sequence[tuple[int, int]], mode: str, resize_mode: str
) -> np.ndarray:
    """[N, 2] int: per image, the largest resized (h, w) any training scale can give."""
    bound = epoch_plan.largest_scales(scales, mode)
    out = np.zeros_like(original_hw, dtype=np.int64)
    for i, (h, w) in enumerate(original_hw.tolist()):
        for scale in bound:
            nh, nw, _ = preprocess.resized_size(h, w, scale, resize_mode)
            out[i] = np.maximum(out[i], (nh, nw))
    return out


# --------------------------------------------------------------------------------------------
# The epoch plan


@dataclasses.dataclass
class EpochPlan:
    """Global batches of one epoch (S steps of B slots).

    examples: [S, B] int64 into Examples; canvas: [S] int index into the canvases;
    scales: [S, B, 2] int64 (long, short) training scale; flips: [S, B] bool."""

    examples: np.ndarray
    canvas: np.ndarray
    scales: np.ndarray
    flips: np.ndarray


def steps_per_epoch(canvas_of: np.ndarray, num_canvases: int, batch_size: int) -> int:
    sizes = np.bincount(canvas_of, minlength=num_canvases)
    return int(sum(math.ceil(n / batch_size) for n in sizes))


def plan_epoch(
    canvas_of: np.ndarray,
    num_canvases: int,
    batch_size: int,
    seed: int,
    epoch: int,
    scales: Sequence[tuple[int, int]],
    multiscale_mode: str,
    flip_ratio: float,
) -> EpochPlan:
    """The epoch plan (module docstring, 3): a pure function of its arguments.

    canvas_of: [N] canvas index of every example; batch_size: the global batch size."""
    rng = np.random.default_rng([seed, epoch])
    batches, batch_canvas = [], []
    for c in range(num_canvases):
        members = np.flatnonzero(canvas_of == c)
        if len(members) == 0:
            continue
        order = rng.permutation(members)
        filled = np.resize(order, math.ceil(len(order) / batch_size) * batch_size)
        chunk = filled.reshape(-1, batch_size)
        batches.append(chunk)
        batch_canvas.append(np.full(len(chunk), c, np.int64))
    examples = np.concatenate(batches)
    canvas = np.concatenate(batch_canvas)
    shuffle = rng.permutation(len(examples))
    examples, canvas = examples[shuffle], canvas[shuffle]
    n_slots = examples.size
    sampled = epoch_plan.sample_scales(rng, n_slots, scales, multiscale_mode)
    flips = rng.random(n_slots) < flip_ratio
    return EpochPlan(
        examples=examples.astype(np.int64),
        canvas=canvas,
        scales=sampled.reshape(*examples.shape, 2),
        flips=flips.reshape(examples.shape),
    )


# --------------------------------------------------------------------------------------------
# Shared pieces


def _process_slice(
    batch_size: int, process_index: int | None, process_count: int | None, field: str
) -> tuple[int, int, int]:
    """(process_index, process_count, local batch size); defaults from jax."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"{field}: the global batch size {batch_size} must be a positive multiple of the "
            f"{process_count} processes"
        )
    return process_index, process_count, batch_size // process_count


def _options(config: Any) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return options


def _parallel_calls(config: Any) -> int:
    n = int(config.data.num_parallel_calls)
    return tf.data.AUTOTUNE if n < 0 else max(n, 1)


class _Batches:
    """A tf.data iterator giving NumPy batches. TensorFlow aborts or hangs at interpreter exit when
    an iterator over a Python generator is still alive, so every open one is closed by `atexit`
    (or by `close()`), while Python still runs."""

    def __init__(self, dataset: tf.data.Dataset):
        self._iterator = iter(dataset)
        _OPEN_ITERATORS.add(self)

    def __iter__(self) -> "_Batches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            raise StopIteration
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.close()
            raise
        return {k: v.numpy() for k, v in batch.items()}

    def close(self) -> None:
        """Deletes the TF iterator (its prefetch threads stop)."""
        self._iterator = None


_OPEN_ITERATORS: "weakref.WeakSet[_Batches]" = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for batches in list(_OPEN_ITERATORS):
        batches.close()
    gc.collect()


# --------------------------------------------------------------------------------------------
# Training


class TrainPipeline:
    """Training batches of one process, step after step, epoch after epoch (module docstring).

    `next(pipeline)` -> this process's slice of the next global batch (batch dict);
    `pipeline.state()` -> the state to save with a checkpoint; `TrainPipeline(..., state=saved)`
    continues with the batch that would have come next.
    """

    def __init__(
        self,
        config: Any,
        source: sources.Source | None = None,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        state: dict[str, Any] | None = None,
    ):
        self.config = config
        t = config.train
        self.source = source or sources.open_source(config, config.data.train_split)
        self.classes = sources.resolve_classes(config, self.source)
        class_lists.resolve_num_classes(config, self.classes, f"data.classes of {self.source}")
        self.global_batch_size = int(t.batch_size)
        self.process_index, self.process_count, self.local_batch_size = _process_slice(
            self.global_batch_size, process_index, process_count, "train.batch_size"
        )
        self.legacy_plus_one = bool(config.legacy_plus_one)
        self.single_scale = config.test.postprocess in SINGLE_SCALE_MODES
        self.max_boxes = int(t.max_boxes)
        self.scales = epoch_plan.check_multiscale(t.multiscale, t.multiscale_mode)
        self.multiscale_mode = t.multiscale_mode
        if not 0.0 <= float(t.flip_ratio) <= 1.0:
            raise ValueError(f"train.flip_ratio: expected 0..1, got {t.flip_ratio}")
        self.flip_ratio = float(t.flip_ratio)
        where = f"{self.source.name} {self.source.split}"
        self.examples = prepare_examples(
            self.source.index(),
            self.classes,
            legacy_plus_one=self.legacy_plus_one,
            max_boxes=self.max_boxes,
            training=True,
            min_image_side=int(config.data.min_image_side),
            where=where,
        )
        divisor = int(config.preprocess.size_divisor)
        self.canvases = check_canvases(config.data.canvases, divisor) or default_canvases(
            self.scales, divisor
        )
        max_hw = largest_resized_hw(
            self.examples.original_hw,
            self.scales,
            self.multiscale_mode,
            config.preprocess.resize,
        )
        self.canvas_of = assign_canvases(max_hw, self.canvases, self.examples.filenames)
        self.steps_per_epoch = steps_per_epoch(
            self.canvas_of, len(self.canvases), self.global_batch_size
        )
        self.seed = int(config.seed)
        self._epoch, self._step = 0, 0
        self._batches: _Batches | None = None
        if state is not None:
            self.restore(state)

    # -- the plan ---------------------------------------------------------------------------

    def plan(self, epoch: int, seed: int | None = None) -> EpochPlan:
        """The global plan of `epoch` (the same in every process); seed defaults to the run's."""
        return plan_epoch(
            self.canvas_of,
            len(self.canvases),
            self.global_batch_size,
            self.seed if seed is None else seed,
            epoch,
            self.scales,
            self.multiscale_mode,
            self.flip_ratio,
        )

    def local_slots(self, plan: EpochPlan, step: int) -> list[dict[str, Any]]:
        """This process's examples of one step of `plan`, everything but the pixels decided."""
        lo = self.process_index * self.local_batch_size
        canvas = self.canvases[int(plan.canvas[step])]
        slots = []
        for j in range(lo, lo + self.local_batch_size):
            i = int(plan.examples[step, j])
            h, w = (int(v) for v in self.examples.original_hw[i])
            scale = tuple(int(v) for v in plan.scales[step, j])
            nh, nw, factor = preprocess.resized_size(h, w, scale, self.config.preprocess.resize)
            factors = preprocess.scale_yx((h, w), (nh, nw), factor, self.single_scale)
            flip = bool(plan.flips[step, j])
            boxes, labels = self.examples.ground_truth(i)
            boxes = geometry.transform_boxes(boxes, factors, flip, (nh, nw), self.legacy_plus_one)
            boxes, labels, valid = geometry.pad_boxes(boxes, labels, self.max_boxes)
            slots.append(
                {
                    "example": i,
                    "original_hw": np.asarray((h, w), np.int32),
                    "resized_hw": np.asarray((nh, nw), np.int32),
                    "canvas_hw": np.asarray(canvas, np.int32),
                    "flip": flip,
                    "boxes": boxes,
                    "labels": labels,
                    "box_valid": valid,
                    "image_id": np.int32(self.examples.image_ids[i]),
                    "scale": np.asarray(factors, np.float32),
                }
            )
        return slots

    # -- state ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """JSON-able state of the next batch `next()` returns."""
        return {
            "seed": self.seed,
            "epoch": self._epoch,
            "step_in_epoch": self._step,
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch_size": self.global_batch_size,
            "num_examples": len(self.examples),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from a saved `state()`; raises ValueError when the data or batch differ."""
        missing = [k for k in ("seed", "epoch", "step_in_epoch") if k not in state]
        if missing:
            raise ValueError(f"data state: missing {missing} in {state}")
        current = {
            "global_batch_size": self.global_batch_size,
            "num_examples": len(self.examples),
            "steps_per_epoch": self.steps_per_epoch,
        }
        for key, value in current.items():
            if key in state and int(state[key]) != value:
                raise ValueError(
                    f"data state: saved {key}={state[key]} but this pipeline has {value} "
                    "(a different dataset, canvases or train.batch_size)"
                )
        step = int(state["step_in_epoch"])
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"data state: step_in_epoch {step} outside 0..{self.steps_per_epoch}")
        self.seed = int(state["seed"])
        self._epoch, self._step = int(state["epoch"]), step
        self.close()

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        """Global step of the next batch (epoch * steps_per_epoch + step_in_epoch)."""
        return self._epoch * self.steps_per_epoch + self._step

    # -- tf.data ----------------------------------------------------------------------------

    def _slots(self, epoch: int, step: int, seed: int):
        """Generator body (runs in a tf.data thread; uses only its arguments and fixed fields)."""
        while True:
            plan = self.plan(epoch, seed)
            for s in range(step, self.steps_per_epoch):
                for slot in self.local_slots(plan, s):
                    i = slot.pop("example")
                    slot["image"] = self.source.read(self.examples.positions[i])["image"]
                    yield slot
            epoch, step = epoch + 1, 0

    def dataset(self) -> tf.data.Dataset:
        """The tf.data pipeline from the current state on (infinite)."""
        m = self.max_boxes
        signature = {
            "image": tf.TensorSpec((), tf.string),
            "original_hw": tf.TensorSpec((2,), tf.int32),
            "resized_hw": tf.TensorSpec((2,), tf.int32),
            "canvas_hw": tf.TensorSpec((2,), tf.int32),
            "flip": tf.TensorSpec((), tf.bool),
            "boxes": tf.TensorSpec((m, 4), tf.float32),
            "labels": tf.TensorSpec((m,), tf.int32),
            "box_valid": tf.TensorSpec((m,), tf.bool),
            "image_id": tf.TensorSpec((), tf.int32),
            "scale": tf.TensorSpec((2,), tf.float32),
        }
        epoch, step, seed = self._epoch, self._step, self.seed
        preprocess_config = self.config.preprocess

        def load(slot):
            image = transforms.train_image(
                slot["image"],
                slot["original_hw"],
                slot["resized_hw"],
                slot["flip"],
                slot["canvas_hw"],
                preprocess_config,
            )
            return {
                "image": image,
                "boxes": slot["boxes"],
                "labels": slot["labels"],
                "box_valid": slot["box_valid"],
                "image_id": slot["image_id"],
                "image_hw": slot["resized_hw"],
                "scale": slot["scale"],
            }

        ds = tf.data.Dataset.from_generator(
            lambda: self._slots(epoch, step, seed), output_signature=signature
        )
        ds = ds.map(load, num_parallel_calls=_parallel_calls(self.config), deterministic=True)
        ds = ds.batch(self.local_batch_size, drop_remainder=True)
        ds = ds.prefetch(max(int(self.config.data.prefetch), 1))
        return ds.with_options(_options(self.config))

    def __iter__(self) -> "TrainPipeline":
        return self

    def close(self) -> None:
        """Stops the background loading; `next()` starts it again from the current state."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            self._batches = _Batches(self.dataset())
        batch = next(self._batches)
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return batch


# --------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass
class EvalStep:
    """One global evaluation batch: rows [B] int64 into Examples (-1: a dummy), padded (H, W)."""

    rows: np.ndarray
    padded_hw: tuple[int, int]


def plan_evaluation(
    examples: Examples,
    config: Any,
    batch_size: int,
    canvases: Sequence[tuple[int, int]] | None = None,
) -> list[EvalStep]:
    """Global evaluation batches: images grouped by padded shape (first appearance order), each
    group cut into batches of `batch_size`, the last one filled with dummies (-1)."""
    p = config.preprocess
    divisor = int(p.size_divisor)
    padded = []
    for h, w in examples.original_hw.tolist():
        nh, nw, _ = preprocess.resized_size(h, w, p.scale, p.resize)
        padded.append((round_up(nh, divisor), round_up(nw, divisor)))
    padded = np.asarray(padded, np.int64).reshape(-1, 2)
    if canvases:
        choice = assign_canvases(padded, canvases, examples.filenames)
        padded = np.asarray(canvases, np.int64)[choice]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(padded.tolist()):
        groups.setdefault(tuple(hw), []).append(i)
    steps = []
    for hw, members in groups.items():
        for start in range(0, len(members), batch_size):
            rows = np.full(batch_size, -1, np.int64)
            chunk = members[start : start + batch_size]
            rows[: len(chunk)] = chunk
            steps.append(EvalStep(rows=rows, padded_hw=hw))
    return steps


class EvalPipeline:
    """Evaluation batches of one process (module docstring); iterate it once per evaluation."""

    def __init__(
        self,
        config: Any,
        source: sources.Source | None = None,
        *,
        batch_size: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.config = config
        self.source = source or sources.open_source(config, config.data.val_split)
        self.classes = sources.resolve_classes(config, self.source)
        class_lists.resolve_num_classes(config, self.classes, f"data.classes of {self.source}")
        self.global_batch_size = int(batch_size or config.test.batch_size)
        self.process_index, self.process_count, self.local_batch_size = _process_slice(
            self.global_batch_size, process_index, process_count, "test.batch_size"
        )
        self.legacy_plus_one = bool(config.legacy_plus_one)
        self.max_boxes = int(config.train.max_boxes)
        self.examples = prepare_examples(
            self.source.index(),
            self.classes,
            legacy_plus_one=self.legacy_plus_one,
            max_boxes=self.max_boxes,
            training=False,
            where=f"{self.source.name} {self.source.split}",
        )
        canvases = eval_canvases(config)
        self.steps = plan_evaluation(self.examples, config, self.global_batch_size, canvases)
        self.num_steps = len(self.steps)

    def __len__(self) -> int:
        return self.num_steps

    def _slots(self):
        lo = self.process_index * self.local_batch_size
        for step in self.steps:
            for i in step.rows[lo : lo + self.local_batch_size].tolist():
                slot = {"padded_hw": np.asarray(step.padded_hw, np.int32)}
                if i < 0:
                    slot.update(
                        image=b"",
                        filename="",
                        example_valid=False,
                        boxes=np.zeros((self.max_boxes, 4), np.float32),
                        labels=np.zeros((self.max_boxes,), np.int32),
                        box_valid=np.zeros((self.max_boxes,), bool),
                        image_id=np.int32(-1),
                    )
                    yield slot
                    continue
                boxes, labels = self.examples.ground_truth(i)
                h, w = (int(v) for v in self.examples.original_hw[i])
                p = self.config.preprocess
                nh, nw, factor = preprocess.resized_size(h, w, p.scale, p.resize)
                single = self.config.test.postprocess in SINGLE_SCALE_MODES
                factors = preprocess.scale_yx((h, w), (nh, nw), factor, single)
                boxes = geometry.transform_boxes(
                    boxes, factors, False, (nh, nw), self.legacy_plus_one
                )
                boxes, labels, valid = geometry.pad_boxes(boxes, labels, self.max_boxes)
                slot.update(
                    image=self.source.read(self.examples.positions[i])["image"],
                    filename=str(self.examples.filenames[i]),
                    example_valid=True,
                    boxes=boxes,
                    labels=labels,
                    box_valid=valid,
                    image_id=np.int32(self.examples.image_ids[i]),
                )
                yield slot

    def _preprocess(self, encoded: bytes, filename: bytes, valid: bool, padded_hw: np.ndarray):
        """numpy_function body: predict's preprocessing, padded to the planned shape."""
        ph, pw = (int(v) for v in padded_hw)
        if not valid:
            return (
                np.zeros((ph, pw, 3), np.float32),
                np.asarray((ph, pw), np.int32),
                np.ones(2, np.float32),
                np.asarray((ph, pw), np.int32),
            )
        name = filename.decode()
        config = self.config
        out = preprocess.preprocess(encoded, config.preprocess, config.test.postprocess, name)
        image = out["image"]
        h, w = image.shape[:2]
        if h > ph or w > pw or (self.config.data.eval_pad == "multiple" and (h, w) != (ph, pw)):
            raise ValueError(
                f"{name}: preprocessed to {h}x{w}, but the index planned {ph}x{pw} (the image's "
                "decoded size differs from the dataset's, e.g. an EXIF rotation)"
            )
        if (h, w) != (ph, pw):
            image = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)))
        return (
            image,
            out["image_hw"].astype(np.int32),
            out["scale"].astype(np.float32),
            out["original_hw"].astype(np.int32),
        )

    def dataset(self) -> tf.data.Dataset:
        m = self.max_boxes
        signature = {
            "image": tf.TensorSpec((), tf.string),
            "filename": tf.TensorSpec((), tf.string),
            "example_valid": tf.TensorSpec((), tf.bool),
            "padded_hw": tf.TensorSpec((2,), tf.int32),
            "boxes": tf.TensorSpec((m, 4), tf.float32),
            "labels": tf.TensorSpec((m,), tf.int32),
            "box_valid": tf.TensorSpec((m,), tf.bool),
            "image_id": tf.TensorSpec((), tf.int32),
        }

        def load(slot):
            image, image_hw, scale, original_hw = tf.numpy_function(
                self._preprocess,
                [slot["image"], slot["filename"], slot["example_valid"], slot["padded_hw"]],
                [tf.float32, tf.int32, tf.float32, tf.int32],
                stateful=False,
            )
            image.set_shape((None, None, 3))
            image_hw.set_shape((2,))
            scale.set_shape((2,))
            original_hw.set_shape((2,))
            return {
                "image": image,
                "boxes": slot["boxes"],
                "labels": slot["labels"],
                "box_valid": slot["box_valid"],
                "image_id": slot["image_id"],
                "image_hw": image_hw,
                "scale": scale,
                "original_hw": original_hw,
                "example_valid": slot["example_valid"],
            }

        ds = tf.data.Dataset.from_generator(self._slots, output_signature=signature)
        ds = ds.map(load, num_parallel_calls=_parallel_calls(self.config), deterministic=True)
        ds = ds.batch(self.local_batch_size, drop_remainder=True)
        ds = ds.prefetch(max(int(self.config.data.prefetch), 1))
        return ds.with_options(_options(self.config))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """A new pass over the split (call `close()` on it to stop early)."""
        return _Batches(self.dataset())
