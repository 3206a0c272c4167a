"""FCOS = backbone -> FPN -> head, built from a config."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fcos_jax.models.fpn import FPN
from fcos_jax.models.head import FCOSHead
from fcos_jax.models.resnet import ResNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class FCOS(nn.Module):
    """Input `image [B, H, W, 3]` float32, normalised, H and W multiples of 32 (padded).

    Output: list over the 5 levels (strides 8..128) of dicts
    `cls_logits [B, Hl, Wl, K]`, `bbox_reg [B, Hl, Wl, 4]` (l, t, r, b in input pixels) and
    `centerness [B, Hl, Wl, 1]` (logits), float32 whatever the compute dtype.
    """

    backbone: ResNet
    neck: FPN
    bbox_head: FCOSHead

    def __call__(self, image: jax.Array, train: bool = False) -> list[dict[str, jax.Array]]:
        features = self.backbone(image, train=train)
        pyramid = self.neck(features[1:])
        return self.bbox_head(pyramid)


def build_model(model_config: ml_collections.ConfigDict) -> FCOS:
    """FCOS from `config.model` (see fcos_jax/config/base.py)."""
    if model_config.dtype not in DTYPES:
        raise ValueError(f"model.dtype: {model_config.dtype!r} not in {sorted(DTYPES)}")
    dtype = DTYPES[model_config.dtype]
    b, h = model_config.backbone, model_config.head
    backbone = ResNet(
        depth=b.depth,
        style=b.style,
        groups=b.groups,
        base_width=b.base_width,
        stem_width=b.stem_width,
        norm=b.norm,
        frozen_stages=b.frozen_stages,
        dtype=dtype,
    )
    neck = FPN(out_channels=model_config.fpn.out_channels, dtype=dtype)
    head = FCOSHead(
        num_classes=h.num_classes,
        feat_channels=h.feat_channels,
        stacked_convs=h.stacked_convs,
        norm=h.norm,
        gn_groups=h.gn_groups,
        conv_bias=h.conv_bias,
        centerness_on_reg=h.centerness_on_reg,
        regression=h.regression,
        strides=tuple(h.strides),
        prior_prob=h.prior_prob,
        dtype=dtype,
    )
    return FCOS(backbone=backbone, neck=neck, bbox_head=head)
