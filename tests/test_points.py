"""Point grids against torchvision's AnchorGenerator and the mmdet formula (docs/modes.md §2.4,
§4.4)."""

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from fcos_jax.detection.points import all_level_points

STRIDES = (8, 16, 32, 64, 128)


def _feature_sizes(height, width):
    return [(-(-height // s), -(-width // s)) for s in STRIDES]


@pytest.mark.parametrize("height,width", [(800, 1344), (800, 1216), (1088, 800), (96, 160)])
def test_torchvision_points_are_the_anchor_generator_centers(height, width):
    sizes = _feature_sizes(height, width)
    generator = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
    features = [torch.zeros(1, 1, h, w) for h, w in sizes]
    anchors = generator(ImageList(torch.zeros(1, 3, height, width), [(height, width)]), features)
    centers = ((anchors[0][:, :2] + anchors[0][:, 2:]) / 2).numpy()
    ours = np.concatenate(all_level_points(sizes, STRIDES, "torchvision"))
    np.testing.assert_array_equal(ours, centers)


def test_torchvision_p6_p7_step_by_padded_size_over_feature_size():
    points = all_level_points(_feature_sizes(800, 1344), STRIDES, "torchvision")
    p6, p7 = points[3].reshape(13, 21, 2), points[4].reshape(7, 11, 2)
    assert (p6[0, 1, 0], p6[1, 0, 1]) == (64, 61)  # 1344 // 21, 800 // 13
    assert (p7[0, 1, 0], p7[1, 0, 1]) == (122, 114)  # 1344 // 11, 800 // 7


def test_mmdet_points_sit_at_half_stride_offsets_row_major():
    points = all_level_points([(2, 3)], (16,), "mmdet_v1")[0]
    expected = [[8, 8], [24, 8], [40, 8], [8, 24], [24, 24], [40, 24]]
    np.testing.assert_array_equal(points, np.asarray(expected, np.float32))
