"""points.py against hand-written grids (spec 4: mmdet x*s + s//2; spec 10: torchvision x*s)."""

import numpy as np
import pytest

from fcos_jax.points import all_level_points, level_points, points_offset


def test_level_points_are_row_major_with_the_offset():
    got = level_points(2, 3, 8, 4)
    assert got.dtype == np.float32 and got.shape == (6, 2)
    np.testing.assert_array_equal(got, [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]])


def test_offsets_per_mode():
    assert [points_offset("mmdet_v1", s) for s in (8, 16, 128)] == [4, 8, 64]
    assert points_offset("mmdet", 32) == points_offset("mmdet_v3", 32) == 16
    assert points_offset("torchvision", 64) == 0
    with pytest.raises(ValueError, match="mode"):
        points_offset("detectron", 8)


def test_all_level_points_uses_each_levels_stride():
    torchvision_points = all_level_points([(1, 2), (1, 1)], [16, 32], "torchvision")
    np.testing.assert_array_equal(torchvision_points[0], [[0, 0], [16, 0]])
    np.testing.assert_array_equal(torchvision_points[1], [[0, 0]])
    mmdet_points = all_level_points([(1, 2)], [16], "mmdet")
    np.testing.assert_array_equal(mmdet_points[0], [[8, 8], [24, 8]])
    with pytest.raises(ValueError, match="strides"):
        all_level_points([(1, 2)], [16, 32], "mmdet")
