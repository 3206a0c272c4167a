"""Flax Linen modules: ResNet/ResNeXt backbone, FPN neck, FCOS head, and their composition."""

from fcos_jax.models.fcos import FCOS, build_model

__all__ = ["FCOS", "build_model"]
