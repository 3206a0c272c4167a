"""training/train_step.py: one compiled step, learning, gradient accumulation and device-count
invariance.

Every backward pass takes tens of seconds to compile on a CPU, so the tests share one tiny model
(ResNet-18 at stem width 16, 32-channel FPN and head, 3 classes) at 96x96 with a global batch
of 4, and one jitted step per (norm, accumulation, device count) cached for the whole module.
The 4-device side runs this file as a script in a subprocess: XLA's simulated device count must
be set before JAX starts, and the test process already has one device.

Run as a script (`XLA_FLAGS=--xla_force_host_platform_device_count=4 python
tests/test_train_step.py OUT_DIR`) it writes one 4-device step per norm to OUT_DIR/<norm>.npz: the
4-device side of the invariance test; almost all of its runtime is compiling.
"""

import contextlib
import functools
import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a script
    sys.path.insert(0, str(REPO))

from fcos_jax.config import base as config_base  # noqa: E402
from fcos_jax.detection import postprocess  # noqa: E402
from fcos_jax.models import build_model  # noqa: E402
from fcos_jax.parallel import sharding  # noqa: E402
from fcos_jax.training import optim, train_step  # noqa: E402

IMAGE_HW = (96, 96)
GLOBAL_BATCH = 4
NUM_CLASSES = 3
NORMS = ("frozen_bn", "batch_stats_bn")
# lr x0.1 from step 150 (lr_steps=(3,) epochs of 50 steps): without the drop the box regression of
# the learning test still jumps at step 200 (box loss 0.25..0.8 between steps) and whether every
# box clears IoU 0.5 at the last step depends on rounding; with it the boxes settle (box loss
# ~0.14) and AP50 is 1.0 from step 150 on at base_lr 0.004..0.006 with either conv gradient.
STEPS_PER_EPOCH = 50
# Class channel -> colour of its filled rectangles in the synthetic images.
CLASS_COLORS = ((230.0, 40.0, 40.0), (40.0, 220.0, 40.0), (50.0, 60.0, 235.0))
# Objects per synthetic image: (class channel, x1, y1, x2, y2) in pixels. Sizes from 14 to 80 px,
# so positives land on the stride-8 and stride-16 levels. Image 3 has no object.
OBJECTS = (
    ((0, 8, 10, 40, 38), (1, 50, 44, 90, 92)),
    ((2, 6, 6, 86, 70), (0, 60, 74, 88, 92)),
    ((1, 20, 30, 34, 44), (2, 44, 8, 92, 50), (0, 10, 60, 40, 90)),
    (),
)
MAX_BOXES = 4  # padded rows carry box_valid False


def tiny_config(norm: str, accumulate_steps: int = 1):
    """A ResNet-18 FCOS small enough to compile and train quickly, learning from scratch."""
    c = config_base.get_base_config()
    b = c.model.backbone
    b.depth, b.style, b.stem_width = 18, "pytorch", 16
    b.norm, b.norm_trainable, b.frozen_stages = norm, True, -1
    c.model.fpn.out_channels = 32
    h = c.model.head
    h.num_classes, h.feat_channels, h.gn_groups, h.stacked_convs = NUM_CLASSES, 32, 8, 1
    c.legacy_plus_one = False
    t = c.train
    t.batch_size, t.epochs = GLOBAL_BATCH, 4
    t.accumulate_steps = accumulate_steps
    o = c.optim
    o.reference_batch, o.base_lr, o.lr_steps = GLOBAL_BATCH, 0.005, (3,)
    o.warmup, o.warmup_iters = "linear", 10
    o.grad_clip_norm = 35.0
    return c


def synthetic_batch(image_order: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Images `image_order` of OBJECTS: coloured rectangles on a noisy grey background.

    image [B, 96, 96, 3] float32 normalised, boxes [B, 4, 4] xyxy px, labels [B, 4] int32,
    box_valid [B, 4] bool.
    """
    rng = np.random.default_rng(0)
    n = len(image_order)
    image = np.empty((n, *IMAGE_HW, 3), np.float32)
    boxes = np.zeros((n, MAX_BOXES, 4), np.float32)
    labels = np.zeros((n, MAX_BOXES), np.int32)
    valid = np.zeros((n, MAX_BOXES), bool)
    backgrounds = 100 + 30 * rng.random((len(OBJECTS), *IMAGE_HW, 3), dtype=np.float32)
    for row, index in enumerate(image_order):
        canvas = backgrounds[index].copy()
        for j, (label, x1, y1, x2, y2) in enumerate(OBJECTS[index]):
            canvas[y1:y2, x1:x2] = CLASS_COLORS[label]
            boxes[row, j] = (x1, y1, x2, y2)
            labels[row, j] = label
            valid[row, j] = True
        image[row] = (canvas - 128.0) / 64.0
    return dict(image=image, boxes=boxes, labels=labels, box_valid=valid)


@dataclass(frozen=True)
class Trainer:
    config: object
    model: object
    mesh: jax.sharding.Mesh
    step_fn: object  # the un-jitted step
    step: object  # jitted on `mesh`

    def fresh_state(self) -> train_step.TrainState:
        """The shared step-0 state, replicated on the mesh."""
        return sharding.replicate(initial_state(), self.mesh)

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding.to_global(batch, self.mesh)


def trainer(norm: str, accumulate_steps: int = 1, num_devices: int = 1) -> Trainer:
    """One jitted step per setting for the whole module (each costs a compile)."""
    return _trainer(norm, accumulate_steps, num_devices)


@functools.cache  # called with positional arguments only, so each setting is one cache entry
def _trainer(norm: str, accumulate_steps: int, num_devices: int) -> Trainer:
    config = tiny_config(norm, accumulate_steps)
    model = build_model(config.model)
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    optimizer, schedule, labels = optim.build_optimizer(config, _param_shapes(), STEPS_PER_EPOCH)
    step_fn = train_step.make_train_step(config, model, optimizer, schedule, labels, mesh)
    return Trainer(config, model, mesh, step_fn, train_step.jit_train_step(step_fn, mesh))


def _param_shapes():
    model = build_model(tiny_config("frozen_bn").model)
    x = jnp.zeros((1, *IMAGE_HW, 3))
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


@functools.cache
def initial_state() -> train_step.TrainState:
    """Step-0 state as NumPy, shared by every setting: FrozenBatchNorm and nn.BatchNorm hold the
    same variables (scale, bias; mean, var) and every setting has the same parameter groups, so
    one init (one compile) serves all. NumPy, because each step donates its device state.

    The rbg key only makes the init compile in seconds instead of a minute (threefry)."""
    config = tiny_config("frozen_bn")
    model = build_model(config.model)
    optimizer, _, _ = optim.build_optimizer(config, _param_shapes(), STEPS_PER_EPOCH)
    create = jax.jit(
        functools.partial(train_step.create_train_state, model, optimizer),
        static_argnums=1,
    )
    return jax.device_get(create(jax.random.key(0, impl="rbg"), IMAGE_HW))


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
    """{'prefix/a/b': array} of a nested dict of arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {
        prefix + "/" + "/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in leaves
    }


def one_step(norm: str, accumulate_steps: int = 1, num_devices: int = 1) -> dict[str, np.ndarray]:
    """Parameters and batch statistics before and after one step on the 4 distinct images, and
    the step's metrics, as flat NumPy arrays."""
    return _one_step(norm, accumulate_steps, num_devices)


@functools.cache
def _one_step(norm: str, accumulate_steps: int, num_devices: int) -> dict[str, np.ndarray]:
    t = trainer(norm, accumulate_steps, num_devices)
    state = t.fresh_state()
    before = flat(state.params, "params0") | flat(state.batch_stats, "batch_stats0")
    batch = t.put(synthetic_batch((0, 1, 2, 3)))
    assert len(batch["image"].sharding.device_set) == num_devices
    state, metrics = t.step(state, batch)
    after = flat(state.params, "params") | flat(state.batch_stats, "batch_stats")
    return before | after | {"metrics/" + k: np.asarray(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------
# Device-count invariance (the 4-device side runs this file as a script)


def _write_four_device_steps(out_dir: Path) -> None:
    """One step per norm on 4 devices, each written to OUT_DIR/<norm>.npz as soon as it is done."""
    if jax.device_count() != 4:
        raise SystemExit(f"expected 4 simulated CPU devices, found {jax.device_count()}")
    for norm in NORMS:
        tmp = out_dir / f"{norm}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **one_step(norm, num_devices=4))
        os.replace(tmp, out_dir / f"{norm}.npz")


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """Starts the 4-device side at once (it compiles while this process compiles its own side);
    calling the fixture's value with a norm waits for that norm's results."""
    out_dir = tmp_path_factory.mktemp("four_devices")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["XLA_FLAGS"] = flags.strip()
    log_path = out_dir / "stderr.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(out_dir)], cwd=REPO, env=env, stderr=log
        )

    def result(norm: str) -> dict[str, np.ndarray]:
        path = out_dir / f"{norm}.npz"
        deadline = time.monotonic() + 1800
        while not path.exists():
            if proc.poll() is not None and not path.exists():
                raise AssertionError(
                    f"4-device run exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            assert time.monotonic() < deadline, "4-device run timed out"
            time.sleep(0.5)
        with np.load(path) as f:
            return dict(f)

    yield result
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def assert_same_step(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same start, then the same loss terms and parameters (and BN statistics) within 1e-5."""
    assert got.keys() == want.keys()
    for key in want:
        if key.startswith(("params0/", "batch_stats0/")):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    # The updates themselves agree to 1e-3 of their largest entry, beyond the float32 rounding
    # (a few ulp) of the parameters they were added to: a wrong gradient scale or normaliser
    # would show here even where lr * grad is below the 1e-5 above.
    for key in want:
        if key.startswith("params/"):
            start = want["params0/" + key[len("params/") :]]
            update_got, update_want = got[key] - start, want[key] - start
            tolerance = 1e-3 * np.abs(update_want).max() + 4 * np.spacing(np.abs(start))
            excess = np.abs(update_got - update_want) - tolerance
            assert np.all(excess <= 0), f"{key}: updates differ by up to {excess.max()} too much"


@pytest.mark.parametrize("norm", NORMS)
def test_one_step_on_4_devices_equals_1_device(norm, four_devices):
    """Global batch of 4 images split over 4 simulated devices vs all on one. With
    batch_stats_bn this also shows that BatchNorm under jit normalises over the global batch
    (per-device statistics would change the loss and the running variance)."""
    single = one_step(norm, num_devices=1)
    assert_same_step(four_devices(norm), single)
    assert single["metrics/num_pos"] > 0


# --------------------------------------------------------------------------------------------
# Gradient accumulation


def test_two_micro_batches_give_the_update_of_one_batch():
    """accumulate_steps=2 (2 images each, normalisers of all 4) vs one 4-image step. frozen_bn
    only: with batch_stats_bn each micro-batch normalises with its own 2-image statistics, so
    the forward pass itself differs from the 4-image one, by design (as per-device BN would)."""
    assert_same_step(one_step("frozen_bn", accumulate_steps=2), one_step("frozen_bn"))


def test_micro_batches_update_batch_statistics_once_with_their_mean():
    """batch_stats_bn, accumulate_steps=2: each micro-batch (images 0, 2 and 1, 3: rows are
    interleaved) normalises with its own statistics, and the running averages move once:
    ra <- 0.9 ra + 0.1 mean_i(stat_i), with the micro-batch mean and (biased, as flax) variance.
    Checked on the stem BN, whose input is conv1 of the images, computed here with torch."""
    import torch

    step = one_step("batch_stats_bn", accumulate_steps=2)
    images = synthetic_batch((0, 1, 2, 3))["image"].astype(np.float64)
    kernel = step["params0/backbone/conv1/kernel"].astype(np.float64)  # [7, 7, 3, C] HWIO
    features = torch.nn.functional.conv2d(
        torch.from_numpy(images).permute(0, 3, 1, 2),
        torch.from_numpy(kernel).permute(3, 2, 0, 1),
        stride=2,
        padding=3,
    ).numpy()  # [4, C, H, W]
    micro = [features[[0, 2]], features[[1, 3]]]
    mean = np.mean([m.mean(axis=(0, 2, 3)) for m in micro], axis=0)
    var = np.mean([m.var(axis=(0, 2, 3)) for m in micro], axis=0)
    for stat, value in (("mean", mean), ("var", var)):
        start = step[f"batch_stats0/backbone/bn1/{stat}"]
        np.testing.assert_allclose(
            step[f"batch_stats/backbone/bn1/{stat}"],
            0.9 * start + 0.1 * value,
            rtol=2e-5,
            atol=1e-6,
            err_msg=stat,
        )
    whole = features.var(axis=(0, 2, 3))  # one 4-image update would differ from the above
    assert np.abs(whole - var).max() > 1e-3 * np.abs(var).max()


def test_accumulation_shrinks_the_compiled_steps_working_memory():
    """XLA's buffer assignment of the step: with 4 micro-batches (activations and targets of one
    micro-batch alive at a time) the temporary memory is well under that of one whole batch.

    Compiled (not run) at 512x512, where activations outweigh the gradients, their accumulators
    and the optimizer's temporaries (at the other tests' 96x96 those dominate). Measured:
    147 MB at k = 1, 116 MB at k = 2, 69 MB at k = 4 (the per-tap gradients the micro-batch loop
    uses for speed cost some of the saving: 89 MB at k = 2 with XLA's own)."""
    temp = {}
    for k in (1, 4):
        t = trainer("frozen_bn", k)
        batch = synthetic_batch((0, 1, 2, 3))
        batch["image"] = np.zeros((GLOBAL_BATCH, 512, 512, 3), np.float32)
        state, batch = t.fresh_state(), t.put(batch)
        stats = t.step.lower(state, batch).compile().memory_analysis()
        temp[k] = stats.temp_size_in_bytes
    assert temp[4] < 0.6 * temp[1], temp


# --------------------------------------------------------------------------------------------
# Learning


def detections(t: Trainer, state: train_step.TrainState, batch: dict[str, np.ndarray]):
    """postprocess.detect on the model's eval-mode outputs: boxes [B, D, 4] xyxy px, scores,
    labels, valid [B, D], as NumPy."""
    test = t.config.test

    @jax.jit
    def run(variables, image):
        outputs = t.model.apply(variables, image, train=False)
        n = image.shape[0]
        return postprocess.detect(
            outputs,
            jnp.broadcast_to(jnp.asarray(IMAGE_HW, jnp.int32), (n, 2)),
            jnp.ones((n, 2), jnp.float32),
            mode="mmdet_v3",
            strides=tuple(t.config.model.head.strides),
            nms_pre=test.nms_pre,
            score_thr=test.score_thr,
            nms_iou=test.nms_iou,
            max_per_img=test.max_per_img,
        )

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return jax.device_get(run(variables, jnp.asarray(batch["image"])))


def coco_ap50(batch: dict[str, np.ndarray], dets: dict[str, np.ndarray]) -> float:
    """pycocotools AP at IoU 0.5 (stats[1]) of `dets` against the batch's ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box):
        x1, y1, x2, y2 = (float(v) for v in box)
        return [x1, y1, x2 - x1, y2 - y1]

    images, annotations, results = [], [], []
    for i in range(len(batch["image"])):
        images.append({"id": i + 1, "height": IMAGE_HW[0], "width": IMAGE_HW[1]})
        for box, label in zip(
            batch["boxes"][i][batch["box_valid"][i]],
            batch["labels"][i][batch["box_valid"][i]],
            strict=True,
        ):
            bbox = xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(label) + 1,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
        valid = dets["valid"][i]
        for box, score, label in zip(
            dets["boxes"][i][valid], dets["scores"][i][valid], dets["labels"][i][valid], strict=True
        ):
            results.append(
                {
                    "image_id": i + 1,
                    "category_id": int(label) + 1,
                    "bbox": xywh(box),
                    "score": float(score),
                }
            )
    assert results, "no detections at all"
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": str(k)} for k in range(NUM_CLASSES)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])


def test_small_model_overfits_two_images_to_ap50_of_one():
    """200 steps on two images from scratch (lr x0.1 for the last 50): focal loss falls >= 90 %,
    every object is found.

    The batch holds the two images twice: with global normalisers (sums over the batch) the loss
    and its gradient equal those of the 2-image batch, and the step compiled for the other tests'
    4-image batch is reused. The total loss is not asked to fall 90 %: the centerness BCE has an
    entropy floor.
    """
    t = trainer("frozen_bn")
    two_images = synthetic_batch((0, 1))
    batch = t.put(synthetic_batch((0, 1, 0, 1)))
    state = t.fresh_state()
    history = []
    for _ in range(200):
        state, metrics = t.step(state, batch)
        history.append(metrics["loss_cls"])
    loss_cls = np.asarray(jax.device_get(history))
    assert np.all(np.isfinite(loss_cls))
    assert loss_cls[-1] <= 0.1 * loss_cls[0], (loss_cls[0], loss_cls[-1])
    ap50 = coco_ap50(two_images, detections(t, state, two_images))
    assert ap50 == 1.0, (ap50, loss_cls[-1])


# --------------------------------------------------------------------------------------------
# One compiled program


def _primitive_names(jaxpr) -> set[str]:
    """Names of every primitive in `jaxpr` and, recursively, its sub-jaxprs (scan bodies, jit)."""
    names = {eqn.primitive.name for eqn in jaxpr.eqns}
    for sub in jax.extend.core.subjaxprs(jaxpr):
        names |= _primitive_names(sub)
    return names


@pytest.mark.parametrize("accumulate_steps", [1, 2])
def test_step_is_one_compiled_program_without_host_round_trips(accumulate_steps):
    """Steps fed their own output state: no recompile (the jit cache holds one entry), no
    transfer between host and devices (transfer guard), no host callback inside the program."""
    t = trainer("frozen_bn", accumulate_steps)
    state = t.fresh_state()
    batch = t.put(synthetic_batch((0, 1, 2, 3)))
    with jax.transfer_guard("disallow"):
        for _ in range(2):
            state, metrics = t.step(state, batch)
    assert t.step._cache_size() == 1
    jaxpr = jax.make_jaxpr(t.step_fn)(state, batch).jaxpr
    names = _primitive_names(jaxpr)
    assert "dot_general" in names  # the walk does see the model
    assert not {n for n in names if "callback" in n}, names
    assert int(jax.device_get(state.step)) == 2
    assert bool(jax.device_get(metrics["state_finite"]))  # computed inside the same program


def test_all_finite_looks_at_every_floating_point_leaf():
    tree = {"a": np.ones((2, 3), np.float32), "b": (np.zeros(4, np.float32), np.int32(7))}
    assert bool(train_step.all_finite(tree))
    for bad in (np.nan, np.inf, -np.inf):
        leaf = np.array([0.0, 0.0, bad, 0.0], np.float32)
        assert not bool(train_step.all_finite({"a": tree["a"], "b": (leaf, np.int32(7))}))
    assert bool(train_step.all_finite({"count": np.int32(2**31 - 1), "empty": {}}))


def test_state_finite_is_false_when_the_update_blows_up_behind_a_finite_loss():
    """The loss of a step is computed before its update: an optimizer state holding infinity
    gives a finite loss and infinite new parameters, and only `state_finite` says so."""
    t = trainer("frozen_bn")
    start = initial_state()
    blown = jax.tree.map(
        lambda x: np.full_like(x, np.inf) if np.issubdtype(x.dtype, np.floating) else x,
        start.opt_state,
    )
    state = sharding.replicate(start.replace(opt_state=blown), t.mesh)
    state, metrics = t.step(state, t.put(synthetic_batch((0, 1, 2, 3))))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and not bool(metrics["state_finite"])
    assert not np.isfinite(np.asarray(state.params["bbox_head"]["conv_cls"]["kernel"])).all()


if __name__ == "__main__":
    _write_four_device_steps(Path(sys.argv[1]))
