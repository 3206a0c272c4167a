"""fcos_jax.checkpoint.store: converted and training checkpoints, inference restore, mismatch
errors, checksums and damaged steps."""

import hashlib
import json
import logging
import re
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from damage_helpers import (
    copy_workdir,
    largest_array_file,
    overwrite_middle,
    truncate,
    write_garbage,
)
from flax import traverse_util

from fcos_jax.checkpoint import store
from fcos_jax.config import base as config_base
from fcos_jax.config.classes import coco_classes

COCO = coco_classes()


def tiny_config(**head):
    """A small FCOS (ResNet-18 at stem width 8, 16-channel FPN and head) for fast checkpoints."""
    c = config_base.get_base_config()
    c.name = "tiny"
    c.model.backbone.depth = 18
    c.model.backbone.stem_width = 8
    c.model.fpn.out_channels = 16
    c.model.head.feat_channels = 16
    c.model.head.gn_groups = 4
    c.model.head.stacked_convs = 1
    c.model.head.update(head)
    return c


def random_variables(config, seed=0):
    rng = np.random.default_rng(seed)
    shapes = store.abstract_variables(config.model)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    config = tiny_config()
    variables = random_variables(config)
    directory = tmp_path_factory.mktemp("converted")
    meta = store.make_meta(config, "test: random", classes=COCO)
    root = store.save_converted(directory, variables["params"], variables["batch_stats"], meta)
    assert root == directory / "checkpoints" and (root / "0").is_dir()
    return directory, variables


def test_save_converted_then_restore_inference_round_trips(converted_dir):
    directory, variables = converted_dir
    restored, meta = store.restore_inference(directory, tiny_config())
    assert_trees_equal(restored, variables)
    assert isinstance(restored["params"]["bbox_head"]["scales_0"]["scale"], jax.Array)
    assert restored["params"]["bbox_head"]["scales_0"]["scale"].shape == ()
    assert meta["config_name"] == "tiny" and meta["source"] == "test: random"
    assert meta["format_version"] == store.FORMAT_VERSION
    assert meta["parts"] == ["backbone", "neck", "bbox_head"]
    assert meta["classes"][:2] == [[1, "person"], [2, "bicycle"]] and len(meta["classes"]) == 80


def test_restore_inference_accepts_the_checkpoints_directory_itself(converted_dir):
    directory, variables = converted_dir
    restored, _ = store.restore_inference(directory / "checkpoints", tiny_config())
    assert_trees_equal(restored, variables)


def test_checkpoint_of_another_model_is_refused_naming_path_keys_and_shapes(converted_dir):
    directory, _ = converted_dir
    other = tiny_config(norm="none", num_classes=80)
    other.model.fpn.out_channels = 32
    other.name = "other"
    with pytest.raises(store.CheckpointError) as info:
        store.restore_inference(directory, other)
    message = str(info.value)
    assert message.startswith(str(directory / "checkpoints" / "0"))
    assert "'other'" in message and "'tiny'" in message
    assert "missing bbox_head/cls_convs_0/conv/bias" in message
    assert "unexpected bbox_head/cls_convs_0/gn/bias" in message
    assert "neck/fpn_convs_0/bias (16,) vs expected (32,)" in message


def test_backbone_only_checkpoint_is_refused_for_inference(tmp_path):
    config = tiny_config()
    variables = random_variables(config)
    backbone_only = {k: {"backbone": v["backbone"]} for k, v in variables.items()}
    meta = store.make_meta(config, "backbone: r18.pth", parts=("backbone",), classes=COCO)
    store.save_converted(tmp_path, backbone_only["params"], backbone_only["batch_stats"], meta)
    with pytest.raises(store.CheckpointError, match="holds only backbone weights.*init_from"):
        store.restore_inference(tmp_path, config)
    # ... but its weights restore as stored, for config.init_from.
    restored, meta = store.restore_weights(tmp_path)
    assert_trees_equal(restored, backbone_only)
    assert meta["parts"] == ["backbone"]


def test_save_converted_refuses_a_non_empty_directory(converted_dir):
    directory, variables = converted_dir
    with pytest.raises(store.CheckpointError, match="already exists"):
        store.save_converted(directory, variables["params"], variables["batch_stats"], {})


def test_path_without_checkpoint_is_named(tmp_path):
    with pytest.raises(store.CheckpointError, match=f"{tmp_path}/nothing: no such"):
        store.restore_inference(tmp_path / "nothing", tiny_config())
    with pytest.raises(store.CheckpointError, match="not a checkpoint directory"):
        store.restore_inference(tmp_path, tiny_config())


def test_a_head_with_another_class_count_than_the_meta_is_not_saved(tmp_path):
    """The weights' class channels (80) against a 3-class meta: refused before anything is
    written, by the converter's save and by a training save alike."""
    config = tiny_config()
    variables = random_variables(config)
    meta = store.make_meta(config, "x", classes=COCO[:3])
    with pytest.raises(
        store.CheckpointError, match=f"{tmp_path}/out: .* has 3 classes, .* has 80 class channels"
    ):
        store.save_converted(tmp_path / "out", variables["params"], variables["batch_stats"], meta)
    assert not (tmp_path / "out").exists()
    manager = store.checkpoint_manager(tmp_path / "run")
    with pytest.raises(store.CheckpointError, match="step 7 in .*run/checkpoints: .* 3 classes"):
        store.save(manager, 7, variables["params"], variables["batch_stats"], meta)
    manager.close()
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


@pytest.fixture(scope="module")
def training_workdir(tmp_path_factory):
    """Two full training checkpoints (steps 10 and 20) written through the train-state hooks."""
    config = tiny_config()
    workdir = tmp_path_factory.mktemp("workdir")
    tx = optax.sgd(0.1, momentum=0.9)
    manager = store.checkpoint_manager(workdir, max_to_keep=3)
    states = {}
    for step, seed in ((10, 1), (20, 2)):
        variables = random_variables(config, seed)
        # optax's state structure with distinct NumPy values (no per-shape JAX compiles).
        opt_shapes = jax.eval_shape(tx.init, variables["params"])
        opt_state = jax.tree.map(lambda x, s=seed: np.full(x.shape, s, x.dtype), opt_shapes)
        data_state = {"epoch": step // 10, "position": step}
        meta = store.make_meta(config, "training", classes=COCO)
        store.save(
            manager,
            step,
            variables["params"],
            variables["batch_stats"],
            meta,
            opt_state,
            data_state,
        )
        states[step] = (variables, opt_state, data_state)
    manager.wait_until_finished()
    manager.close()
    return workdir, config, tx, states


def test_restore_inference_takes_latest_step_of_a_training_workdir(training_workdir):
    workdir, config, _, states = training_workdir
    restored, meta = store.restore_inference(workdir, config)
    assert_trees_equal(restored, states[20][0])
    assert meta["source"] == "training"


def test_restore_training_returns_the_full_train_state(training_workdir):
    workdir, config, tx, states = training_workdir
    shapes = store.abstract_variables(config.model)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )
    abstract_opt = abstract(jax.eval_shape(tx.init, shapes["params"]))
    manager = store.checkpoint_manager(workdir, create=False)
    step, restored, damaged = store.restore_training(
        manager, abstract(shapes["params"]), abstract(shapes["batch_stats"]), abstract_opt
    )
    variables, opt_state, data_state = states[20]
    assert step == 20 and damaged == []
    assert_trees_equal(restored["params"], variables["params"])
    assert_trees_equal(restored["batch_stats"], variables["batch_stats"])
    assert isinstance(restored["opt_state"][0], optax.TraceState)
    assert_trees_equal(restored["opt_state"], opt_state)
    assert restored["data_state"] == data_state and restored["meta"]["config_name"] == "tiny"


def test_restore_training_of_a_fresh_workdir_is_none(tmp_path):
    manager = store.checkpoint_manager(tmp_path)
    assert store.restore_training(manager, {}, {}, {}) is None


def test_restore_training_of_a_converted_directory_names_missing_items(converted_dir):
    directory, _ = converted_dir
    manager = store.checkpoint_manager(directory, create=False)
    with pytest.raises(store.CheckpointError, match="lacks the item.*opt_state, data_state"):
        store.restore_training(manager, {}, {}, {})


# --- checksums: what was saved is what is restored, or the step is named -----------------------


def test_each_step_records_the_sha256_of_every_array_and_of_the_meta(converted_dir):
    directory, variables = converted_dir
    step_dir = directory / "checkpoints" / "0"
    recorded = json.loads((step_dir / "checksums" / "metadata").read_text())
    flat = {
        f"{collection}/{key}": np.asarray(value)
        for collection in ("params", "batch_stats")
        for key, value in traverse_util.flatten_dict(variables[collection], sep="/").items()
    }
    assert recorded["algorithm"] == "sha256" and set(recorded["arrays"]) == set(flat)
    kernel = flat["params/backbone/conv1/kernel"]
    header = f"{kernel.dtype.str}{kernel.shape}".encode()
    assert recorded["arrays"]["params/backbone/conv1/kernel"] == (
        hashlib.sha256(header + kernel.tobytes()).hexdigest()
    )
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    assert recorded["json"]["meta"] == hashlib.sha256(canonical).hexdigest()


@pytest.fixture
def damaged_copy(training_workdir, tmp_path):
    """A copy of the two-step training workdir, to damage; and the states it holds."""
    workdir, config, _, states = training_workdir
    return copy_workdir(workdir, tmp_path / "copy"), config, states


DAMAGE = {
    "truncated": lambda d: truncate(largest_array_file(d)),
    "bytes_overwritten": lambda d: overwrite_middle(largest_array_file(d)),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_newest_step_is_named_and_the_step_before_it_is_used(damaged_copy, how, caplog):
    workdir, config, states = damaged_copy
    step_dir = workdir / "checkpoints" / "20"
    DAMAGE[how](step_dir)
    with caplog.at_level(logging.WARNING):
        restored, _ = store.restore_inference(workdir, config)
    assert_trees_equal(restored, states[10][0])
    assert re.search(rf"{step_dir}: checkpoint step 20 is damaged: array params/\S+", caplog.text)
    assert "using step 10, the newest intact step" in caplog.text
    # Given the step itself: one line naming the step and the array, no fallback.
    with pytest.raises(store.CheckpointDamagedError) as info:
        store.restore_inference(step_dir, config)
    assert re.match(
        rf"{step_dir}: checkpoint step 20 is damaged: array params/\S+", str(info.value)
    )
    assert "\n" not in str(info.value)


def test_values_that_differ_from_their_checksum_name_the_array(tmp_path, monkeypatch):
    """A restore that reads without error but gives other values (a bit flip in stored data
    that still decompresses): recorded here by hashing other values than those saved."""
    config = tiny_config()
    variables = random_variables(config)
    hash_of = store.checksums

    def altered_checksums(arrays, json_items):
        changed = jax.tree.map(np.copy, arrays)
        changed["params"]["bbox_head"]["conv_cls"]["bias"][3] += 1e-3
        return hash_of(changed, json_items)

    monkeypatch.setattr(store, "checksums", altered_checksums)
    meta = store.make_meta(config, "test", classes=COCO)
    store.save_converted(tmp_path, variables["params"], variables["batch_stats"], meta)
    with pytest.raises(
        store.CheckpointDamagedError,
        match=r"step 0 is damaged: array params/bbox_head/conv_cls/bias differs from its checksum",
    ):
        store.restore_weights(tmp_path)


@pytest.mark.parametrize("file", ["meta/metadata", "params/_METADATA", "checksums/metadata"])
def test_garbage_in_a_json_file_of_a_step_names_the_file(damaged_copy, file, caplog):
    workdir, config, states = damaged_copy
    step_dir = workdir / "checkpoints" / "20"
    write_garbage(step_dir / file)
    with caplog.at_level(logging.WARNING):
        restored, _ = store.restore_inference(workdir, config)
    assert_trees_equal(restored, states[10][0])
    assert f"{step_dir / file}: not valid JSON" in caplog.text
    with pytest.raises(store.CheckpointDamagedError, match=f"{step_dir / file}: not valid"):
        store.restore_weights(step_dir)


def test_an_edited_meta_differs_from_its_checksum(damaged_copy):
    workdir, config, _ = damaged_copy
    path = workdir / "checkpoints" / "20" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(dict(meta, config_name="edited")))
    with pytest.raises(store.CheckpointDamagedError, match="meta differs from its checksum"):
        store.restore_weights(workdir, 20)


def test_a_training_restore_skips_damaged_steps_and_reports_them(damaged_copy):
    workdir, config, states = damaged_copy
    truncate(largest_array_file(workdir / "checkpoints" / "20"))
    shapes = store.abstract_variables(config.model)
    opt_shapes = jax.eval_shape(optax.sgd(0.1, momentum=0.9).init, shapes["params"])
    manager = store.checkpoint_manager(workdir, create=False)
    step, restored, damaged = store.restore_training(
        manager, shapes["params"], shapes["batch_stats"], opt_shapes
    )
    assert step == 10 and [s for s, _ in damaged] == [20]
    assert "array params/" in damaged[0][1]
    assert_trees_equal(restored["opt_state"], states[10][1])
    truncate(largest_array_file(workdir / "checkpoints" / "10", "params"))
    with pytest.raises(
        store.CheckpointDamagedError, match=r"every checkpoint step is damaged \(20, 10\)"
    ):
        store.restore_training(manager, shapes["params"], shapes["batch_stats"], opt_shapes)


def test_a_step_written_before_checksums_loads_with_a_warning(tmp_path, caplog):
    """Format 1, as saved before steps had a `checksums` item: no checksums, a warning, the
    values as stored. A format-2 step without its checksums is damaged."""
    config = tiny_config()
    variables = random_variables(config, seed=9)
    meta = dict(store.make_meta(config, "before checksums", classes=COCO), format_version=1)
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "batch_stats": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    root = tmp_path / "old" / "checkpoints"
    manager = ocp.CheckpointManager(root, item_handlers=handlers)
    manager.save(
        3,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(variables["params"]),
            batch_stats=ocp.args.StandardSave(variables["batch_stats"]),
            meta=ocp.args.JsonSave(meta),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    with caplog.at_level(logging.WARNING):
        restored, _ = store.restore_inference(tmp_path / "old", config)
    assert_trees_equal(restored, variables)
    assert f"{root / '3'}: written before checkpoints carried checksums" in caplog.text
    current = tmp_path / "current"
    store.save_converted(
        current,
        variables["params"],
        variables["batch_stats"],
        store.make_meta(config, "x", classes=COCO),
    )
    shutil.rmtree(current / "checkpoints" / "0" / "checksums")
    with pytest.raises(store.CheckpointDamagedError, match="checksums item is missing"):
        store.restore_inference(current, config)


# --- a checkpoint of another config -------------------------------------------------------------


def test_a_checkpoint_of_another_config_name_is_refused_unless_allowed(converted_dir):
    directory, variables = converted_dir
    renamed = tiny_config()
    renamed.name = "renamed"
    with pytest.raises(store.CheckpointError) as info:
        store.restore_inference(directory, renamed)
    message = str(info.value)
    assert "holds a checkpoint of config 'tiny', not 'renamed'" in message
    assert "allow_other_config_name" in message and "\n" not in message
    restored, meta = store.restore_inference(directory, renamed, allow_other_config_name=True)
    assert_trees_equal(restored, variables)
    assert meta["config_name"] == "tiny"
    # Another architecture is refused whatever the name.
    other = tiny_config(feat_channels=8)
    with pytest.raises(store.CheckpointError, match="does not fit the model"):
        store.restore_inference(directory, other, allow_other_config_name=True)
