"""layers.Conv and cpu_kernels.max_pool: values and gradients against torch.nn.functional (NCHW)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fcos_jax.models import cpu_kernels
from fcos_jax.models.cpu_kernels import max_pool
from fcos_jax.models.layers import Conv

# (height, width, in channels, out channels, kernel, stride, padding, groups): odd sizes so strided
# outputs drop border rows; 1x1 takes `cpu_kernels.pointwise` (one 2-D matrix product), larger
# ungrouped kernels XLA's convolution and its gradients (per-tap ones inside a loop: the loop test
# below);
# grouped cases have ResNeXt's 3x3 shape at group widths 4, 8 and 2 -> 3 (output width unequal to
# input width, so a transposed group layout would show): 4 and 2 -> 3 take the tap-sum path, 8 and
# 16 XLA's convolution; grouped kernel gradients are always per tap.
CASES = [
    (9, 12, 5, 7, 3, 1, 1, 1),
    (10, 13, 4, 6, 3, 2, 1, 1),
    (17, 15, 3, 8, 7, 2, 3, 1),
    (8, 8, 4, 4, 3, 1, 0, 1),
    (11, 9, 6, 5, 1, 2, 0, 1),
    (9, 12, 5, 7, 1, 1, 0, 1),
    (9, 12, 16, 16, 3, 1, 1, 4),
    (10, 13, 32, 32, 3, 2, 1, 4),
    (11, 10, 8, 12, 3, 2, 1, 4),
    (7, 9, 32, 32, 3, 2, 1, 2),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_conv_value_and_gradients_match_torch(case):
    h, w, cin, cout, k, stride, padding, groups = case
    assert cpu_kernels._uses_tap_kernel_gradient(groups) == (groups > 1)
    check_conv_against_torch(*case)


def _lowered_gradients(case, platforms: tuple[str, ...]) -> str:
    """StableHLO of Conv's value and both gradients for `case`, exported for `platforms`."""
    h, w, cin, cout, k, stride, padding, groups = case
    conv = Conv(cout, k, stride, padding, groups)

    def loss(x, kernel):
        return jnp.sum(conv.apply({"params": {"kernel": kernel}}, x) ** 2)

    specs = (
        jax.ShapeDtypeStruct((2, h, w, cin), jnp.float32),
        jax.ShapeDtypeStruct((k, k, cin // groups, cout), jnp.float32),
    )
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return jax.export.export(grad, platforms=platforms)(*specs).mlir_module()


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[6]], ids=["3x3", "7x7-s2", "grouped"])
def test_accelerator_kernels_are_xlas_own_and_match_torch(case):
    """Traced as for a GPU or TPU (`accelerator_kernels`): no per-tap kernel gradient and no tap
    sum, only XLA's convolution and its own gradients, with the same values."""
    with cpu_kernels.accelerator_kernels():
        check_conv_against_torch(*case)
        module = _lowered_gradients(case, ("cpu",))
    assert "stablehlo.while" not in module  # no per-tap loop
    assert module.count("stablehlo.convolution") == 3  # value, input and kernel gradient


def test_a_program_for_an_accelerator_holds_xlas_convolutions_whatever_the_host():
    """The grouped convolution (tap sum forward, per-tap kernel gradient on XLA:CPU) lowered on
    this CPU host for CUDA holds XLA's convolutions only; lowered for the CPU, the tuned forms;
    exported for both, both, each behind the platform index."""
    grouped = CASES[6]
    cuda = _lowered_gradients(grouped, ("cuda",))
    cpu = _lowered_gradients(grouped, ("cpu",))
    both = _lowered_gradients(grouped, ("cpu", "cuda"))
    assert "stablehlo.while" not in cuda and cuda.count("stablehlo.convolution") == 3
    assert "stablehlo.while" in cpu and "stablehlo.convolution" not in cpu
    assert "stablehlo.while" in both and both.count("stablehlo.convolution") >= 3
    assert "_platform_index" in both


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_conv_gradients_traced_for_a_loop_match_torch(case):
    """Inside `inside_a_loop` (gradient accumulation's micro-batch scan) every kernel gradient is
    the per-tap one and ungrouped input gradients are per-tap products added into their windows:
    the same values as torch's."""
    h, w, cin, cout, k, stride, padding, groups = case
    with cpu_kernels.inside_a_loop():
        assert cpu_kernels._uses_tap_kernel_gradient(groups)
        check_conv_against_torch(*case)
    assert not cpu_kernels._uses_tap_kernel_gradient(1)  # the context ended


def check_conv_against_torch(h, w, cin, cout, k, stride, padding, groups):
    """Conv's value, input gradient and kernel gradient equal torch's conv2d (1e-5 of max)."""
    rng = np.random.default_rng(k * 100 + stride * 10 + groups)
    x = rng.normal(size=(2, h, w, cin)).astype(np.float32)
    kernel = rng.normal(size=(k, k, cin // groups, cout)).astype(np.float32)
    conv = Conv(cout, k, stride, padding, groups)

    def apply(x_, kernel_):
        return conv.apply({"params": {"kernel": kernel_}}, x_)

    y = apply(jnp.asarray(x), jnp.asarray(kernel))
    dy = rng.normal(size=y.shape).astype(np.float32)
    dx, dkernel = jax.grad(lambda a, b: jnp.sum(apply(a, b) * dy), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(kernel)
    )

    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tk = torch.tensor(kernel.transpose(3, 2, 0, 1), requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tk, stride=stride, padding=padding, groups=groups)
    (ty * torch.tensor(dy.transpose(0, 3, 1, 2))).sum().backward()

    def close(ours, theirs):
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-5 * scale)

    close(y, ty.detach().numpy().transpose(0, 2, 3, 1))
    close(dx, tx.grad.numpy().transpose(0, 2, 3, 1))
    close(dkernel, tk.grad.numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize(
    "h, w, k, stride, padding, ties",
    [
        (9, 12, 3, 2, 1, False),
        (10, 13, 3, 2, 1, True),
        (8, 7, 2, 2, 0, True),
        (7, 9, 3, 1, 1, True),
    ],
)
def test_max_pool_value_and_gradient_match_torch(h, w, k, stride, padding, ties):
    """Ties (ReLU zeros, repeated integers) must route the gradient to the window's first
    maximum in row-major order, as torch's max_pool2d index does."""
    rng = np.random.default_rng(h * w + k)
    if ties:
        x = np.maximum(rng.integers(-2, 3, size=(2, h, w, 3)), 0).astype(np.float32)
    else:
        x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    y = max_pool(jnp.asarray(x), k, stride, padding)
    dy = rng.normal(size=y.shape).astype(np.float32)
    dx = jax.grad(lambda a: jnp.sum(max_pool(a, k, stride, padding) * dy))(jnp.asarray(x))

    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, k, stride, padding)
    (ty * torch.tensor(dy.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_array_equal(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(
        np.asarray(dx), tx.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6
    )
