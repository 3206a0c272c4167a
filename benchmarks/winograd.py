"""Winograd F(m x m, 3 x 3) convolution in JAX against XLA's 3x3 convolution: time and error.

The FCOS head and the ResNet 3x3 convolutions are stride-1, padding-1 3x3 convolutions.
`fcos_jax.models.winograd` computes them with Winograd's minimal filtering: (m + 2)^2 products
per channel pair for each m x m output tile instead of 9 m^2 (2.25x fewer for F(2x2, 3x3), 4x
fewer for F(4x4, 3x3)). Here the kernel transform is done outside the timed forward program, as
it could be once at load for inference (inside the model it is part of the program: it is small).

  .venv/bin/python benchmarks/winograd.py [--runs 5] [--backward]

Prints, per shape, the median milliseconds of XLA's convolution and of F(2,3) and F(4,3), and the
largest difference of each from XLA's float32 convolution relative to its largest magnitude.
With `--backward`, also dx + dk of each (Winograd through JAX's autodiff, the kernel transform
then inside the program; XLA's convolution gradients). All programs are compiled with the
library's compile options.
"""

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import cpu_model, median_ms  # noqa: E402  (benchmarks/common.py)

from fcos_jax.models import cpu_kernels, winograd  # noqa: E402
from fcos_jax.utils import compile_options  # noqa: E402

VARIANTS = {"F(2,3)": winograd.F2X3, "F(4,3)": winograd.F4X3}
# [B, H, W, C] x [3, 3, C, K] -> [B, H, W, K]: what `cpu_kernels.conv2d` runs when not Winograd.
xla_conv = functools.partial(cpu_kernels._xla_conv, stride=1, padding=1)

# (batch, height, width, channels in, channels out): the R-50 FCOS head at P3/P4/P5 (800x1344)
# and the ResNet stage 1-3 3x3 convolutions.
SHAPES = [
    (1, 100, 168, 256, 256),
    (2, 100, 168, 256, 256),
    (1, 50, 84, 256, 256),
    (1, 25, 42, 256, 256),
    (1, 200, 336, 64, 64),
    (1, 100, 168, 128, 128),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="also time dx + dk")
    args = parser.parse_args()
    options = compile_options.compiler_options()
    rng = np.random.default_rng(0)
    print(
        f"3x3 stride-1 convolution, {jax.devices()[0].platform} ({cpu_model()}), median of"
        f" {args.runs} runs, ms (error: max |winograd - XLA| / max |XLA|)"
    )
    names = list(VARIANTS)
    columns = " | ".join(f"{n} | {n} error" for n in names)
    print(f"| pass | input BxHxWxC -> K | XLA | {columns} |")
    print("|---" * (3 + 2 * len(names)) + "|")
    for b, h, w, c, k in SHAPES:
        x = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3, 3, c, k)) / np.sqrt(9 * c), jnp.float32)
        reference = jax.jit(xla_conv, compiler_options=options)(x, kernel)
        scale = float(jnp.max(jnp.abs(reference)))
        row = [median_ms(jax.jit(xla_conv, compiler_options=options), x, kernel, runs=args.runs)]
        for variant in VARIANTS.values():
            transformed = winograd.kernel_transform(kernel, variant)
            fn = jax.jit(
                functools.partial(winograd.conv3x3, transforms=variant), compiler_options=options
            )
            error = float(jnp.max(jnp.abs(fn(x, transformed) - reference))) / scale
            row += [median_ms(fn, x, transformed, runs=args.runs), error]
        cells = " | ".join(f"{t:.1f} | {e:.1e}" for t, e in zip(row[1::2], row[2::2], strict=True))
        print(f"| forward | {b}x{h}x{w}x{c} -> {k} | {row[0]:.1f} | {cells} |", flush=True)
        if not args.backward:
            continue
        weights = jnp.asarray(rng.standard_normal((b, h, w, k)), jnp.float32)

        def grads(conv):
            return jax.jit(
                jax.grad(lambda x_, k_, w_: jnp.sum(conv(x_, k_) * w_), argnums=(0, 1)),
                compiler_options=options,
            )

        times = [median_ms(grads(xla_conv), x, kernel, weights, runs=args.runs)]
        for variant in VARIANTS.values():

            def conv(x_, k_, v=variant):
                return winograd.conv3x3(x_, winograd.kernel_transform(k_, v), v)

            times.append(median_ms(grads(conv), x, kernel, weights, runs=args.runs))
        cells = " | ".join(f"{t:.1f} | " for t in times[1:])
        print(f"| dx + dk | {b}x{h}x{w}x{c} -> {k} | {times[0]:.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
