"""1x1 convolutions: `cpu_kernels.pointwise` (one 2-D matrix product) against the 4-D einsum.

A 1x1 convolution is a matrix product over channels. Written as the einsum `bhwc,cf->bhwf`, its
kernel gradient is `bhwc,bhwf->cf`, a product with three contracting axes; `cpu_kernels.pointwise`
flattens the positions into rows first, so the kernel gradient is `rows^T @ dy` with one. This
times the forward and the backward (dx + dkernel of sum(conv(x, k) * w)) both ways at the 1x1
shapes of the R-50 FCOS training step at 800x1344, batch 2, compiled as the library compiles its
programs (`compile_options.compiler_options()`).

  .venv/bin/python benchmarks/pointwise.py [--runs 5]

Prints the median milliseconds of each and the ratio pointwise / einsum.
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

# name: (batch, height, width, cin, cout) of the R-50 bottlenecks' 1x1 convolutions (stride 1).
SHAPES = {
    "res2 conv1 256->64": (2, 200, 336, 256, 64),
    "res2 conv3 64->256": (2, 200, 336, 64, 256),
    "res3 conv1 512->128": (2, 100, 168, 512, 128),
    "res3 conv3 128->512": (2, 100, 168, 128, 512),
    "res4 conv1 1024->256": (2, 50, 84, 1024, 256),
    "res4 conv3 256->1024": (2, 50, 84, 256, 1024),
    "res5 conv3 512->2048": (2, 25, 42, 512, 2048),
    "FPN lateral 2048->256": (2, 25, 42, 2048, 256),
}


def einsum_4d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.einsum("bhwc,cf->bhwf", x, kernel)


def programs(conv):
    """(forward, backward) jits of one 1x1 formulation."""
    options = compile_options.compiler_options()

    def loss(x, kernel, weights):
        return jnp.sum(conv(x, kernel) * weights)

    return (
        jax.jit(conv, compiler_options=options),
        jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"1x1 convolution, {jax.devices()[0].platform} ({cpu_model()}), median of {args.runs}"
        " runs, ms"
    )
    print(
        "| convolution | input | forward: einsum | pointwise | backward: einsum | pointwise |"
        " backward pointwise / einsum |\n|---|---|---|---|---|---|---|"
    )
    einsum_fwd, einsum_bwd = programs(einsum_4d)
    pw_fwd, pw_bwd = programs(cpu_kernels.pointwise)
    for name, (b, h, w, cin, cout) in SHAPES.items():
        x = jnp.asarray(rng.standard_normal((b, h, w, cin)), jnp.float32)
        kernel = jnp.asarray(0.05 * rng.standard_normal((cin, cout)), jnp.float32)
        weights = jnp.asarray(rng.standard_normal((b, h, w, cout)), jnp.float32)
        row = [
            median_ms(einsum_fwd, x, kernel, runs=args.runs),
            median_ms(pw_fwd, x, kernel, runs=args.runs),
            median_ms(einsum_bwd, x, kernel, weights, runs=args.runs),
            median_ms(pw_bwd, x, kernel, weights, runs=args.runs),
        ]
        cells = " | ".join(f"{t:.1f}" for t in row)
        print(f"| {name} | {b}x{h}x{w}x{cin} | {cells} | {row[3] / row[2]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
