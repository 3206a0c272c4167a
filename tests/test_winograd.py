"""models.winograd: F(2x2, 3x3) and F(4x4, 3x3) against torch.nn.functional.conv2d, and where
`cpu_kernels.conv2d` uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fcos_jax.models import cpu_kernels, layers, winograd


def torch_conv3x3(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """NHWC x HWIO, stride 1, padding 1, in float64 (the reference)."""
    y = torch.nn.functional.conv2d(
        torch.tensor(np.asarray(x)).double().permute(0, 3, 1, 2),
        torch.tensor(np.asarray(kernel)).double().permute(3, 2, 0, 1),
        padding=1,
    )
    return y.permute(0, 2, 3, 1).numpy()


# F(2, 3) rounds like a direct convolution; F(4, 3)'s transforms lose about 20x more in float32.
@pytest.mark.parametrize(
    "transforms, tolerance", [(winograd.F2X3, 2e-6), (winograd.F4X3, 5e-5)], ids=["F2", "F4"]
)
@pytest.mark.parametrize("h, w", [(8, 8), (9, 14), (5, 3), (1, 1)])
def test_winograd_equals_torch_conv(transforms, tolerance, h, w):
    """Any height and width (not only multiples of the tile), 2 images, 6 -> 5 channels."""
    rng = np.random.default_rng(h * 100 + w)
    x = rng.standard_normal((2, h, w, 6)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 6, 5)).astype(np.float32)
    ours = winograd.conv3x3(
        jnp.asarray(x), winograd.kernel_transform(jnp.asarray(kernel), transforms), transforms
    )
    ref = torch_conv3x3(x, kernel)
    assert ours.shape == ref.shape
    assert np.abs(np.asarray(ours) - ref).max() <= tolerance * np.abs(ref).max()


def test_conv2d_takes_winograd_for_wide_large_float32_3x3_only(monkeypatch):
    """The forward of a wide 3x3 convolution is F(4, 3) on XLA:CPU (float32, stride 1, padding 1,
    ungrouped, enough positions), its value torch's and its gradients XLA's exact ones."""
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_MIN_CHANNELS", 8)
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_MIN_POSITIONS", 12 * 11)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 12, 11, 8)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32)
    uses = cpu_kernels._uses_winograd
    assert uses(x, kernel.shape, 1, 1, 1)
    assert not uses(x[:, :-1], kernel.shape, 1, 1, 1)  # fewer positions
    assert uses(x[:1], kernel.shape, 1, 1, 1)  # per image: the batch does not decide
    assert not uses(x, (3, 3, 8, 4), 1, 1, 1)  # narrower output
    assert not uses(x, kernel.shape, 2, 1, 1) and not uses(x, kernel.shape, 1, 0, 1)
    assert not uses(x, (3, 3, 4, 8), 1, 1, 2)  # grouped
    assert not uses(x.astype(jnp.bfloat16), kernel.shape, 1, 1, 1)

    forward = jax.jit(lambda x_, k_: cpu_kernels.conv2d(x_, k_, 1, 1))
    assert "convolution" not in forward.lower(x, kernel).as_text()  # Winograd: matrix products
    # Lowered for an accelerator (here on the CPU host), or traced as one: XLA's convolution.
    for_cuda = jax.export.export(forward, platforms=("cuda",))(x, kernel).mlir_module()
    assert "stablehlo.convolution" in for_cuda and "dot_general" not in for_cuda
    with cpu_kernels.accelerator_kernels():
        portable = jax.jit(
            lambda x_, k_: layers.Conv(8, 3, 1, 1).apply({"params": {"kernel": k_}}, x_)
        )
        assert "convolution" in portable.lower(x, kernel).as_text()

    weights = jnp.asarray(rng.standard_normal((2, 12, 11, 8)), jnp.float32)
    y, (dx, dk) = jax.value_and_grad(
        lambda x_, k_: jnp.sum(cpu_kernels.conv2d(x_, k_, 1, 1) * weights), argnums=(0, 1)
    )(x, kernel)
    xt = torch.from_numpy(np.array(x)).double().permute(0, 3, 1, 2).requires_grad_()
    kt = torch.from_numpy(np.array(kernel)).double().permute(3, 2, 0, 1).requires_grad_()
    wt = torch.from_numpy(np.array(weights)).double().permute(0, 3, 1, 2)
    yt = (torch.nn.functional.conv2d(xt, kt, padding=1) * wt).sum()
    yt.backward()
    assert abs(float(y) - yt.item()) <= 5e-5 * abs(yt.item()) + 1e-3
    dx_ref = xt.grad.permute(0, 2, 3, 1).numpy()
    dk_ref = kt.grad.permute(2, 3, 1, 0).numpy()
    assert np.abs(np.asarray(dx) - dx_ref).max() <= 1e-5 * np.abs(dx_ref).max()
    assert np.abs(np.asarray(dk) - dk_ref).max() <= 1e-5 * np.abs(dk_ref).max()


@pytest.mark.parametrize(
    "min_positions, winograd_expected", [(12 * 11, True), (2 * 12 * 11, False)]
)
def test_conv2d_with_a_symbolic_batch_decides_as_with_a_concrete_one(
    monkeypatch, min_positions, winograd_expected
):
    """`jax.export` with a symbolic batch (the serving artifacts) traces the forward a concrete
    batch takes: the choice reads the image size only (a threshold above one image's positions
    once made `batch * positions >= threshold` an undecidable comparison)."""
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_MIN_CHANNELS", 8)
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_MIN_POSITIONS", min_positions)
    kernel = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 8, 8)), jnp.float32)
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, 12, 11, 8), jnp.float32)
    exported = jax.export.export(jax.jit(lambda x_: cpu_kernels.conv2d(x_, kernel, 1, 1)))(spec)
    assert ("convolution" not in exported.mlir_module()) == winograd_expected
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 12, 11, 8)), jnp.float32)
    assert cpu_kernels._uses_winograd(x, kernel.shape, 1, 1, 1) == winograd_expected
    np.testing.assert_allclose(
        exported.call(x), torch_conv3x3(np.asarray(x), np.asarray(kernel)), rtol=0, atol=1e-4
    )
