"""ResNet and ResNeXt backbones (caffe and pytorch styles) returning C2..C5.

Layout and names follow mmdetection's `ResNet`/`ResNeXt` (docs/modes.md §2.2): `conv1`/`bn1`
stem, 7x7/2 conv and 3x3/2 max-pool; stages `layer{i}_{j}` with `conv1..3`, `bn1..3` and on the
first block `downsample_conv`/`downsample_bn`. caffe style puts the stride on the 1x1 `conv1`,
pytorch style on the 3x3 `conv2`. No backbone convolution has a bias.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcos_jax.models.cpu_kernels import max_pool
from fcos_jax.models.layers import Conv, Dtype, make_batch_norm

# depth -> (block type, blocks per stage), as mmdetection's and torchvision's ResNets define them
ARCHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STYLES = ("caffe", "pytorch")


def _add_shortcut(x: jax.Array, out: jax.Array, stride: int, bn, dtype: Dtype) -> jax.Array:
    """relu(out + shortcut(x)): x itself, or a strided 1x1 conv + BN (`downsample_*`) where the
    shape changes. Called inside a block's compact `__call__`, so its modules are the block's."""
    channels = out.shape[-1]
    if stride != 1 or x.shape[-1] != channels:
        x = Conv(channels, 1, stride, dtype=dtype, name="downsample_conv")(x)
        x = bn("downsample_bn")(x)
    return nn.relu(out + x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). Stride on the first."""

    planes: int
    stride: int
    norm: str
    train: bool
    dtype: Dtype
    batch_axis: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bn = lambda name: make_batch_norm(  # noqa: E731
            self.norm, self.train, self.dtype, name, self.batch_axis
        )
        out = Conv(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(bn("bn1")(out))
        out = Conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
        return _add_shortcut(x, bn("bn2")(out), self.stride, bn, self.dtype)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (grouped for ResNeXt) -> 1x1 with expansion 4."""

    planes: int
    stride: int
    style: str
    groups: int
    base_width: int
    norm: str
    train: bool
    dtype: Dtype
    batch_axis: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bn = lambda name: make_batch_norm(  # noqa: E731
            self.norm, self.train, self.dtype, name, self.batch_axis
        )
        width = math.floor(self.planes * self.base_width / 64) * self.groups
        stride1, stride2 = (self.stride, 1) if self.style == "caffe" else (1, self.stride)
        out = Conv(width, 1, stride1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(bn("bn1")(out))
        out = Conv(width, 3, stride2, 1, groups=self.groups, dtype=self.dtype, name="conv2")(out)
        out = nn.relu(bn("bn2")(out))
        out = Conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(out)
        return _add_shortcut(x, bn("bn3")(out), self.stride, bn, self.dtype)


class ResNet(nn.Module):
    """ResNet/ResNeXt trunk: `[B, H, W, 3]` normalised -> (C2, C3, C4, C5) at strides 4, 8, 16, 32.

    `frozen_stages` follows mmdet: -1 nothing frozen, 0 the stem, N the stem and stages 1..N.
    Gradients stop at the output of the last frozen part: those parameters never train (the
    optimizer's labels decide that), so no gradient needs to flow into them.
    """

    depth: int = 50
    style: str = "caffe"
    groups: int = 1
    base_width: int = 64
    stem_width: int = 64
    norm: str = "frozen_bn"
    frozen_stages: int = 1
    dtype: Dtype = jnp.float32
    # The mesh axis a `batch_stats_bn` layer averages its training statistics over when the
    # model runs per device (`jax.shard_map`, as the train step does); None under plain jit.
    batch_axis: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        if self.depth not in ARCHS:
            raise ValueError(f"model.backbone.depth: {self.depth} not in {sorted(ARCHS)}")
        if self.style not in STYLES:
            raise ValueError(f"model.backbone.style: {self.style!r} not in {STYLES}")
        block_kind, blocks = ARCHS[self.depth]
        if block_kind == "basic" and (self.groups != 1 or self.base_width != 64):
            raise ValueError("model.backbone: ResNet-18/34 basic blocks have no groups/base_width")
        x = Conv(self.stem_width, 7, 2, 3, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(make_batch_norm(self.norm, train, self.dtype, "bn1", self.batch_axis)(x))
        x = max_pool(x, 3, 2, 1)
        if self.frozen_stages >= 0:
            x = jax.lax.stop_gradient(x)
        outputs = []
        for i, num_blocks in enumerate(blocks):
            planes = self.stem_width * 2**i
            for j in range(num_blocks):
                stride = (1 if i == 0 else 2) if j == 0 else 1
                common = dict(
                    norm=self.norm,
                    train=train,
                    dtype=self.dtype,
                    batch_axis=self.batch_axis,
                    name=f"layer{i + 1}_{j}",
                )
                if block_kind == "basic":
                    x = BasicBlock(planes, stride, **common)(x)
                else:
                    x = Bottleneck(
                        planes, stride, self.style, self.groups, self.base_width, **common
                    )(x)
            if i + 1 <= self.frozen_stages:
                x = jax.lax.stop_gradient(x)
            outputs.append(x)
        return tuple(outputs)
