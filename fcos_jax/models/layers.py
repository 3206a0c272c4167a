"""Flax layers shared by backbone, neck and head: convolution and normalization.

Kernels are HWIO float32 parameters; computation runs in the module's `dtype`. What a
convolution computes on each backend (XLA:CPU's tuned forms, XLA's own elsewhere) is
`cpu_kernels`'s.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fcos_jax.models import cpu_kernels

Dtype = Any
Initializer = Callable[..., jax.Array]

BN_EPS = 1e-5
GN_EPS = 1e-5


class Conv(nn.Module):
    """2-D convolution with PyTorch semantics (symmetric zero padding, groups).

    Input `[B, H, W, Cin]`, output `[B, H', W', features]`, H' = floor((H + 2p - k) / s) + 1.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"{self.name}: {in_features} input channels not divisible by groups")
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, in_features // self.groups, self.features)
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if k == 1 and self.groups == 1 and self.padding == 0:
            if self.stride > 1:
                x = x[:, :: self.stride, :: self.stride, :]
            y = cpu_kernels.pointwise(x, kernel[0, 0])
        else:
            portable = cpu_kernels.portable_only()
            y = cpu_kernels.conv2d(x, kernel, self.stride, self.padding, self.groups, portable)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,))
            y = y + bias.astype(self.dtype)
        return y


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference mode: running `mean`/`var` in `batch_stats`, affine in `params`.

    y = (x - mean) / sqrt(var + eps) * scale + bias, eps 1e-5 (mmdet and torchvision).
    The statistics are never updated; whether the affine trains is the optimizer's decision.
    """

    epsilon: float = BN_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,))
        bias = self.param("bias", nn.initializers.zeros_init(), (c,))
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32).value
        var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32).value
        mul = scale * lax.rsqrt(var + self.epsilon)
        add = bias - mean * mul
        return (x * mul.astype(self.dtype) + add.astype(self.dtype)).astype(self.dtype)


def make_batch_norm(
    kind: str, train: bool, dtype: Dtype, name: str, batch_axis: str | None = None
) -> nn.Module:
    """The backbone's norm layer: `frozen_bn` (pretrained, inference mode) or `batch_stats_bn`.

    `batch_stats_bn` normalises with statistics of the (global) batch when `train` and with its
    running averages otherwise; it is for backbones trained from scratch, where no pretrained
    statistics exist. batch_axis: the mesh axis its statistics are averaged over when each
    device runs the model on its own shard of the batch (inside `jax.shard_map`).
    """
    if kind == "frozen_bn":
        return FrozenBatchNorm(dtype=dtype, name=name)
    if kind == "batch_stats_bn":
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=BN_EPS,
            dtype=dtype,
            use_fast_variance=False,
            axis_name=batch_axis,
            name=name,
        )
    raise ValueError(f"model.backbone.norm: unknown norm {kind!r} (frozen_bn, batch_stats_bn)")


def group_norm(groups: int, dtype: Dtype, name: str) -> nn.Module:
    """GroupNorm with PyTorch semantics (biased variance, eps 1e-5, per-channel affine)."""
    return nn.GroupNorm(
        num_groups=groups, epsilon=GN_EPS, dtype=dtype, use_fast_variance=False, name=name
    )


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest resize `[B, h, w, C]` -> `[B, H, W, C]` (PyTorch 'nearest': source floor(i*h/H))."""
    h, w = x.shape[1:3]
    out_h, out_w = size
    if out_h == 2 * h and out_w == 2 * w:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(out_h) * h) // out_h
    cols = (jnp.arange(out_w) * w) // out_w
    return x[:, rows][:, :, cols]
