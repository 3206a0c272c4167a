"""The post-processing modes and the conventions each fixes beyond post-processing.

A mode (`test.postprocess`, docs/modes.md §1) decides how boxes are rounded and rescaled, and
the data, targets, losses and COCO results must follow it: `legacy_plus_one` (the +1 pixel
convention, §2.6) and `preprocess.scale_factor` (one resize factor for both axes, or one per
axis, §2.3/§3.3/§4.3). This table is their one definition; `detection/postprocess.py` applies it and
`config/check.py` refuses a config that disagrees with it. No dependencies: the config check
imports it without JAX.
"""

POSTPROCESS_MODES = ("mmdet_v1", "mmdet_v3", "torchvision")
SCALE_FACTORS = ("single", "per_axis")

# mode -> +1 widths (x2 - x1 + 1) in clipping, NMS and the results json.
LEGACY_PLUS_ONE = {"mmdet_v1": True, "mmdet_v3": False, "torchvision": False}
# mode -> what post-processing divides resized boxes by: mmcv v1's single float factor, or the
# per-axis factors (new_h / h, new_w / w) of mmdet v2+/v3 and torchvision.
SCALE_FACTOR = {"mmdet_v1": "single", "mmdet_v3": "per_axis", "torchvision": "per_axis"}
