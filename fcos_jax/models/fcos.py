"""FCOS = backbone -> FPN -> head, built from a config."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fcos_jax.config.groups import kwargs_for
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
    """FCOS from `config.model` (see fcos_jax/config/base.py): each part from its group, whose
    field names are the module's (`config.groups`)."""
    if model_config.dtype not in DTYPES:
        raise ValueError(f"model.dtype: {model_config.dtype!r} not in {sorted(DTYPES)}")
    dtype = DTYPES[model_config.dtype]
    return FCOS(
        backbone=ResNet(**kwargs_for(ResNet, model_config.backbone, dtype=dtype)),
        neck=FPN(**kwargs_for(FPN, model_config.fpn, dtype=dtype)),
        bbox_head=FCOSHead(**kwargs_for(FCOSHead, model_config.head, dtype=dtype)),
    )
