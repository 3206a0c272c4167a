"""The cross-device collectives of a compiled XLA program, read from its HLO text.

Data parallelism is only as good as what the compiled program moves between devices: one
gradient reduction per optimizer step, no collective inside the detection loops. These helpers
list each collective of `jax.jit(f).lower(...).compile().as_text()` with its payload in bytes and
whether it runs inside a while loop (its body or condition, or a computation they call), so
tests and `benchmarks/accelerator_check.py` can assert on the program itself.
"""

import dataclasses
import re
from collections import Counter

# HLO opcodes that move data between devices; the async `-start` forms carry the payload, their
# `-done` halves only wait.
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_KIND_ALTERNATIVES = "|".join(re.escape(kind) for kind in KINDS)
_INSTRUCTION = re.compile(
    rf"^\s*(?:ROOT\s+)?%?(?P<name>[\w.-]+)\s*=\s*(?P<shape>.*?)\s+"
    rf"(?P<kind>{_KIND_ALTERNATIVES})(?P<start>-start)?\("
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*?condition=%?(?P<cond>[\w.-]+), body=%?(?P<body>[\w.-]+)")
_CALLED = re.compile(
    r"(?:calls|to_apply|condition|body|true_computation|false_computation)=%?([\w.-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[(?P<dims>[\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program.

    kind: an entry of KINDS. bytes: the payload one device contributes (all-reduce: its operands;
    all-gather: the gathered result). arrays: how many arrays it carries (XLA combines many
    reductions into one tuple instruction). computation: the HLO computation holding it.
    in_loop: True when that computation runs inside a while loop.
    """

    kind: str
    name: str
    bytes: int
    arrays: int
    computation: str
    in_loop: bool


def _dtype_bytes(dtype: str) -> int:
    if dtype in _BYTES:
        return _BYTES[dtype]
    if dtype.startswith("f8"):
        return 1
    return max(int(dtype[1:]) // 8, 1)


def _arrays(shape_text: str) -> list[int]:
    """Byte sizes of the arrays in an HLO result type (`f32[3,4]{1,0}` or a tuple of them)."""
    sizes = []
    for match in _ARRAY.finditer(shape_text):
        count = 1
        for dim in filter(None, match["dims"].split(",")):
            count *= int(dim)
        sizes.append(count * _dtype_bytes(match["dtype"]))
    return sizes


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines}."""
    found: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith((" ", "\t")):
            current = header["name"]
            found[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            found[current].append(line)
    return found


def _loop_computations(computations: dict[str, list[str]]) -> set[str]:
    """Every computation that runs inside a while loop: loop bodies and conditions, and what
    they call, transitively."""
    calls: dict[str, set[str]] = {}
    roots: set[str] = set()
    for name, lines in computations.items():
        callees = set()
        for line in lines:
            loop = _WHILE.search(line)
            if loop:
                roots |= {loop["cond"], loop["body"]}
            callees |= set(_CALLED.findall(line))
            for branches in _BRANCHES.findall(line):
                callees |= {b.strip().lstrip("%") for b in branches.split(",") if b.strip()}
        calls[name] = callees
    inside, stack = set(), list(roots)
    while stack:
        name = stack.pop()
        if name in inside:
            continue
        inside.add(name)
        stack.extend(calls.get(name, ()))
    return inside


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled program's HLO text (`compiled.as_text()`), in order."""
    computations = _computations(hlo_text)
    in_loops = _loop_computations(computations)
    found = []
    for computation, lines in computations.items():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            sizes = _arrays(match["shape"])
            if match["start"] and match["kind"] in ("all-gather", "collective-permute"):
                # (operands, results) tuple: the results are what moves.
                sizes = sizes[len(sizes) // 2 :]
            found.append(
                Collective(
                    kind=match["kind"],
                    name=match["name"],
                    bytes=sum(sizes),
                    arrays=len(sizes),
                    computation=computation,
                    in_loop=computation in in_loops,
                )
            )
    return found


def summary(found: list[Collective]) -> dict[str, int]:
    """{'all-reduce': count, 'all-reduce bytes': total, ..., 'in loops': count}."""
    counts: Counter = Counter()
    for c in found:
        counts[c.kind] += 1
        counts[f"{c.kind} bytes"] += c.bytes
        counts["in loops"] += int(c.in_loop)
    return dict(counts)


_ENTRY = re.compile(r"^ENTRY\s+%?[\w.-]+\s*\((?P<params>.*)\)\s*->")


def entry_parameter_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """Shapes of the entry computation's array parameters: in a compiled (partitioned) program,
    what one device receives, e.g. [B / N, H, W, 3] for a batch split over N devices."""
    for line in hlo_text.splitlines():
        entry = _ENTRY.match(line)
        if entry:
            return [
                tuple(int(d) for d in filter(None, m["dims"].split(",")))
                for m in _ARRAY.finditer(entry["params"])
            ]
    raise ValueError("no ENTRY computation in the HLO text")
