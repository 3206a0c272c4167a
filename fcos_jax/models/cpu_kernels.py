"""The convolution and max-pool computations under `layers`, in the forms XLA:CPU runs fastest.

XLA:CPU's speed depends a lot on how a convolution is written, so `conv2d` picks a form per
shape at trace time: a 1x1 convolution is one 2-D matrix product with the positions as rows
(`pointwise`); a wide float32 3x3 convolution over many positions runs its forward as Winograd
F(4x4, 3x3) (`models.winograd`); grouped kernels (ResNeXt) take their kernel gradient as one
matrix product per tap, and narrow groups also their forward and input gradient as a tap sum;
inside a while loop (gradient accumulation, `inside_a_loop`) every kernel gradient is per tap.
Everything else is XLA's own convolution and gradients. `max_pool` has a gradient of its own
because XLA:CPU's is slow. Each tuned form is the `cpu` branch of `lax.platform_dependent`, so a
program lowered for a GPU or TPU (also one exported on a CPU host) holds XLA's own convolution
and gradients only; `accelerator_kernels()` traces that form alone, whatever the backend. The
measurements behind each choice are in docs/benchmarks.md#behind-the-code.
"""

import contextlib
import contextvars
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from fcos_jax.models import winograd


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int = 1):
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


# Narrow groups (at most this many input and output channels each) take the tap-sum path. Wider
# groups run slower that way inside the backbone: the transpose back to channel order, fused into
# the following BN + ReLU, turns the groups-minor loads into strided ones.
TAP_SUM_MAX_GROUP_WIDTH = 4


def _grouped_tap_sum(x: jax.Array, weights: jax.Array, stride: int, out_hw: tuple[int, int]):
    """Grouped correlation as one elementwise sum over taps and input channels, groups minor.

    x: [B, Hp, Wp, Cin/G, G] (already padded), weights: [kh, kw, Cin/G, Cout/G, G]
    -> [B, H', W', Cout/G, G]. Each of the kh * kw * Cin/G terms multiplies a strided window of one
    input channel of every group by the matching kernel column of every group; with the groups as
    the minor axis XLA:CPU vectorises the sum over them (faster than its grouped convolution,
    whose per-group products are too small at these widths).
    """
    kh, kw, cin_per_group = weights.shape[:3]
    out_h, out_w = out_hw
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    y = 0.0
    for i in range(kh):
        for j in range(kw):
            window = x[:, i : i + span_h : stride, j : j + span_w : stride]
            for c in range(cin_per_group):
                y = y + window[:, :, :, c : c + 1, :] * weights[i, j, c]
    return y


def _groups_minor(x: jax.Array, groups: int) -> jax.Array:
    """[B, H, W, C] (channel g * C/G + c) -> [B, H, W, C/G, G]."""
    return x.reshape(*x.shape[:3], groups, -1).swapaxes(3, 4)


def _groups_major(x: jax.Array) -> jax.Array:
    """[B, H, W, C/G, G] -> [B, H, W, C] (channel g * C/G + c)."""
    return x.swapaxes(3, 4).reshape(*x.shape[:3], -1)


def _uses_tap_sum(kernel_shape: tuple[int, ...], groups: int) -> bool:
    """True when XLA:CPU runs this grouped convolution as `_grouped_tap_sum` (narrow groups)."""
    _, _, cin_per_group, cout = kernel_shape
    width = max(cin_per_group, cout // groups)
    return groups > 1 and width <= TAP_SUM_MAX_GROUP_WIDTH


# Set (at trace time) by `accelerator_kernels`: trace no XLA:CPU-tuned kernel.
_ACCELERATOR_KERNELS = contextvars.ContextVar("accelerator_kernels", default=False)


@contextlib.contextmanager
def accelerator_kernels():
    """Within this context the model traces XLA's own convolutions and gradients only: the
    program a GPU or TPU compiles, whatever backend it is compiled for here. Outside it each
    convolution carries both forms and the lowering keeps the one of its platform
    (`_per_platform`); inside it a CPU-only machine can compile and read an accelerator's
    program (its collectives, its operations)."""
    token = _ACCELERATOR_KERNELS.set(True)
    try:
        yield
    finally:
        _ACCELERATOR_KERNELS.reset(token)


def portable_only() -> bool:
    """True while tracing inside `accelerator_kernels()`: `conv2d`'s `portable` argument."""
    return _ACCELERATOR_KERNELS.get()


def _per_platform(xla_cpu: Callable, portable: Callable, *operands, portable_only: bool):
    """`xla_cpu(*operands)` in a program lowered for XLA:CPU, `portable(*operands)` on every
    other platform. `lax.platform_dependent`: a program lowered for one platform keeps only its
    branch, and one exported for several (`jax.export`) carries both, chosen where it runs.
    portable_only: trace `portable` alone (`accelerator_kernels`)."""
    if portable_only:
        return portable(*operands)
    return lax.platform_dependent(*operands, cpu=xla_cpu, default=portable)


# Set (at trace time) by `inside_a_loop`: the gradients being traced run inside a while loop.
_IN_A_LOOP = contextvars.ContextVar("conv_gradients_in_a_loop", default=False)


@contextlib.contextmanager
def inside_a_loop():
    """Within this context every kernel gradient `conv2d` traces is the per-tap one on XLA:CPU.
    For gradients that run inside a `lax.scan` (gradient accumulation's micro-batch loop): there
    XLA:CPU's own kernel-gradient convolution runs tens of times slower than outside a loop, the
    per-tap matrix products do not (`benchmarks/loop_conv.py`)."""
    token = _IN_A_LOOP.set(True)
    try:
        yield
    finally:
        _IN_A_LOOP.reset(token)


def _uses_tap_kernel_gradient(groups: int) -> bool:
    """True: on XLA:CPU `conv2d`'s kernel gradient is per tap; False: XLA's own everywhere
    (module notes above). Grouped kernels take the per-tap loop (XLA:CPU's grouped kernel
    gradient is far slower), and so does every kernel inside `inside_a_loop`; ungrouped ones
    outside a loop take XLA's."""
    return groups > 1 or _IN_A_LOOP.get()


def _tap_sum_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int):
    """The grouped convolution `conv2d` computes, as `_grouped_tap_sum` (same values up to the
    order of float sums)."""
    kh, kw, cin_per_group, cout = kernel.shape
    out_h = (x.shape[1] + 2 * padding - kh) // stride + 1
    out_w = (x.shape[2] + 2 * padding - kw) // stride + 1
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0), (0, 0))
    x = jnp.pad(_groups_minor(x, groups), pad)
    weights = kernel.reshape(kh, kw, cin_per_group, groups, -1).swapaxes(3, 4)
    return _groups_major(_grouped_tap_sum(x, weights, stride, (out_h, out_w)))


def _tap_sum_input_gradient(dy, kernel, stride, padding, groups, in_hw):
    """dx of `_tap_sum_conv`: the transposed convolution, as a stride-1 tap sum over dy dilated by
    the stride and padded (kernel flipped, input and output channels of each group swapped)."""
    kh, kw, cin_per_group, cout = kernel.shape
    out_h, out_w = dy.shape[1:3]
    pads = []
    for size, out, k in ((in_hw[0], out_h, kh), (in_hw[1], out_w, kw)):
        low = k - 1 - padding
        pads.append((low, size + k - 1 - low - (stride * (out - 1) + 1), stride - 1))
    zero = jnp.zeros((), dy.dtype)
    dy = lax.pad(_groups_minor(dy, groups), zero, ((0, 0, 0), *pads, (0, 0, 0), (0, 0, 0)))
    weights = kernel.reshape(kh, kw, cin_per_group, groups, -1).transpose(0, 1, 4, 2, 3)
    return _groups_major(_grouped_tap_sum(dy, weights[::-1, ::-1], 1, in_hw))


# Wide, large 3x3 convolutions (at least this many input and output channels and output positions
# H * W per image) run forward as Winograd F(4x4, 3x3) on XLA:CPU, in float32 only (bfloat16 would
# lose too much in the transforms); below these sizes the transforms cost more than the products
# they save. Gradients stay XLA's: through the transforms they were slower.
# The choice depends on the image size, never on the batch: an image's outputs do not change with
# the images it is batched with, and a symbolic batch (`jax.export`) decides as a concrete one.
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_MIN_POSITIONS = 4096


def _uses_winograd(x: jax.Array, kernel_shape: tuple[int, ...], stride, padding, groups) -> bool:
    kh, kw, cin, cout = kernel_shape
    return (
        (kh, kw, stride, padding, groups) == (3, 3, 1, 1, 1)
        and min(cin, cout) >= WINOGRAD_MIN_CHANNELS
        and x.shape[1] * x.shape[2] >= WINOGRAD_MIN_POSITIONS
        and x.dtype == jnp.float32
    )


def _conv_forward(x, kernel, stride: int, padding: int, groups: int, portable: bool):
    """The convolution's value: XLA's own, or on XLA:CPU Winograd / the tap sum where those are
    faster (`_per_platform`)."""
    xla = lambda x_, k_: _xla_conv(x_, k_, stride, padding, groups)  # noqa: E731
    if _uses_winograd(x, kernel.shape, stride, padding, groups):
        tuned = lambda x_, k_: winograd.conv3x3(x_, winograd.kernel_transform(k_))  # noqa: E731
    elif _uses_tap_sum(kernel.shape, groups):
        tuned = lambda x_, k_: _tap_sum_conv(x_, k_, stride, padding, groups)  # noqa: E731
    else:
        return xla(x, kernel)
    return _per_platform(tuned, xla, x, kernel, portable_only=portable)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    stride: int,
    padding: int,
    groups: int = 1,
    portable: bool = False,
) -> jax.Array:
    """NHWC x HWIO convolution, symmetric zero padding, `groups` feature groups; forward and input
    gradient are XLA's (narrow groups: `_grouped_tap_sum`; wide float32 3x3 forwards: Winograd),
    the kernel gradient XLA's when ungrouped, else a sum of per-tap matrix products (module
    docstring).

    x: [B, H, W, Cin], kernel: [k, k, Cin / groups, Cout] -> [B, H', W', Cout],
    H' = (H + 2p - k) // s + 1; output channels [g * Cout / groups, (g + 1) * Cout / groups) see
    only input channels [g * Cin / groups, (g + 1) * Cin / groups). portable: XLA's own
    convolution and gradients only, on every backend (`accelerator_kernels`; a static argument,
    so that traces with and without it are cached apart).
    """
    return _conv_forward(x, kernel, stride, padding, groups, portable)


def _conv2d_fwd(x, kernel, stride, padding, groups, portable):
    return _conv_forward(x, kernel, stride, padding, groups, portable), (x, kernel)


def _tap_kernel_gradient(patch: jax.Array, dy_rows: jax.Array, groups: int) -> jax.Array:
    """One tap's kernel gradient -> [Cin / G, Cout]: ungrouped, patch [N, Cin] (input pixels under
    the tap) and dy_rows [N, Cout] give patch^T dy_rows; grouped, patch [G, N, Cin / G] and
    dy_rows [G, N, Cout / G] give per group g patch[g]^T dy_rows[g]."""
    if groups == 1:
        return jnp.matmul(patch.T, dy_rows, preferred_element_type=jnp.float32)
    product = jnp.einsum("gnc,gnd->cgd", patch, dy_rows, preferred_element_type=jnp.float32)
    return product.reshape(patch.shape[-1], -1)


def _tap_input_gradient(
    dy: jax.Array, kernel: jax.Array, stride: int, padding: int, in_hw: tuple[int, int]
) -> jax.Array:
    """The input gradient of an ungrouped `conv2d` as one matrix product per kernel tap, each
    added into its strided window of the padded input (inside a loop XLA:CPU runs this several
    times faster than its transposed convolution: `benchmarks/loop_conv.py`). Taps written out:
    a `fori_loop` over them took more temporary memory, not less.

    dy: [B, H', W', Cout], kernel: [k, k, Cin, Cout] -> dx [B, H, W, Cin], in_hw = (H, W).
    """
    kh, kw, cin, _ = kernel.shape
    batch, out_h, out_w = dy.shape[:3]
    height, width = in_hw
    dx = jnp.zeros((batch, height + 2 * padding, width + 2 * padding, cin), dy.dtype)
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    for i in range(kh):
        for j in range(kw):
            tap = jnp.einsum("bhwo,io->bhwi", dy, kernel[i, j].astype(dy.dtype))
            dx = dx.at[:, i : i + span_h : stride, j : j + span_w : stride, :].add(tap)
    return dx[:, padding : padding + height, padding : padding + width, :]


def _conv2d_bwd(stride, padding, groups, portable, residuals, dy):
    x, kernel = residuals

    def xla_gradients(x, kernel, dy):
        _, vjp = jax.vjp(lambda x_, k_: _xla_conv(x_, k_, stride, padding, groups), x, kernel)
        return vjp(dy)

    if not _uses_tap_kernel_gradient(groups):
        return xla_gradients(x, kernel, dy)
    tuned = functools.partial(_tuned_gradients, stride, padding, groups, _IN_A_LOOP.get())
    return _per_platform(tuned, xla_gradients, x, kernel, dy, portable_only=portable)


def _tuned_gradients(stride, padding, groups, in_a_loop, x, kernel, dy):
    """(dx, dkernel) of `conv2d` as XLA:CPU runs them fastest: the kernel gradient per tap; the
    input gradient as a tap sum (narrow groups), per-tap products (ungrouped, in a loop) or
    XLA's transposed convolution."""
    if _uses_tap_sum(kernel.shape, groups):
        dx = _tap_sum_input_gradient(dy, kernel, stride, padding, groups, x.shape[1:3])
    elif groups == 1 and in_a_loop:
        dx = _tap_input_gradient(dy, kernel, stride, padding, x.shape[1:3])
    else:
        _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, stride, padding, groups), x)
        (dx,) = input_vjp(dy)
    kh, kw, cin_per_group, cout = kernel.shape
    batch, out_h, out_w = dy.shape[:3]
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dy_rows = dy.reshape(-1, cout)
    lead = ()  # leading group axis of x and dy_rows: none, or G (group-major copies)
    if groups > 1:
        # Made once outside the loop ([G, B, H, W, Cin / G] and [G, N, Cout / G]), so that the
        # batched products need no transposes per tap.
        x = jnp.moveaxis(x.reshape(*x.shape[:3], groups, cin_per_group), 3, 0)
        dy_rows = jnp.moveaxis(dy_rows.reshape(-1, groups, cout // groups), 1, 0)
        lead = (groups,)
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    every = (slice(None),) * len(lead)

    def tap(t: jax.Array, dkernel: jax.Array) -> jax.Array:
        """dkernel[t] = sum over (b, h, w) of x_pad[b, s*h + i, s*w + j, :]^T dy[b, h, w, :]
        within each group, (i, j) = divmod(t, kw)."""
        i, j = t // kw, t % kw
        window = lax.dynamic_slice(
            x, (0,) * len(lead) + (0, i, j, 0), lead + (batch, span_h, span_w, cin_per_group)
        )
        patch = window[every + (slice(None), slice(None, None, stride), slice(None, None, stride))]
        product = _tap_kernel_gradient(patch.reshape(*lead, -1, cin_per_group), dy_rows, groups)
        return lax.dynamic_update_index_in_dim(dkernel, product, t, 0)

    # A loop, not kh * kw independent products: each tap's slice of x is a copy the size of x, and
    # XLA:CPU would cut them all at once (several times the backward pass's temporary memory).
    # Zeros typed like x and dy: inside `jax.shard_map` a loop carry must vary over the devices
    # as the products added into it do.
    shape = (kh * kw, cin_per_group, cout)
    zeros = jnp.zeros_like(x, shape=shape, dtype=jnp.float32)
    zeros = zeros + jnp.zeros_like(dy_rows, shape=shape, dtype=jnp.float32)
    dkernel = lax.fori_loop(0, kh * kw, tap, zeros)
    return dx, dkernel.reshape(kh, kw, cin_per_group, cout).astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def max_pool(x: jax.Array, kernel_size: int, stride: int, padding: int) -> jax.Array:
    """Max pooling with PyTorch semantics: -inf padding, and the gradient of each output goes to
    the first maximum of its window in row-major order (torch.nn.functional.max_pool2d's index),
    also when the window holds ties (common after a ReLU).

    x: [B, H, W, C] -> [B, H', W', C], H' = (H + 2p - k) // s + 1.

    The backward pass is an argmax over the k*k window taps and strided scatters by interior
    padding: XLA's own max-pool gradient (a variadic reduce-window over index iotas, then a
    scatter) took a large share of a from-scratch ResNet-18 training step on XLA:CPU.
    """
    return _max_pool(x, kernel_size, stride, padding, _POOL_AS_TAPS.get())


def _padded_taps(x, kernel_size, stride, padding):
    """x [B, H, W, C] padded with -inf, and its k*k window taps in row-major order: tap (i, j) is
    [B, H', W', C], the element at row i, column j of every output's window."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    x_pad = jnp.pad(x, pad, constant_values=-jnp.inf)
    out_h = (x_pad.shape[1] - kernel_size) // stride + 1
    out_w = (x_pad.shape[2] - kernel_size) // stride + 1
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    taps = [
        x_pad[:, i : i + span_h : stride, j : j + span_w : stride]
        for i in range(kernel_size)
        for j in range(kernel_size)
    ]
    return x_pad, taps


# Set (at trace time) by `max_pool_as_taps`: the ONNX export's forward formulation.
_POOL_AS_TAPS = contextvars.ContextVar("max_pool_as_taps", default=False)


@contextlib.contextmanager
def max_pool_as_taps():
    """Within this context, `max_pool` traces its forward as the maximum of the k*k strided
    taps instead of `lax.reduce_window`: the same values, and what ONNX export needs (jax2onnx
    turns an NHWC reduce_window into a 4-d MaxPool that onnxruntime rejects). Not the default:
    on XLA:CPU the taps are slower than reduce_window (a padded copy per call)."""
    token = _POOL_AS_TAPS.set(True)
    try:
        yield
    finally:
        _POOL_AS_TAPS.reset(token)


def _max_pool_forward(x, kernel_size, stride, padding, as_taps):
    if as_taps:
        _, taps = _padded_taps(x, kernel_size, stride, padding)
        return functools.reduce(jnp.maximum, taps)
    return lax.reduce_window(
        x,
        -jnp.inf,
        lax.max,
        (1, kernel_size, kernel_size, 1),
        (1, stride, stride, 1),
        ((0, 0), (padding, padding), (padding, padding), (0, 0)),
    )


# as_taps is a static argument, not read from the context in here: JAX caches the trace of a
# custom_vjp function per static arguments, so a switch read inside could be ignored.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, kernel_size, stride, padding, as_taps):
    return _max_pool_forward(x, kernel_size, stride, padding, as_taps)


def _max_pool_fwd(x, kernel_size, stride, padding, as_taps):
    return _max_pool_forward(x, kernel_size, stride, padding, as_taps), x


def _max_pool_bwd(kernel_size, stride, padding, as_taps, x, dy):
    x_pad, taps = _padded_taps(x, kernel_size, stride, padding)
    out_h, out_w = dy.shape[1:3]
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    # The winning tap is chosen here from x alone, not by comparing with the forward's output:
    # XLA may recompute x inside different fusions with different rounding, and an equality test
    # against the forward's maximum could then drop or move a gradient.
    windows = jnp.stack(taps)
    first = jnp.argmax(windows, axis=0)  # first maximum in row-major window order
    zero = jnp.zeros((), dy.dtype)
    dx_pad = jnp.zeros(x_pad.shape, dy.dtype)
    for t in range(kernel_size * kernel_size):
        i, j = divmod(t, kernel_size)
        placed = lax.pad(
            jnp.where(first == t, dy, zero),
            zero,
            (
                (0, 0, 0),
                (i, x_pad.shape[1] - i - span_h, stride - 1),
                (j, x_pad.shape[2] - j - span_w, stride - 1),
                (0, 0, 0),
            ),
        )
        dx_pad = dx_pad + placed
    h, w = x.shape[1:3]
    return (dx_pad[:, padding : padding + h, padding : padding + w],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 1x1 convolution as one 2-D matrix product: x [B, H, W, Cin] @ kernel [Cin, Cout] ->
    [B, H, W, Cout], with positions flattened into rows."""
    rows = x.reshape(-1, x.shape[-1]) @ kernel
    return rows.reshape(*x.shape[:-1], kernel.shape[-1])
