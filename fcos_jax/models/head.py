"""FCOS head (docs/modes.md §2.2): shared cls and reg towers, predictors, per-level scale.

Variants chosen by config:
  norm              'gn' (GroupNorm 32) or 'none' after each tower conv.
  conv_bias         tower conv bias (mmdet v1: only without GN; torchvision: always).
  centerness_on_reg centerness predicted from the reg tower (torchvision, mmdet v2 option)
                    instead of the cls tower (mmdet v1).
  regression        'exp_scale' exp(scale_l * x) (mmdet v1); 'scale_relu_stride'
                    relu(scale_l * x) * stride (mmdet norm_on_bbox); 'relu_stride' relu(x) * stride
                    (torchvision, no scale parameter).
Whatever the variant, `bbox_reg` is the positive (l, t, r, b) distance in input pixels.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcos_jax.models.layers import Conv, Dtype, group_norm

REGRESSIONS = ("exp_scale", "scale_relu_stride", "relu_stride")
normal_001 = nn.initializers.normal(stddev=0.01)


class Scale(nn.Module):
    """A learnable 0-dim scalar multiplier, initialised to 1 (mmdet `Scale`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), ())
        return x * scale.astype(x.dtype)


class ConvNormReLU(nn.Module):
    """One tower layer: 3x3 conv (`conv`) -> optional GroupNorm (`gn`) -> ReLU."""

    features: int
    norm: str
    gn_groups: int
    use_bias: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv(
            self.features,
            3,
            1,
            1,
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=normal_001,
            name="conv",
        )(x)
        if self.norm == "gn":
            x = group_norm(self.gn_groups, self.dtype, "gn")(x)
        return nn.relu(x)


class FCOSHead(nn.Module):
    """Applied to each pyramid level with shared weights.

    Input: list of `[B, Hl, Wl, C]`. Output: list over levels of dicts with
    `cls_logits [B, Hl, Wl, num_classes]`, `bbox_reg [B, Hl, Wl, 4]` (pixels, >= 0) and
    `centerness [B, Hl, Wl, 1]` (logits), all float32.
    """

    num_classes: int
    feat_channels: int = 256
    stacked_convs: int = 4
    norm: str = "gn"
    gn_groups: int = 32
    conv_bias: bool = False
    centerness_on_reg: bool = False
    regression: str = "exp_scale"
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    prior_prob: float = 0.01
    dtype: Dtype = jnp.float32

    def setup(self):
        if self.norm not in ("gn", "none"):
            raise ValueError(f"model.head.norm: {self.norm!r} not in ('gn', 'none')")
        if self.regression not in REGRESSIONS:
            raise ValueError(f"model.head.regression: {self.regression!r} not in {REGRESSIONS}")
        # Submodules in lists are named `cls_convs_0`, ... and `scales_0`, ... by Flax.
        tower = lambda: ConvNormReLU(  # noqa: E731
            self.feat_channels,
            self.norm,
            self.gn_groups,
            self.conv_bias or self.norm == "none",
            self.dtype,
        )
        self.cls_convs = [tower() for _ in range(self.stacked_convs)]
        self.reg_convs = [tower() for _ in range(self.stacked_convs)]
        predictor = lambda features, bias: Conv(  # noqa: E731
            features,
            3,
            1,
            1,
            use_bias=True,
            dtype=self.dtype,
            kernel_init=normal_001,
            bias_init=nn.initializers.constant(bias),
        )
        cls_bias = -math.log((1 - self.prior_prob) / self.prior_prob)
        self.conv_cls = predictor(self.num_classes, cls_bias)
        self.conv_reg = predictor(4, 0.0)
        self.conv_centerness = predictor(1, 0.0)
        if self.regression != "relu_stride":
            self.scales = [Scale() for _ in self.strides]

    def __call__(self, features: tuple[jax.Array, ...]) -> list[dict[str, jax.Array]]:
        if len(features) != len(self.strides):
            raise ValueError(f"head: {len(features)} levels for {len(self.strides)} strides")
        return [self._level(x, level) for level, x in enumerate(features)]

    def _level(self, x: jax.Array, level: int) -> dict[str, jax.Array]:
        cls_feat, reg_feat = x, x
        for layer in self.cls_convs:
            cls_feat = layer(cls_feat)
        for layer in self.reg_convs:
            reg_feat = layer(reg_feat)
        reg = self.conv_reg(reg_feat).astype(jnp.float32)
        stride = self.strides[level]
        if self.regression == "exp_scale":
            bbox_reg = jnp.exp(self.scales[level](reg))
        elif self.regression == "scale_relu_stride":
            bbox_reg = nn.relu(self.scales[level](reg)) * stride
        else:
            bbox_reg = nn.relu(reg) * stride
        centerness = self.conv_centerness(reg_feat if self.centerness_on_reg else cls_feat)
        return {
            "cls_logits": self.conv_cls(cls_feat).astype(jnp.float32),
            "bbox_reg": bbox_reg,
            "centerness": centerness.astype(jnp.float32),
        }
