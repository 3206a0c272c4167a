"""A convolution's gradients inside `lax.scan` against the same work written out, on XLA's device.

Gradient accumulation (`train.accumulate_steps > 1`) runs each micro-batch's forward and backward
inside a `lax.scan`, so that only one micro-batch's activations are alive. This measures what the
loop costs for one 3x3 convolution (XLA's own, no custom gradient): the forward, the input
gradient and the kernel gradient of two micro-batches, once in a scan and once written out.

  .venv/bin/python benchmarks/loop_conv.py [--batch 4 --size 64 --channels 64 --runs 5]

Prints the median milliseconds of each and the ratio scan / written out.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from common import cpu_model, median_ms  # benchmarks/common.py


def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """[B, H, W, C] x [3, 3, C, C] -> [B, H, W, C], padding 1."""
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def loss(kernel: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.sum(conv(x, kernel) ** 2)


PARTS = {
    "forward": (loss, lambda kernel, x: jnp.zeros(())),
    "input gradient": (jax.grad(loss, argnums=1), lambda kernel, x: jnp.zeros_like(x)),
    "kernel gradient": (jax.grad(loss, argnums=0), lambda kernel, x: jnp.zeros_like(kernel)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="two micro-batches of batch / 2")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    c = args.channels
    x = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, c)), jnp.float32)
    kernel = jnp.asarray(0.05 * rng.standard_normal((3, 3, c, c)), jnp.float32)
    half = args.batch // 2
    print(
        f"3x3 convolution, {c} -> {c} channels, 2 micro-batches of {half}x{args.size}x{args.size}"
        f", {jax.devices()[0].platform} ({cpu_model()}), median of {args.runs} runs, ms"
    )
    print("| part | written out | in lax.scan | ratio |\n|---|---|---|---|")
    for name, (fn, zero) in PARTS.items():
        written = jax.jit(lambda k, x, fn=fn: fn(k, x[:half]) + fn(k, x[half:]))

        def scanned(k, x, fn=fn, zero=zero):
            micro = x.reshape(2, half, *x.shape[1:])
            first = zero(k, micro[0])
            return jax.lax.scan(lambda total, xi: (total + fn(k, xi), None), first, micro)[0]

        a = median_ms(written, kernel, x, runs=args.runs)
        b = median_ms(jax.jit(scanned), kernel, x, runs=args.runs)
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.1f} |", flush=True)


if __name__ == "__main__":
    main()
