"""fcos_jax.training.trainer.TrainCheckpoints: the state a run starts from and the states it saves.

The expected values are the stored arrays themselves and a fresh initialisation from the same
seed, built with `model.init` outside the class under test.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from damage_helpers import largest_array_file, overwrite_middle
from flax import traverse_util
from test_checkpoint import random_variables, tiny_config

from fcos_jax.checkpoint import store
from fcos_jax.models import build_model
from fcos_jax.parallel import sharding
from fcos_jax.training.trainer import TrainCheckpoints

IMAGE_HW = (64, 64)


def class_list(n: int) -> list[tuple[int, str]]:
    return [(i + 1, f"class{i}") for i in range(n)]


CLASSES = class_list(3)


def run_config(num_classes: int = 3):
    config = tiny_config(num_classes=num_classes)
    config.seed = 7
    return config


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@functools.cache
def fresh_variables() -> dict:
    """The run's own initialisation: the model's init from `config.seed` (jitted, as training
    initialises; eager sampling differs in the last bit)."""
    config = run_config()
    model = build_model(config.model)
    image = jnp.zeros((1, *IMAGE_HW, 3), jnp.float32)
    return jax.jit(model.init)(jax.random.PRNGKey(config.seed), image)


def start(config, workdir):
    model = build_model(config.model)
    optimizer = optax.sgd(0.01, momentum=0.9)
    checkpoints = TrainCheckpoints(workdir, config, CLASSES)
    try:
        return checkpoints.restore_or_initialize(
            model, optimizer, sharding.make_mesh(), IMAGE_HW
        ), optimizer
    finally:
        checkpoints.close()


@pytest.fixture(scope="module")
def five_class_source(tmp_path_factory):
    """A full checkpoint of the same model with a 5-class head (another conv_cls shape)."""
    config = tiny_config(num_classes=5)
    variables = random_variables(config, seed=3)
    directory = tmp_path_factory.mktemp("init_source")
    meta = store.make_meta(config, "test: 5 classes", classes=class_list(5))
    store.save_converted(directory, variables["params"], variables["batch_stats"], meta)
    return directory, variables


def test_init_from_takes_every_leaf_of_the_same_shape_and_keeps_the_others_fresh(
    five_class_source, tmp_path
):
    source, stored = five_class_source
    config = run_config()
    config.init_from = str(source)
    (step, state, data_state), _ = start(config, tmp_path / "run")
    assert step == 0 and data_state is None
    fresh = fresh_variables()
    for collection in ("params", "batch_stats"):
        got, want_stored = flat(getattr(state, collection)), flat(stored[collection])
        want_fresh = flat(fresh[collection])
        assert set(got) == set(want_fresh)
        reinitialized = []
        for key, value in got.items():
            if want_stored[key].shape == value.shape:
                np.testing.assert_array_equal(value, want_stored[key], err_msg=key)
            else:
                np.testing.assert_array_equal(value, want_fresh[key], err_msg=key)
                reinitialized.append(key)
        if collection == "params":
            # 3 vs 5 classes: only the classification conv differs in shape.
            assert reinitialized and all("conv_cls" in k for k in reinitialized), reinitialized
    # The optimizer starts from zero momentum on the merged parameters.
    for leaf in jax.tree.leaves(state.opt_state):
        np.testing.assert_array_equal(np.asarray(leaf), 0)


def test_init_from_a_backbone_only_source_keeps_neck_and_head_initialized(tmp_path):
    config = run_config()
    stored = random_variables(config, seed=4)
    backbone_only = {k: {"backbone": v["backbone"]} for k, v in stored.items()}
    source = tmp_path / "backbone"
    meta = store.make_meta(config, "backbone: random", parts=("backbone",), classes=CLASSES)
    store.save_converted(source, backbone_only["params"], backbone_only["batch_stats"], meta)
    config.init_from = str(source)
    (_, state, _), _ = start(config, tmp_path / "run")
    fresh = flat(fresh_variables()["params"])
    got, want = flat(state.params), flat(backbone_only["params"])
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key] if key in want else fresh[key], key)
    assert any(not k.startswith("backbone/") for k in got)


def test_init_from_a_source_with_leaves_this_model_lacks_is_refused(tmp_path):
    config = run_config()
    stored = random_variables(config, seed=5)
    stored["params"]["extra_head"] = {"kernel": np.ones((3, 3), np.float32)}
    source = tmp_path / "other_model"
    meta = store.make_meta(config, "test: extra leaf", classes=CLASSES)
    store.save_converted(source, stored["params"], stored["batch_stats"], meta)
    config.init_from = str(source)
    with pytest.raises(ValueError, match=r"config.init_from=.*other_model.*extra_head/kernel"):
        start(config, tmp_path / "run")


def test_a_saved_state_is_what_the_next_run_starts_from(five_class_source, tmp_path):
    config = run_config()
    workdir = tmp_path / "run"
    (_, state, _), optimizer = start(config, workdir)
    rng = np.random.default_rng(0)
    moved = jax.tree.map(
        lambda x: (np.asarray(x) + rng.standard_normal(x.shape)).astype(np.float32), state.params
    )
    state = state.replace(step=np.int32(12), params=moved, opt_state=optimizer.init(moved))
    checkpoints = TrainCheckpoints(workdir, config, CLASSES)
    checkpoints.save(12, state, {"epoch": 1, "position": 5})
    checkpoints.wait_until_finished()
    checkpoints.close()
    # A resumed run ignores init_from: the workdir's checkpoint wins.
    config.init_from = str(five_class_source[0])
    (step, resumed, data_state), _ = start(config, workdir)
    assert step == 12 and data_state == {"epoch": 1, "position": 5}
    for key, value in flat(moved).items():
        np.testing.assert_array_equal(flat(resumed.params)[key], value.astype(np.float32), key)
    for got, want in zip(
        jax.tree.leaves(resumed.opt_state), jax.tree.leaves(state.opt_state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_another_configs_workdir_is_refused_naming_both(tmp_path):
    config = run_config()
    workdir = tmp_path / "run"
    (_, state, _), _ = start(config, workdir)
    checkpoints = TrainCheckpoints(workdir, config, CLASSES)
    checkpoints.save(1, state, {"epoch": 0, "position": 1})
    checkpoints.wait_until_finished()
    checkpoints.close()
    other = run_config()
    other.name = "another"
    with pytest.raises(store.CheckpointError, match="'tiny', not 'another'"):
        start(other, workdir)


def test_a_damaged_newest_step_is_moved_aside_and_the_step_before_it_resumed(tmp_path, caplog):
    config = run_config()
    workdir = tmp_path / "run"
    (_, state, _), optimizer = start(config, workdir)
    rng = np.random.default_rng(1)
    saved = {}
    checkpoints = TrainCheckpoints(workdir, config, CLASSES)
    for step in (3, 6):
        params = jax.tree.map(
            lambda x: (np.asarray(x) + rng.standard_normal(x.shape)).astype(np.float32),
            state.params,
        )
        saved[step] = params
        state = state.replace(params=params, opt_state=optimizer.init(params))
        checkpoints.save(step, state, {"epoch": 0, "position": step})
    checkpoints.wait_until_finished()
    checkpoints.close()
    overwrite_middle(largest_array_file(workdir / "checkpoints" / "6"))
    with caplog.at_level(logging.WARNING):
        (step, resumed, data_state), _ = start(config, workdir)
    assert step == 3 and data_state == {"epoch": 0, "position": 3}
    for key, value in flat(saved[3]).items():
        np.testing.assert_array_equal(flat(resumed.params)[key], value.astype(np.float32), key)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6.damaged"]
    assert "checkpoint step 6 is damaged: array params/" in caplog.text
    assert f"moved aside to {workdir / 'checkpoints' / '6.damaged'}" in caplog.text


def test_fewer_than_two_kept_checkpoints_is_refused(tmp_path):
    config = run_config()
    config.train.keep_checkpoints = 1
    with pytest.raises(ValueError, match="train.keep_checkpoints: expected >= 2, got 1"):
        TrainCheckpoints(tmp_path, config, CLASSES)
