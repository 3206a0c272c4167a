"""XLA compile options of the model's programs (train step, evaluation, inference).

On XLA:CPU (jaxlib 0.10) convolutions and matrix products are handed to YNNPACK by default. Its
grouped convolution (ResNeXt's 64 groups) is several times slower than XLA's own convolution of
the same operands, while its dense convolutions and matrix products are no faster than XLA's
(docs/benchmarks.md#behind-the-code). The model's programs are therefore compiled with XLA's
defaults less one: convolutions stay with XLA; other backends get none.

The option is per program (`jax.jit(..., compiler_options=...)`), so nothing process-wide
(`XLA_FLAGS`) is touched and programs of the user's own are unaffected.
"""

import jax

# DebugOptions.xla_cpu_experimental_ynn_fusion_type: the operation kinds YNNPACK may take. The
# default (jaxlib 0.10) is individual dots, individual convolutions and reductions; this is the
# default without convolutions (checked by tests/test_compile_options.py).
YNN_FUSION_TYPES = "xla_cpu_experimental_ynn_fusion_type"
YNN_ALL_BUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's default
    backend): on CPU, YNNPACK takes what it takes by default but convolutions; elsewhere None."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return None
    return {YNN_FUSION_TYPES: YNN_ALL_BUT_CONVOLUTIONS}
