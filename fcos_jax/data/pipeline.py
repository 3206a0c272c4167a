"""The tf.data input pipelines: this process's training batches, step after step, and its
evaluation batches, one pass per evaluation. TensorFlow runs here and in transforms.py only.

What each batch holds is decided beforehand, in NumPy, by the planning modules: the usable
examples (examples.py), the epoch plan and training canvases (epoch_plan.py), the evaluation plan
(eval_plan.py) and each slot's boxes in network-input pixels (geometry.py). The pipelines read
the encoded images from the source and turn them into pixels in tf.data threads. A pipeline
opens its split ready to read (`sources.open_split`: prepared by one process per data_dir), so
no caller has to prepare the data first.

Training: the plan of (seed, epoch) is the same in every process; each loads its slice
`[p * L, (p + 1) * L)` of each global batch (L = batch_size / process_count), so all processes
feed the same canvas at every step and the global batch does not depend on the number of
processes. Pixels by transforms.train_image. The iterator state is {seed, epoch, step_in_epoch,
...}: a small JSON-able dict; a pipeline built with that state yields exactly the batch the saved
run would have yielded next.

Evaluation: every image goes through `fcos_jax.data.preprocess.preprocess`, the very function
`predict` calls (cv2 decode and resize for the mmdet modes), so the pixels are identical, padded
to its planned shape. The last batch of a shape is filled with dummies marked
`example_valid=False`: no image is dropped or repeated.

Batch dict (this process's slice, NumPy; `sharding.to_global` makes global arrays of it):
  image [L, H, W, 3] float32, boxes [L, M, 4] float32 xyxy in network-input pixels,
  labels [L, M] int32 class channel, box_valid [L, M] bool, image_id [L] int32,
  image_hw [L, 2] int32 (resized, unpadded), scale [L, 2] float32 (y, x; original pixels =
  input pixels / scale); evaluation adds original_hw [L, 2] int32 and example_valid [L] bool.
"""

import atexit
import gc
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from fcos_jax.config import classes as class_lists
from fcos_jax.data import epoch_plan, eval_plan, geometry, preprocess, sources, transforms
from fcos_jax.data.canvas import eval_canvases
from fcos_jax.data.examples import Examples, prepare_examples

GROUND_TRUTH = ("boxes", "labels", "box_valid", "image_id")  # the batch keys of the plan


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


def _ground_truth_spec(max_boxes: int) -> dict[str, tf.TensorSpec]:
    m = max_boxes
    return {
        "boxes": tf.TensorSpec((m, 4), tf.float32),
        "labels": tf.TensorSpec((m,), tf.int32),
        "box_valid": tf.TensorSpec((m,), tf.bool),
        "image_id": tf.TensorSpec((), tf.int32),
    }


class _Pipeline:
    """What both pipelines share: the source and its classes, this process's share of the global
    batch, the settings of the box path, the usable examples, and the tf.data stages."""

    examples: Examples

    def __init__(
        self,
        config: Any,
        source: sources.Source | None,
        split: str,
        batch_size: Any,
        field: str,
        process_index: int | None,
        process_count: int | None,
    ):
        self.config = config
        self.source = source or sources.open_split(config, split)
        self.classes = sources.resolve_classes(config, self.source)
        class_lists.resolve_num_classes(config, self.classes, f"data.classes of {self.source}")
        self.global_batch_size = int(batch_size)
        self.process_index, self.process_count, self.local_batch_size = _process_slice(
            self.global_batch_size, process_index, process_count, field
        )
        self.legacy_plus_one = bool(config.legacy_plus_one)
        self.single_scale = preprocess.single_scale(config.preprocess)
        self.max_boxes = int(config.data.max_boxes)

    def _prepare(self, training: bool, min_image_side: int = 0) -> Examples:
        return prepare_examples(
            self.source.index(),
            self.classes,
            legacy_plus_one=self.legacy_plus_one,
            max_boxes=self.max_boxes,
            training=training,
            min_image_side=min_image_side,
            where=f"{self.source.name} {self.source.split}",
        )

    def _place(self, i: int, scale: Sequence[float], flip: bool) -> geometry.Placed:
        """Example i's ground truth in the network input at `scale` (geometry.place)."""
        boxes, labels = self.examples.ground_truth(i)
        h, w = (int(v) for v in self.examples.original_hw[i])
        return geometry.place(
            boxes,
            labels,
            (h, w),
            scale,
            resize_mode=self.config.preprocess.resize,
            single_scale=self.single_scale,
            flip=flip,
            max_boxes=self.max_boxes,
            legacy_plus_one=self.legacy_plus_one,
        )

    def _dataset(
        self, slots: Callable[[], Iterator[dict]], signature: dict[str, tf.TensorSpec], load
    ) -> tf.data.Dataset:
        """slots (a generator of slot dicts: `signature` and the ground truth) -> `load` of each,
        in parallel and in order -> batches of the local batch size, prefetched."""
        signature = {**signature, **_ground_truth_spec(self.max_boxes)}
        ds = tf.data.Dataset.from_generator(slots, output_signature=signature)
        ds = ds.map(load, num_parallel_calls=_parallel_calls(self.config), deterministic=True)
        ds = ds.batch(self.local_batch_size, drop_remainder=True)
        ds = ds.prefetch(max(int(self.config.data.prefetch), 1))
        return ds.with_options(_options(self.config))


# --------------------------------------------------------------------------------------------
# Training


class TrainPipeline(_Pipeline):
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
        a = config.augment
        super().__init__(
            config,
            source,
            config.data.train_split,
            config.train.batch_size,
            "train.batch_size",
            process_index,
            process_count,
        )
        self.scales = epoch_plan.check_multiscale(a.multiscale, a.multiscale_mode)
        self.multiscale_mode = a.multiscale_mode
        if not 0.0 <= float(a.flip_ratio) <= 1.0:
            raise ValueError(f"augment.flip_ratio: expected 0..1, got {a.flip_ratio}")
        self.flip_ratio = float(a.flip_ratio)
        self.examples = self._prepare(True, int(config.data.min_image_side))
        self.canvases, self.canvas_of = epoch_plan.train_canvases(
            self.examples.original_hw,
            self.examples.filenames,
            self.scales,
            self.multiscale_mode,
            resize_mode=config.preprocess.resize,
            canvases=config.data.canvases,
            size_divisor=int(config.preprocess.size_divisor),
        )
        self.steps_per_epoch = epoch_plan.steps_per_epoch(
            self.canvas_of, len(self.canvases), self.global_batch_size
        )
        self.seed = int(config.seed)
        self._epoch, self._step = 0, 0
        self._batches: _Batches | None = None
        if state is not None:
            self.restore(state)

    # -- the plan ---------------------------------------------------------------------------

    def plan(self, epoch: int, seed: int | None = None) -> epoch_plan.EpochPlan:
        """The global plan of `epoch` (the same in every process); seed defaults to the run's."""
        return epoch_plan.plan_epoch(
            self.canvas_of,
            len(self.canvases),
            self.global_batch_size,
            self.seed if seed is None else seed,
            epoch,
            self.scales,
            self.multiscale_mode,
            self.flip_ratio,
        )

    def local_slots(self, plan: epoch_plan.EpochPlan, step: int) -> list[dict[str, Any]]:
        """This process's examples of one step of `plan`, everything but the pixels decided."""
        lo = self.process_index * self.local_batch_size
        canvas = self.canvases[int(plan.canvas[step])]
        slots = []
        for j in range(lo, lo + self.local_batch_size):
            i = int(plan.examples[step, j])
            scale = tuple(int(v) for v in plan.scales[step, j])
            flip = bool(plan.flips[step, j])
            placed = self._place(i, scale, flip)
            slots.append(
                {
                    "example": i,
                    "original_hw": np.array(self.examples.original_hw[i], np.int32),
                    "resized_hw": np.asarray(placed.resized_hw, np.int32),
                    "canvas_hw": np.asarray(canvas, np.int32),
                    "flip": flip,
                    "boxes": placed.boxes,
                    "labels": placed.labels,
                    "box_valid": placed.box_valid,
                    "image_id": np.int32(self.examples.image_ids[i]),
                    "scale": np.asarray(placed.scale_yx, np.float32),
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
        signature = {
            "image": tf.TensorSpec((), tf.string),
            "original_hw": tf.TensorSpec((2,), tf.int32),
            "resized_hw": tf.TensorSpec((2,), tf.int32),
            "canvas_hw": tf.TensorSpec((2,), tf.int32),
            "flip": tf.TensorSpec((), tf.bool),
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
                **{k: slot[k] for k in GROUND_TRUTH},
                "image_hw": slot["resized_hw"],
                "scale": slot["scale"],
            }

        return self._dataset(lambda: self._slots(epoch, step, seed), signature, load)

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


class EvalPipeline(_Pipeline):
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
        super().__init__(
            config,
            source,
            config.data.val_split,
            batch_size or config.test.batch_size,
            "test.batch_size",
            process_index,
            process_count,
        )
        self.examples = self._prepare(False)
        canvases = eval_canvases(config)
        self.steps = eval_plan.plan_evaluation(
            self.examples, config, self.global_batch_size, canvases
        )
        self.num_steps = len(self.steps)

    def __len__(self) -> int:
        return self.num_steps

    def _slots(self):
        lo = self.process_index * self.local_batch_size
        for step in self.steps:
            for i in step.rows[lo : lo + self.local_batch_size].tolist():
                if i < 0:  # a dummy: no pixels, no boxes
                    image, filename, image_id = b"", "", -1
                    empty = np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
                    boxes, labels, valid = geometry.pad_boxes(*empty, self.max_boxes)
                else:
                    placed = self._place(i, self.config.preprocess.scale, False)
                    boxes, labels, valid = placed.boxes, placed.labels, placed.box_valid
                    image = self.source.read(self.examples.positions[i])["image"]
                    filename = str(self.examples.filenames[i])
                    image_id = self.examples.image_ids[i]
                yield {
                    "padded_hw": np.asarray(step.padded_hw, np.int32),
                    "image": image,
                    "filename": filename,
                    "example_valid": i >= 0,
                    "boxes": boxes,
                    "labels": labels,
                    "box_valid": valid,
                    "image_id": np.int32(image_id),
                }

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
        out = preprocess.preprocess(encoded, config.preprocess, name)
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
        """The tf.data pipeline of one pass over the split."""
        signature = {
            "image": tf.TensorSpec((), tf.string),
            "filename": tf.TensorSpec((), tf.string),
            "example_valid": tf.TensorSpec((), tf.bool),
            "padded_hw": tf.TensorSpec((2,), tf.int32),
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
                **{k: slot[k] for k in GROUND_TRUTH},
                "image_hw": image_hw,
                "scale": scale,
                "original_hw": original_hw,
                "example_valid": slot["example_valid"],
            }

        return self._dataset(self._slots, signature, load)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """A new pass over the split (call `close()` on it to stop early)."""
        return _Batches(self.dataset())
