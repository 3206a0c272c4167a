"""Checkpoint checksums (fcos_jax.checkpoint.store): digests, comparisons, read errors."""

import hashlib

import numpy as np
import optax

from fcos_jax.checkpoint import store


def test_array_digest_is_sha256_of_dtype_shape_and_c_order_bytes():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = hashlib.sha256(b"<f4(2, 3)" + array.tobytes()).hexdigest()
    assert store.array_digest(array) == expected
    assert store.array_digest(np.asfortranarray(array)) == expected  # values, not layout
    assert store.array_digest(array.reshape(3, 2)) != expected
    assert store.array_digest(array.astype(np.float64)) != expected


def test_leaves_of_an_optax_state_are_named_by_their_place():
    params = {"conv": {"kernel": np.zeros((2, 2), np.float32)}}
    state = optax.sgd(0.1, momentum=0.9).init(params)
    names = [name for name, _ in store.named_leaves("opt_state", state)]
    assert names == ["opt_state/0/trace/conv/kernel"]


def test_mismatches_name_changed_missing_and_unrecorded_arrays_and_json():
    arrays = {"params": {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}}
    recorded = store.checksums(arrays, {"meta": {"x": 1}})
    assert store.mismatches(recorded, arrays, {"meta": {"x": 1}}) == []
    changed = {"params": {"a": np.ones(3, np.float32) * 2, "c": np.zeros(1, np.float32)}}
    assert store.mismatches(recorded, changed, {"meta": {"x": 2}}) == [
        "array params/a differs from its checksum",
        "array params/c has no checksum",
        "array params/b is missing",
        "meta differs from its checksum",
    ]
    # Only the items restored are compared (inference restores no opt_state).
    with_opt = store.checksums({**arrays, "opt_state": {"m": np.ones(1)}}, {})
    assert store.mismatches(with_opt, arrays, {}) == []


def test_read_error_finds_the_array_in_tensorstores_chained_error():
    inner = ValueError(
        'OUT_OF_RANGE: Error reading "backbone.layer2_0.conv2.kernel/0.0.0.0" in OCDBT '
        'database at local file "/w/checkpoints/5/params/": Requested byte range [7, 9) is not '
        "valid for value of size 3"
    )
    try:
        try:
            raise inner
        except ValueError as error:
            raise Exception("Encountered error while reading array index: ...") from error
    except Exception as outer:  # noqa: BLE001
        array, detail = store.read_error(outer)
    assert array == "params/backbone/layer2_0/conv2/kernel"
    assert detail.startswith("OUT_OF_RANGE: Error reading")
    assert store.read_error(RuntimeError("something else")) == (None, "something else")
