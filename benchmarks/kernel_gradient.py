"""`cpu_kernels.conv2d`'s backward with its per-tap kernel gradient against XLA's own, per shape.

`cpu_kernels.conv2d` chooses, per convolution, between XLA's kernel-gradient convolution and a
loop of one matrix product per kernel tap (`cpu_kernels._uses_tap_kernel_gradient`). This times the
whole backward (input and kernel gradient of sum(conv(x, k) * w)) both ways for the convolution
shapes of the R-50/X-101 FCOS training step at 800x1344, batch 2, compiled as the library compiles
its programs (`compile_options.compiler_options()`), outside any loop.

  .venv/bin/python benchmarks/kernel_gradient.py [--runs 5] [--only stem,head]

Prints the median milliseconds of each and the ratio per-tap / XLA.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import cpu_model, median_ms  # noqa: E402  (benchmarks/common.py)

from fcos_jax.models import cpu_kernels  # noqa: E402
from fcos_jax.utils import compile_options  # noqa: E402

# name: (batch, height, width, cin, cout, kernel size, stride, groups); input size, so the output
# is (height + 2p - k) // stride + 1 with p = k // 2.
SHAPES = {
    "stem": (2, 800, 1344, 3, 64, 7, 2, 1),
    "res2 3x3 64": (2, 200, 336, 64, 64, 3, 1, 1),
    "res3 3x3 128": (2, 100, 168, 128, 128, 3, 1, 1),
    "res4 3x3 256": (2, 50, 84, 256, 256, 3, 1, 1),
    "res5 3x3 512": (2, 25, 42, 512, 512, 3, 1, 1),
    "head 3x3 256 P3": (2, 100, 168, 256, 256, 3, 1, 1),
    "head 3x3 256 P5": (2, 25, 42, 256, 256, 3, 1, 1),
    "cls 3x3 256->80 P3": (2, 100, 168, 256, 80, 3, 1, 1),
    "reg 3x3 256->4 P3": (2, 100, 168, 256, 4, 3, 1, 1),
    "FPN P6 3x3 s2 2048->256": (2, 25, 42, 2048, 256, 3, 2, 1),
    # X-101's grouped convolutions at a quarter of the step's resolution (XLA's grouped kernel
    # gradient takes minutes at full size).
    "X-101 res2 64x4": (2, 50, 84, 256, 256, 3, 1, 64),
    "X-101 res3 64x8": (2, 25, 42, 512, 512, 3, 1, 64),
    "X-101 res4 64x16": (2, 13, 21, 1024, 1024, 3, 1, 64),
    "X-101 res5 64x32": (2, 7, 11, 2048, 2048, 3, 1, 64),
}


def backward(tap: bool, stride: int, groups: int):
    """jit of (x, kernel, weights) -> (dx, dkernel), per-tap kernel gradient or XLA's."""

    def loss(x, kernel, weights):
        y = cpu_kernels.conv2d(x, kernel, stride, kernel.shape[0] // 2, groups)
        return jnp.sum(y * weights)

    grad = jax.grad(loss, argnums=(0, 1))

    def traced(x, kernel, weights):
        # The choice is made at trace time: force it one way while this program is traced.
        chooser = cpu_kernels._uses_tap_kernel_gradient
        cpu_kernels._uses_tap_kernel_gradient = lambda *_: tap
        try:
            return grad(x, kernel, weights)
        finally:
            cpu_kernels._uses_tap_kernel_gradient = chooser

    return jax.jit(traced, compiler_options=compile_options.compiler_options())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated substrings of shape names")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    wanted = [s for s in args.only.split(",") if s]
    print(
        f"conv2d backward (dx + dkernel), {jax.devices()[0].platform} ({cpu_model()}),"
        f" median of {args.runs} runs, ms"
    )
    print("| convolution | input | per-tap | XLA | per-tap / XLA |\n|---|---|---|---|---|")
    for name, (b, h, w, cin, cout, k, s, g) in SHAPES.items():
        if wanted and not any(part in name for part in wanted):
            continue
        x = jnp.asarray(rng.standard_normal((b, h, w, cin)), jnp.float32)
        kernel = jnp.asarray(0.05 * rng.standard_normal((k, k, cin // g, cout)), jnp.float32)
        out_hw = ((h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1)
        weights = jnp.asarray(rng.standard_normal((b, *out_hw, cout)), jnp.float32)
        tap = median_ms(backward(True, s, g), x, kernel, weights, runs=args.runs)
        xla = median_ms(backward(False, s, g), x, kernel, weights, runs=args.runs)
        shape = f"{b}x{h}x{w}x{cin} k{k} s{s} g{g} ->{cout}"
        print(f"| {name} | {shape} | {tap:.1f} | {xla:.1f} | {tap / xla:.2f} |", flush=True)


if __name__ == "__main__":
    main()
