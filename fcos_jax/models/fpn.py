"""Feature pyramid (docs/modes.md §2.2): laterals on C3-C5, nearest top-down, 3x3 outputs, P6-P7.

P6 is a 3x3 stride-2 conv on the P5 *output* (no ReLU before it); P7 the same on ReLU(P6). This is
mmdet v1's `add_extra_convs=True, extra_convs_on_inputs=False, relu_before_extra_convs=True` and
torchvision's `LastLevelP6P7(256, 256)`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcos_jax.models.layers import Conv, Dtype, upsample_nearest

xavier_uniform = nn.initializers.xavier_uniform()


class FPN(nn.Module):
    """Input (C3, C4, C5) `[B, Hi, Wi, Ci]`; output (P3..P7), each `[B, Hl, Wl, out_channels]`."""

    out_channels: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        conv = lambda k, s, name: Conv(  # noqa: E731
            self.out_channels,
            k,
            s,
            k // 2,
            use_bias=True,
            dtype=self.dtype,
            kernel_init=xavier_uniform,
            name=name,
        )
        laterals = [conv(1, 1, f"lateral_convs_{i}")(c) for i, c in enumerate(features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + upsample_nearest(
                laterals[i], laterals[i - 1].shape[1:3]
            )
        outs = [conv(3, 1, f"fpn_convs_{i}")(x) for i, x in enumerate(laterals)]
        p6 = conv(3, 2, f"fpn_convs_{len(outs)}")(outs[-1])
        p7 = conv(3, 2, f"fpn_convs_{len(outs) + 1}")(nn.relu(p6))
        return (*outs, p6, p7)
