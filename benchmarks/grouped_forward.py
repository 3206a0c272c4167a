"""ResNeXt-64x4d's grouped 3x3 forward at stages 2 and 3, written three ways, on XLA's device.

XLA's grouped convolution (`feature_group_count=64`) against two formulations written in JAX:
per-tap batched matrix products (group-major input, one [G, N, Cin/G] x [G, Cin/G, Cout/G]
product per tap, summed) and group-major im2col (the nine taps stacked, one batched product with
K = 9 * Cin/G). Shapes are the X-101 backbone's at 800x1344 (stage 2: 64 groups of 8 channels,
stage 3: 64 groups of 16; stride 1 and the strided first block).

  .venv/bin/python benchmarks/grouped_forward.py [--runs 5]

Prints the median milliseconds of each and the largest difference from XLA's output. Each is
compiled with the library's compile options (`fcos_jax.utils.compile_options`, as the model is).
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import cpu_model  # benchmarks/common.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fcos_jax.utils import compile_options  # noqa: E402

GROUPS = 64
# (height, width, channels, stride) of the input of a stage's grouped 3x3 convolution
SHAPES = [(100, 168, 512, 1), (50, 84, 1024, 1), (200, 336, 512, 2), (100, 168, 1024, 2)]


def _out_hw(h: int, w: int, s: int) -> tuple[int, int]:
    return (h - 1) // s + 1, (w - 1) // s + 1  # 3x3, padding 1


def xla_grouped(x: jax.Array, kernel: jax.Array, s: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (s, s),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=GROUPS,
    )


def _tap(xp: jax.Array, i: int, j: int, s: int, oh: int, ow: int) -> jax.Array:
    return xp[..., i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s, :]


def per_tap(x: jax.Array, kernel: jax.Array, s: int) -> jax.Array:
    b, h, w, _ = x.shape
    _, _, cpg, cout = kernel.shape
    oh, ow = _out_hw(h, w, s)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xg = xp.reshape(b, h + 2, w + 2, GROUPS, cpg).transpose(3, 0, 1, 2, 4)
    wg = kernel.reshape(3, 3, cpg, GROUPS, cout // GROUPS).transpose(0, 1, 3, 2, 4)
    total = 0
    for i in range(3):
        for j in range(3):
            patch = _tap(xg, i, j, s, oh, ow).reshape(GROUPS, -1, cpg)
            total = total + jnp.einsum("gnk,gko->gno", patch, wg[i, j])
    y = total.reshape(GROUPS, b, oh, ow, cout // GROUPS)
    return y.transpose(1, 2, 3, 0, 4).reshape(b, oh, ow, cout)


def im2col(x: jax.Array, kernel: jax.Array, s: int) -> jax.Array:
    b, h, w, _ = x.shape
    _, _, cpg, cout = kernel.shape
    oh, ow = _out_hw(h, w, s)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = jnp.stack([_tap(xp, i, j, s, oh, ow) for i in range(3) for j in range(3)], axis=-2)
    cols = taps.reshape(b * oh * ow, 9, GROUPS, cpg).transpose(2, 0, 1, 3)
    cols = cols.reshape(GROUPS, b * oh * ow, 9 * cpg)
    wg = kernel.reshape(9, cpg, GROUPS, cout // GROUPS).transpose(2, 0, 1, 3)
    y = jnp.einsum("gnk,gko->gno", cols, wg.reshape(GROUPS, 9 * cpg, cout // GROUPS))
    return y.transpose(1, 0, 2).reshape(b, oh, ow, cout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"grouped 3x3 forward, {GROUPS} groups, batch 1, {jax.devices()[0].platform} "
        f"({cpu_model()}), median of {args.runs} runs, ms (max |diff| from XLA's)"
    )
    print("| input (HxWxC, stride) | XLA grouped | per-tap products | im2col |\n|---|---|---|---|")
    for h, w, c, s in SHAPES:
        x = jnp.asarray(rng.standard_normal((1, h, w, c)), jnp.float32)
        kernel = jnp.asarray(0.1 * rng.standard_normal((3, 3, c // GROUPS, c)), jnp.float32)
        reference = None
        cells = []
        for fn in (xla_grouped, per_tap, im2col):
            options = compile_options.compiler_options()
            jitted = jax.jit(fn, static_argnums=2, compiler_options=options)
            y = np.asarray(jitted(x, kernel, s))
            reference = y if reference is None else reference
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                jax.block_until_ready(jitted(x, kernel, s))
                times.append(time.perf_counter() - start)
            diff = float(np.abs(y - reference).max())
            cells.append(f"{1e3 * np.median(times):.1f} ({diff:.0e})")
        print(f"| {h}x{w}x{c}, s{s} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
