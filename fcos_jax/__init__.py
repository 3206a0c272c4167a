"""fcos_jax: FCOS object detection in JAX/Flax with exact parity to mmdetection and torchvision."""

__version__ = "0.1.0"
