"""compile_options: on XLA:CPU convolutions leave YNNPACK (matrix products stay), the values are
torch's, and every program of the library is compiled with the options."""

import collections
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fcos_jax import inference
from fcos_jax.config import load_config
from fcos_jax.detection import postprocess
from fcos_jax.evaluation import evaluator
from fcos_jax.parallel import sharding
from fcos_jax.training import train_step
from fcos_jax.utils import compile_options

CPU = jax.devices("cpu")[0]  # the options are XLA:CPU's; every JAX install has this backend
CPU_OPTIONS = compile_options.compiler_options("cpu")


def grouped_conv_and_product(x, kernel, w):
    """A ResNeXt-style grouped 3x3 convolution (8 groups of 4 channels), a matrix product and a
    reduction (as BN's statistics and gradients)."""
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=8,
    )
    return y, y.reshape(-1, 32) @ w, jnp.sum(jnp.square(x), axis=(0, 1, 2))


def operands():
    """x [2, 9, 11, 32], kernel [3, 3, 4, 32], w [32, 16], on the CPU device."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 11, 32), dtype=np.float32)
    kernel = rng.standard_normal((3, 3, 4, 32), dtype=np.float32)
    w = rng.standard_normal((32, 16), dtype=np.float32)
    return tuple(jax.device_put(a, CPU) for a in (x, kernel, w))


def ynn_fusions(compiled_text: str) -> collections.Counter:
    """The YNNPACK fusions of a compiled module's entry computation, by the JAX primitive that
    issued them (the last component of the op_name)."""
    entry = compiled_text[compiled_text.index("\nENTRY") :]
    names = re.findall(r'op_name="[^"]*/(\w+)".*"__ynn_fusion"', entry)
    return collections.Counter(names)


def test_convolutions_leave_ynnpack_the_rest_stays():
    args = operands()
    default = ynn_fusions(jax.jit(grouped_conv_and_product).lower(*args).compile().as_text())
    tuned = jax.jit(grouped_conv_and_product, compiler_options=CPU_OPTIONS).lower(*args).compile()
    tuned = ynn_fusions(tuned.as_text())
    # Without the options YNNPACK takes the convolution too (what the options are for; should a
    # jaxlib stop doing so, this says the options may go).
    assert default["conv_general_dilated"] == 1
    assert default["dot_general"] == 1 and default["reduce_sum"] == 1
    assert tuned == default - collections.Counter(["conv_general_dilated"])


def test_values_with_the_options_are_torchs():
    x, kernel, w = operands()
    fn = jax.jit(grouped_conv_and_product, compiler_options=CPU_OPTIONS)
    y, product, _ = fn(x, kernel, w)
    x, kernel, w = (np.array(a) for a in (x, kernel, w))  # writable, for torch.from_numpy
    ty = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(kernel).permute(3, 2, 0, 1),
        padding=1,
        groups=8,
    ).permute(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(y), ty.numpy(), rtol=0, atol=1e-5 * ty.abs().max())
    tp = ty.reshape(-1, 32) @ torch.from_numpy(w)
    np.testing.assert_allclose(np.asarray(product), tp.numpy(), rtol=0, atol=1e-5 * tp.abs().max())


def test_no_options_off_cpu():
    assert compile_options.compiler_options("gpu") is None
    assert compile_options.compiler_options("tpu") is None


BOGUS = {compile_options.YNN_FUSION_TYPES: "NOT_A_FUSION_TYPE"}


@pytest.fixture
def bogus_options(monkeypatch):
    """compiler_options() returns an invalid value: a program compiled with it fails naming it,
    which shows the program was given the library's options."""
    monkeypatch.setattr(compile_options, "compiler_options", lambda backend=None: BOGUS)


def compiles_with_the_options(jitted, *args) -> bool:
    """Whether compiling `jitted` for `args` (arrays or jax.ShapeDtypeStruct) fails on BOGUS."""
    try:
        jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as error:
        return "NOT_A_FUSION_TYPE" in str(error)
    return False


def test_train_eval_and_inference_programs_are_compiled_with_the_options(bogus_options):
    config = load_config("configs/tiny.py")
    mesh = sharding.make_mesh()
    n = jax.device_count()
    image = jax.ShapeDtypeStruct((n, 64, 64, 3), jnp.float32)

    step = train_step.jit_train_step(lambda state, batch: (state, {"loss": batch.sum()}), mesh)
    assert compiles_with_the_options(step, {"w": jnp.ones(2)}, jnp.ones((n, 2)))

    model_json = config.model.to_json(sort_keys=True)
    options = json.dumps(postprocess.options_from_config(config), sort_keys=True)
    model, forward, detect = inference._programs.__wrapped__(model_json, options)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)
    assert compiles_with_the_options(forward, variables, image)
    head_outputs = jax.eval_shape(model.apply, variables, image)
    int_pair = jax.ShapeDtypeStruct((n, 2), jnp.int32)
    scale = jax.ShapeDtypeStruct((n, 2), jnp.float32)
    assert compiles_with_the_options(detect, head_outputs, int_pair, scale, int_pair)

    pair = jax.ShapeDtypeStruct((n, 2), jnp.float32)
    batch = dict(image=image, image_hw=pair, scale=pair, original_hw=pair)
    batch.update(image_id=jax.ShapeDtypeStruct((n,), jnp.int32))
    batch.update(example_valid=jax.ShapeDtypeStruct((n,), jnp.bool_))
    assert compiles_with_the_options(evaluator.make_predict_step(config, mesh), variables, batch)
