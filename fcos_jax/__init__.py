"""fcos_jax: FCOS object detection in JAX/Flax with exact parity to mmdetection and torchvision.

    from fcos_jax import Detector, load_config

The folders, one subsystem each (docs/architecture.md#modules):
  config/      the base config, loading and checking a config file, modes, class lists
  models/      the Flax modules (ResNet/ResNeXt, FPN, head) and XLA:CPU's convolution kernels
  detection/   boxes, points, targets, losses, post-processing, NMS
  data/        test-time preprocessing, canvases, datasets and the tf.data pipelines
  training/    the loop, the train step, optimizer, a run's checkpoints, log and lock
  evaluation/  the evaluation driver and COCOeval
  checkpoint/  the orbax layout on disk and its checksums
  parallel/    the mesh, multi-process start-up, collectives
  utils/       helpers the commands share
and the commands `python -m fcos_jax.<tool>`: convert/, compare/ (with its torch references),
export/, predict/.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Detector", "load_config"]

if TYPE_CHECKING:
    from fcos_jax.config import load_config
    from fcos_jax.inference import Detector


def __getattr__(name: str):
    # Imported on first use, so that `import fcos_jax.config` (no JAX) or `fcos_jax.training.errors`
    # (read before JAX starts) does not load JAX, flax and orbax through this file.
    if name == "Detector":
        from fcos_jax.inference import Detector

        return Detector
    if name == "load_config":
        from fcos_jax.config import load_config

        return load_config
    raise AttributeError(f"module 'fcos_jax' has no attribute {name!r}")
