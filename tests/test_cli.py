"""One pattern for every tool: flags are defined in entry files only (`__main__.py`, train.py,
eval.py), never when a library module is imported, so importing a tool's library (e.g.
`fcos_jax.compare.match_detections`) brings none of its flags and no two tools' flags clash.
`cli.define_distributed_flags` defines flags when an entry file calls it, not at import."""

import ast
import importlib

from absl import flags
from subprocess_cli import REPO

PACKAGE = REPO / "fcos_jax"
TOOLS = ("fcos_jax.predict", "fcos_jax.compare", "fcos_jax.convert", "fcos_jax.export")
FLAG_CALLS = ("DEFINE", "mark_flag", "mark_bool_flags", "declare_key_flag", "adopt_module_key")


def _flag_calls_at_import(tree: ast.Module) -> list[int]:
    """Line numbers of flag definitions that run when the module is imported (outside any
    function body)."""
    lines = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name.startswith(FLAG_CALLS):
                lines.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return lines


def test_no_library_module_defines_flags_at_import():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        lines = _flag_calls_at_import(ast.parse(path.read_text(), str(path)))
        if lines:
            found[str(path.relative_to(REPO))] = lines
    assert not found, f"flags defined at import (move them to the tool's __main__.py): {found}"


def test_entry_files_define_their_flags():
    entries = [REPO / "train.py", REPO / "eval.py"]
    entries += [PACKAGE / tool.split(".")[1] / "__main__.py" for tool in TOOLS]
    for path in entries:
        assert _flag_calls_at_import(ast.parse(path.read_text())), path


def test_importing_the_tools_libraries_defines_no_flags():
    for tool in TOOLS:
        importlib.import_module(tool)
    ours = [module for module in flags.FLAGS.flags_by_module_dict() if "fcos_jax" in module]
    assert not ours, ours
