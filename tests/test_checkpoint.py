"""fcos_jax.checkpoint: converted and training checkpoints, inference restore, mismatch errors."""

import jax
import numpy as np
import optax
import pytest

from fcos_jax import checkpoint, config_base


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
    shapes = checkpoint.abstract_variables(config.model)
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
    meta = checkpoint.make_meta(config, "test: random")
    root = checkpoint.save_converted(directory, variables["params"], variables["batch_stats"], meta)
    assert root == directory / "checkpoints" and (root / "0").is_dir()
    return directory, variables


def test_save_converted_then_restore_inference_round_trips(converted_dir):
    directory, variables = converted_dir
    restored, meta = checkpoint.restore_inference(directory, tiny_config())
    assert_trees_equal(restored, variables)
    assert isinstance(restored["params"]["bbox_head"]["scales_0"]["scale"], jax.Array)
    assert restored["params"]["bbox_head"]["scales_0"]["scale"].shape == ()
    assert meta["config_name"] == "tiny" and meta["source"] == "test: random"
    assert meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["parts"] == ["backbone", "neck", "bbox_head"]
    assert meta["classes"][:2] == [[1, "person"], [2, "bicycle"]] and len(meta["classes"]) == 80


def test_restore_inference_accepts_the_checkpoints_directory_itself(converted_dir):
    directory, variables = converted_dir
    restored, _ = checkpoint.restore_inference(directory / "checkpoints", tiny_config())
    assert_trees_equal(restored, variables)


def test_checkpoint_of_another_model_is_refused_naming_path_keys_and_shapes(converted_dir):
    directory, _ = converted_dir
    other = tiny_config(norm="none", num_classes=80)
    other.model.fpn.out_channels = 32
    other.name = "other"
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore_inference(directory, other)
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
    meta = checkpoint.make_meta(config, "backbone: r18.pth", parts=("backbone",))
    checkpoint.save_converted(tmp_path, backbone_only["params"], backbone_only["batch_stats"], meta)
    with pytest.raises(checkpoint.CheckpointError, match="holds only backbone weights.*init_from"):
        checkpoint.restore_inference(tmp_path, config)
    # ... but its weights restore as stored, for config.init_from.
    restored, meta = checkpoint.restore_weights(tmp_path)
    assert_trees_equal(restored, backbone_only)
    assert meta["parts"] == ["backbone"]


def test_save_converted_refuses_a_non_empty_directory(converted_dir):
    directory, variables = converted_dir
    with pytest.raises(checkpoint.CheckpointError, match="already exists"):
        checkpoint.save_converted(directory, variables["params"], variables["batch_stats"], {})


def test_path_without_checkpoint_is_named(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=f"{tmp_path}/nothing: no such"):
        checkpoint.restore_inference(tmp_path / "nothing", tiny_config())
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint directory"):
        checkpoint.restore_inference(tmp_path, tiny_config())


def test_meta_refuses_class_list_that_does_not_fit_the_head():
    with pytest.raises(checkpoint.CheckpointError, match="has 80 classes.*num_classes is 3"):
        checkpoint.make_meta(tiny_config(num_classes=3), "x")


@pytest.fixture(scope="module")
def training_workdir(tmp_path_factory):
    """Two full training checkpoints (steps 10 and 20) written through the train-state hooks."""
    config = tiny_config()
    workdir = tmp_path_factory.mktemp("workdir")
    tx = optax.sgd(0.1, momentum=0.9)
    manager = checkpoint.checkpoint_manager(workdir, max_to_keep=3)
    states = {}
    for step, seed in ((10, 1), (20, 2)):
        variables = random_variables(config, seed)
        # optax's state structure with distinct NumPy values (no per-shape JAX compiles).
        opt_shapes = jax.eval_shape(tx.init, variables["params"])
        opt_state = jax.tree.map(lambda x, s=seed: np.full(x.shape, s, x.dtype), opt_shapes)
        data_state = {"epoch": step // 10, "position": step}
        meta = checkpoint.make_meta(config, "training")
        checkpoint.save(
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
    restored, meta = checkpoint.restore_inference(workdir, config)
    assert_trees_equal(restored, states[20][0])
    assert meta["source"] == "training"


def test_restore_latest_returns_the_full_train_state(training_workdir):
    workdir, config, tx, states = training_workdir
    shapes = checkpoint.abstract_variables(config.model)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )
    abstract_opt = abstract(jax.eval_shape(tx.init, shapes["params"]))
    manager = checkpoint.checkpoint_manager(workdir, create=False)
    step, restored = checkpoint.restore_latest(
        manager, abstract(shapes["params"]), abstract(shapes["batch_stats"]), abstract_opt
    )
    variables, opt_state, data_state = states[20]
    assert step == 20
    assert_trees_equal(restored["params"], variables["params"])
    assert_trees_equal(restored["batch_stats"], variables["batch_stats"])
    assert isinstance(restored["opt_state"][0], optax.TraceState)
    assert_trees_equal(restored["opt_state"], opt_state)
    assert restored["data_state"] == data_state and restored["meta"]["config_name"] == "tiny"


def test_restore_latest_of_a_fresh_workdir_is_none(tmp_path):
    manager = checkpoint.checkpoint_manager(tmp_path)
    assert checkpoint.restore_latest(manager, {}, {}, {}) is None


def test_restore_latest_of_a_converted_directory_names_missing_items(converted_dir):
    directory, _ = converted_dir
    manager = checkpoint.checkpoint_manager(directory, create=False)
    with pytest.raises(checkpoint.CheckpointError, match="lacks the item.*opt_state, data_state"):
        checkpoint.restore_latest(manager, {}, {}, {})
