"""Winograd minimal filtering for 3x3, stride-1, padding-1 convolutions (Lavin & Gray 2016).

F(m x m, 3 x 3) computes each m x m output tile from the (m + 2) x (m + 2) input tile under it:
the input transform V = B^T d B, one matrix product over channels per tile position
(M = V U, with the kernel transform U = G g G^T), and the output transform Y = A^T M A. That is
(m + 2)^2 products per channel pair instead of 9 m^2: 2.25x fewer for F(2x2, 3x3), 4x fewer for
F(4x4, 3x3), at the price of larger rounding errors (the transforms' coefficients reach 8 and
1/24 in F(4, 3); `benchmarks/winograd.py` measures both against XLA's convolution).

Everything is written as XLA sees it: strided slices of the padded input, elementwise sums for
the transforms (their coefficients are constants, zeros skipped) and one 2-D matrix product per
tile position ((m + 2)^2 of them, independent, so XLA can run them at once): on XLA:CPU these
plain products ran faster than one batched einsum over the tile positions (docs/benchmarks.md).
"""

import jax
import jax.numpy as jnp

# 1-D transforms: y = A^T [(G g) * (B^T d)] for an m-output, 3-tap correlation over an
# (m + 2)-element input tile d.
F2X3 = {
    "BT": ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    "G": ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    "AT": ((1, 1, 1, 0), (0, 1, -1, -1)),
}
F4X3 = {
    "BT": (
        (4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1),
    ),
    "G": (
        (1 / 4, 0, 0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0, 0, 1),
    ),
    "AT": ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
}
Transforms = dict[str, tuple[tuple[float, ...], ...]]


def kernel_transform(kernel: jax.Array, transforms: Transforms = F4X3) -> jax.Array:
    """[3, 3, Cin, Cout] HWIO -> U = G g G^T per channel pair, [a, a, Cin, Cout], a = m + 2.

    Rows then columns as elementwise sums of kernel slices (`_combine`), which XLA:CPU runs
    several times faster than one einsum over the 3x3 taps."""
    g = transforms["G"]
    rows = _combine(g, [kernel[i] for i in range(3)])  # a x [3, Cin, Cout]
    return jnp.stack([jnp.stack(_combine(g, [row[j] for j in range(3)])) for row in rows])


def _combine(matrix: tuple[tuple[float, ...], ...], terms: list[jax.Array]) -> list[jax.Array]:
    """[sum_j matrix[i][j] * terms[j] for each row i]: zero coefficients skipped, +-1 ones added
    or subtracted (elementwise work XLA fuses; a dot over the short tile axis is slower)."""
    rows = []
    for row in matrix:
        total = None
        for coefficient, term in zip(row, terms, strict=True):
            if coefficient == 0:
                continue
            part = term if abs(coefficient) == 1 else coefficient * term
            if total is None:
                total = -part if coefficient == -1 else part
            else:
                total = total - part if coefficient == -1 else total + part
        rows.append(total)
    return rows


def conv3x3(x: jax.Array, transformed: jax.Array, transforms: Transforms = F4X3) -> jax.Array:
    """The 3x3, stride-1, padding-1 convolution of x with the kernel whose `kernel_transform` is
    `transformed` [a, a, Cin, Cout]: x [B, H, W, Cin] -> [B, H, W, Cout], any H and W (the last
    tiles are computed on zero padding and cropped)."""
    bt, at = transforms["BT"], transforms["AT"]
    alpha, m = len(bt), len(at)
    batch, height, width, channels = x.shape
    th, tw = -(-height // m), -(-width // m)  # tiles per column and per row
    x = jnp.pad(x, ((0, 0), (1, th * m + 1 - height), (1, tw * m + 1 - width), (0, 0)))
    # B^T d B, rows then columns: offset a of every tile is one strided slice.
    rows = _combine(bt, [x[:, a : a + m * th : m] for a in range(alpha)])  # [B, th, W', C] each
    v = [_combine(bt, [r[:, :, b : b + m * tw : m] for b in range(alpha)]) for r in rows]
    # M = V U at each of the a x a tile positions: [B * th * tw, Cin] @ [Cin, Cout].
    u = transformed.astype(x.dtype)
    products = [
        [jnp.dot(v[xi][yi].reshape(-1, channels), u[xi, yi]).reshape(batch, th, tw, -1)
         for yi in range(alpha)]
        for xi in range(alpha)
    ]  # fmt: skip
    # A^T M A, then each tile's m x m outputs into place.
    cols = [_combine(at, products[xi]) for xi in range(alpha)]  # [a][m] of [B, th, tw, O]
    y = [_combine(at, [cols[xi][j] for xi in range(alpha)]) for j in range(m)]
    y = jnp.stack([jnp.stack(yj, axis=3) for yj in y], axis=5)  # [B, th, tw, m (i), O, m (j)]
    y = y.transpose(0, 1, 3, 2, 5, 4).reshape(batch, th * m, tw * m, -1)
    return y[:, :height, :width]
