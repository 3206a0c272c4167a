"""Per-operation profiles, ours (XLA's trace) against torch's (torch.profiler), of one benchmark.

Used by the benchmarks' `--profile DIR` option (`resnext.py`, `train_step.py`): after its timed
runs each worker runs its computation again under its framework's profiler and writes what it
saw to DIR; the orchestrator then prints one table of both sides. Nothing here is timed code.

  JAX     `jax.profiler.trace` (its Perfetto trace: one event per executed XLA thunk, named by
          the HLO instruction) and the compiled HLO text, which gives each instruction its
          operation (convolution, dot, fusion and what it fuses), operand shapes and the Flax
          module that issued it. XLA:CPU launches its own convolutions and matrix products
          (not YNNPACK's) asynchronously, so their events end at the launch: their time runs
          to the start of the first thunk that reads their result.
  torch   a clock on every nn.Conv2d (forward and backward hooks; torch runs them
          synchronously on the CPU), the rest of the wall time one row.

Rows group operations the same way on both sides, by what they compute: convolutions and matrix
products by kernel (`3x3 g64 16ch` = 3x3, 64 groups of 16 input channels; a 1x1 convolution is a
matrix product, written `1x1 1024->256`), split into forward and backward (the gradients of either
side), and everything else by kind (normalisation and activation fusions, reductions, copies,
pooling). Times are ms per run. XLA runs independent thunks at the same time (the five pyramid
levels' heads, the backward's two gradients of a convolution): each stretch of wall time is shared
equally among the thunks running during it, so our rows sum to at most the wall time (the table
prints both; torch's sum leaves out its Python and dispatch time between operations). GFLOP/s counts
2 flops per multiply-add.
"""

import collections
import gzip
import itertools
import json
import math
import re
import shutil
from pathlib import Path

JAX_TRACE = "jax_trace"
JAX_HLO = "jax_hlo.txt"
TORCH_ROWS = "torch_rows.json"
MAX_KERNEL_TAPS = 49  # 7x7, the largest kernel of the ResNet / FPN / FCOS models


# --------------------------------------------------------------------------------------------
# Capture (inside the workers)


def capture_jax(run, compiled_text: str, runs: int, directory: str) -> float:
    """Calls `run()` (which blocks until done) `runs` times under jax.profiler.trace; writes the
    trace and `compiled_text` (the executable's HLO) to `directory`. Returns the wall s per run."""
    import time

    import jax

    out = Path(directory)
    shutil.rmtree(out / JAX_TRACE, ignore_errors=True)  # `jax_profile` reads the one trace
    out.mkdir(parents=True, exist_ok=True)
    (out / JAX_HLO).write_text(compiled_text)
    with jax.profiler.trace(str(out / JAX_TRACE), create_perfetto_trace=True):
        run()  # left out of the table (`jax_profile`), as torch's warm-up step
        start = time.perf_counter()
        for _ in range(runs):
            run()
        wall = (time.perf_counter() - start) / runs
    return wall


def capture_torch(model, run, runs: int, directory: str) -> float:
    """Calls `run()` `runs` times (after one untimed call) with a clock on every nn.Conv2d of
    `model`: the forward from its pre-hook to its hook, the backward (input and kernel gradient,
    one aten call) from its backward pre-hook to its backward hook. Writes the seconds and
    flops per kernel to `directory`; returns the wall s per run. torch.profiler is not used:
    with input shapes recorded it made this forward 3 to 6 times slower, its BatchNorm most."""
    import time

    import torch

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rows = collections.defaultdict(lambda: [0.0, 0])
    started = {}
    clock = {"on": False}

    def kernel(conv: torch.nn.Conv2d) -> str:
        k, groups = conv.kernel_size, conv.groups
        cin = conv.in_channels // groups
        if k == (1, 1) and groups == 1:
            return f"matmul {cin}->{conv.out_channels}"
        group = f" g{groups}" if groups > 1 else ""
        return f"{k[0]}x{k[1]}{group} {cin}ch"

    def add(row: str, seconds: float, flops: int) -> None:
        if clock["on"]:
            rows[row][0] += 1e3 * seconds / runs
            rows[row][1] += flops / runs

    def forward_flops(conv, output) -> int:
        k = conv.kernel_size
        return 2 * output.numel() * conv.in_channels // conv.groups * k[0] * k[1]

    handles = []
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):

        def pre(m, args):
            started[id(m), "forward"] = time.perf_counter()

        def post(m, args, output):
            seconds = time.perf_counter() - started[id(m), "forward"]
            m._profile_flops = forward_flops(m, output)
            add(f"forward: {kernel(m)}", seconds, m._profile_flops)

        def backward_pre(m, grad_output):
            started[id(m), "backward"] = time.perf_counter()

        def backward_post(m, grad_input, grad_output):
            seconds = time.perf_counter() - started[id(m), "backward"]
            add(f"backward: {kernel(m)}", seconds, 2 * m._profile_flops)

        handles += [conv.register_forward_pre_hook(pre), conv.register_forward_hook(post)]
        if any(p.requires_grad for p in conv.parameters()):
            handles.append(conv.register_full_backward_pre_hook(backward_pre))
            handles.append(conv.register_full_backward_hook(backward_post))
    run()
    clock["on"] = True
    start = time.perf_counter()
    for _ in range(runs):
        run()
    wall = (time.perf_counter() - start) / runs
    for handle in handles:
        handle.remove()
    rest = 1e3 * wall - sum(ms for ms, _ in rows.values())
    rows["everything else (norm, activation, pooling, loss, optimizer, Python)"] = [rest, 0]
    (out / TORCH_ROWS).write_text(json.dumps(rows))
    return wall


# --------------------------------------------------------------------------------------------
# The compiled HLO: instruction -> what it computes

_SHAPE = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = (\w+)\[([\d,]*)\]")
_OPERANDS = re.compile(r" (\w[\w-]*)\((%[^)]*)\)")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def parse_hlo(text: str) -> tuple[dict, dict]:
    """HLO module text -> (instructions, computations): instructions[name] = dict(op, shape,
    operands, line, computation); computations[name] = [instruction names]."""
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            computations[current] = []
            continue
        match = _SHAPE.match(line)
        if not match or current is None:
            continue
        name, _, shape = match.groups()
        op_match = _OPERANDS.search(line[match.end() :])
        op = op_match.group(1) if op_match else ""
        operands = [o.strip().lstrip("%") for o in op_match.group(2).split(",")] if op_match else []
        operands = [re.sub(r"^/\*index=\d+\*/%?", "", o) for o in operands]
        instructions[name] = dict(
            op=op, shape=_dims(shape), operands=operands, line=line, computation=current
        )
        computations[current].append(name)
    return instructions, computations


def _attribute(line: str, key: str) -> str | None:
    match = re.search(key + r"=\{?([^,}\s]*)", line)
    return match.group(1) if match else None


def _matmul_kind(inst: dict, instructions: dict) -> tuple[str, int] | None:
    """(kernel description, flops) of a convolution or dot instruction, else None."""
    line = inst["line"]
    if inst["op"] == "convolution":
        lhs, rhs = (instructions[o]["shape"] for o in inst["operands"][:2])
        labels = _attribute(line, "dim_labels") or "b01f_01io->b01f"
        rhs_labels = labels.split("_")[1].split("->")[0]
        out_features = rhs[rhs_labels.index("o")]
        in_features = rhs[rhs_labels.index("i")]
        window = _attribute(line, "size") or "1"
        groups = int(_attribute(line, "feature_group_count") or 1)
        batch_groups = int(_attribute(line, "batch_group_count") or 1)
        flops = 2 * math.prod(inst["shape"]) * math.prod(rhs) // out_features
        if batch_groups > 1:
            return f"conv {window} batch-grouped", flops
        if math.prod(_dims(window.replace("x", ","))) > MAX_KERNEL_TAPS:
            # A window larger than any kernel of these models: XLA's kernel-gradient convolution
            # (the window is dy's spatial extent, the "channels" the batch).
            return f"kernel gradient (window {window})", flops
        group = f" g{groups}" if groups > 1 else ""
        return f"{window}{group} {in_features}ch", flops
    if inst["op"] == "dot":
        lhs = instructions[inst["operands"][0]]["shape"]
        contracting = _dims(_attribute(line, "lhs_contracting_dims") or "")
        batch = _dims(_attribute(line, "lhs_batch_dims") or "")
        k = math.prod(lhs[d] for d in contracting)
        n = inst["shape"][-1] if inst["shape"] else 1
        flops = 2 * math.prod(inst["shape"]) * k
        prefix = f"batched[{math.prod(lhs[d] for d in batch)}] " if batch else ""
        return f"{prefix}matmul {k}->{n}", flops
    return None


def _module_scope(line: str) -> str:
    name = re.search(r'op_name="([^"]*)"', line)
    return name.group(1) if name else ""


def _is_backward(scope: str) -> bool:
    return "transpose(" in scope or "_bwd" in scope or "vjp" in scope.split("/")[-1]


def classify_jax(name: str, instructions: dict, computations: dict) -> tuple[str, int]:
    """An executed instruction -> (row, flops)."""
    inst = instructions.get(name)
    if inst is None:
        return "other (not in the HLO)", 0
    scope = _module_scope(inst["line"])
    direction = "backward" if _is_backward(scope) else "forward"
    members = _members(inst, instructions, computations)
    kinds = [k for k in (_matmul_kind(m, instructions) for m in members) if k]
    if kinds:
        kernel = max(kinds, key=lambda k: k[1])[0]
        return f"{direction}: {kernel}", sum(f for _, f in kinds)
    ops = {m["op"] for m in members}
    if "reduce-window" in ops or "select-and-scatter" in ops:
        kind = "pooling"
    elif "reduce" in ops:
        kind = "reductions (norm statistics, bias gradients, losses)"
    elif ops <= {"copy", "transpose", "bitcast", "pad", "slice", "concatenate", "parameter"}:
        kind = "copies, pads, transposes"
    elif ops & {"multiply", "add", "maximum", "subtract", "select"} and _taps(members):
        kind = "tap sums (small grouped convolutions)"
    else:
        kind = "elementwise fusions (norm, activation, residual, optimizer)"
    return f"{direction}: {kind}", 0


def _taps(members: list[dict]) -> bool:
    """Whether a fusion multiplies several shifted slices of one input (our tap-sum grouped
    convolution): at least 9 slices feeding multiplies."""
    return sum(m["op"] == "slice" for m in members) >= 9


def _launched_asynchronously(inst: dict | None, instructions: dict, computations: dict) -> bool:
    """XLA:CPU's own convolutions and matrix products (not YNNPACK's) run on its thread pool
    after their thunk returns: their trace events end at the launch."""
    if inst is None or '"__ynn_fusion"' in inst["line"]:
        return False
    members = _members(inst, instructions, computations)
    return any(m["op"] in ("convolution", "dot") for m in members)


def _members(inst: dict, instructions: dict, computations: dict) -> list[dict]:
    """A fusion's instructions (those of the computation it calls), else [inst]."""
    if inst["op"] != "fusion":
        return [inst]
    called = (_attribute(inst["line"], "calls") or "").lstrip("%")
    return [instructions[m] for m in computations.get(called, [])]


def jax_profile(directory: str) -> dict:
    """{row: [ms per run, flops per run]} from a `capture_jax`, the warm-up run left out."""
    out = Path(directory)
    instructions, computations = parse_hlo((out / JAX_HLO).read_text())
    trace = next((out / JAX_TRACE).rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    run_starts = {}  # run id -> its first event's time
    for e in events:
        run_id = e.get("args", {}).get("run_id")
        if run_id is not None and "hlo_op" in e["args"]:
            run_starts[run_id] = min(run_starts.get(run_id, e["ts"]), e["ts"])
    first = min(run_starts, key=run_starts.get)  # the warm-up run of `capture_jax`
    runs = max(1, len(run_starts) - 1)
    thunks = collections.defaultdict(list)  # run id -> [(start us, end us, instruction)]
    for event in events:
        args = event.get("args", {})
        op, run_id = args.get("hlo_op"), args.get("run_id")
        if not op or event.get("ph") != "X" or run_id == first:
            continue
        inst = instructions.get(op)
        if inst is not None and inst["op"] in ("while", "conditional", "call"):
            continue  # their bodies' thunks are events of their own
        thunks[run_id].append((event["ts"], event["ts"] + event["dur"], op))
    consumers = collections.defaultdict(set)  # instruction -> instructions reading it
    for name, inst in instructions.items():
        for operand in inst["operands"]:
            consumers[operand].add(name)
    # What each executed instruction is: (row, flops, launched asynchronously), once per name.
    kinds = {
        op: (
            *classify_jax(op, instructions, computations),
            _launched_asynchronously(instructions.get(op), instructions, computations),
        )
        for op in {op for run in thunks.values() for _, _, op in run}
    }
    rows = collections.defaultdict(lambda: [0.0, 0])
    for run in thunks.values():
        run.sort()
        starts = collections.defaultdict(list)  # instruction -> its thunks' start times
        for start, _, op in run:
            starts[op].append(start)
        intervals = []  # (start us, end us, row) of each executed thunk
        for index, (start, end, op) in enumerate(run):
            row, flops, asynchronous = kinds[op]
            if asynchronous:
                # Its work ends when the first thunk reading its result starts (or the next
                # thunk, if none of this program reads it).
                later = [t for c in consumers[op] for t in starts.get(c, ()) if t >= end]
                following = run[index + 1][0] if index + 1 < len(run) else end
                end = max(end, min(later) if later else following)
            intervals.append((start, end, row))
            rows[row][1] += flops / runs
        for row, us in _shared_time(intervals).items():
            rows[row][0] += us / 1e3 / runs
    return dict(rows)


def _shared_time(intervals: list[tuple[float, float, str]]) -> dict[str, float]:
    """{row: microseconds}: the wall time covered by the intervals, each stretch shared equally
    among the intervals running during it (XLA runs independent thunks at the same time), so the
    rows sum to the busy wall time instead of counting overlaps twice."""
    edges = sorted({t for start, end, _ in intervals for t in (start, end)})
    opening = collections.defaultdict(list)
    for start, end, row in intervals:
        opening[start].append((end, row))
    shares: dict[str, float] = collections.defaultdict(float)
    active: list[tuple[float, str]] = []
    for left, right in itertools.pairwise(edges):
        active = [(end, row) for end, row in active if end > left] + opening.get(left, [])
        for _, row in active:
            shares[row] += (right - left) / len(active)
    return shares


# --------------------------------------------------------------------------------------------
# torch's rows


def torch_profile(directory: str) -> dict:
    """{row: [ms per run, flops per run]} of a `capture_torch`."""
    return json.loads((Path(directory) / TORCH_ROWS).read_text())


# --------------------------------------------------------------------------------------------
# The table


def print_table(ours: dict, theirs: dict, walls: tuple[float, float], top: int = 30) -> None:
    """One markdown table of both profiles, rows sorted by the larger side's time."""
    names = sorted(set(ours) | set(theirs), key=lambda r: -max(ours.get(r, [0])[0],
                                                                theirs.get(r, [0])[0]))  # fmt: skip

    def cell(row):
        if row is None:
            return "—", "—"
        ms, flops = row
        rate = f"{flops / ms / 1e6:.0f}" if flops and ms else "—"
        return f"{ms:.1f}", rate

    print("| operations | ours ms | ours GFLOP/s | torch ms | torch GFLOP/s | ours − torch ms |")
    print("|---|---|---|---|---|---|")
    shown = names[:top]
    for name in shown:
        a, b = ours.get(name), theirs.get(name)
        (am, ar), (bm, br) = cell(a), cell(b)
        diff = (a[0] if a else 0.0) - (b[0] if b else 0.0)
        print(f"| {name} | {am} | {ar} | {bm} | {br} | {diff:+.1f} |")
    rest = names[top:]
    if rest:
        a = sum(ours.get(r, [0])[0] for r in rest)
        b = sum(theirs.get(r, [0])[0] for r in rest)
        print(f"| {len(rest)} smaller rows | {a:.1f} | | {b:.1f} | | {a - b:+.1f} |")
    total_a = sum(r[0] for r in ours.values())
    total_b = sum(r[0] for r in theirs.values())
    print(
        f"| **sum of operations** | {total_a:.1f} | | {total_b:.1f} | | {total_a - total_b:+.1f} |"
    )
    print(f"| wall per run | {1e3 * walls[0]:.1f} | | {1e3 * walls[1]:.1f} | | "
          f"{1e3 * (walls[0] - walls[1]):+.1f} |")  # fmt: skip


def add_flag(parser, runs_flag: str) -> None:
    """The benchmarks' `--profile DIR` option (`runs_flag`: the option giving the run count)."""
    parser.add_argument(
        "--profile",
        default="",
        help=f"directory: after the timed runs, each side runs {runs_flag} more under its "
        "profiler (benchmarks/op_profile.py) and the per-operation table of both is printed",
    )


def report(title: str, ours_dir: Path, theirs_dir: Path, walls: tuple[float, float]) -> None:
    """Prints `title` and the table of a JAX capture in `ours_dir` against a torch capture in
    `theirs_dir` (walls: each side's profiled wall seconds per run)."""
    print(f"\nPer-operation profile, {title} (benchmarks/op_profile.py)")
    print_table(jax_profile(ours_dir), torch_profile(theirs_dir), walls)
