"""The package's dependencies run one way (docs/architecture.md):

    errors, io_utils -> validation -> config -> parallel -> ops -> model -> data -> training -> checkpoint
        -> inference, eval -> entry points (train.py, cli/, training/loop.py, tasks, experiments)

A lower layer never imports a higher one, not even inside a function; module-level imports have no cycle.
Both are read from the source (ast), without importing the package. Both engines implement the written
Engine protocol.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_mtp")
PACKAGE = "megatron_mtp"

LAYERS = [
    ("errors", "io_utils"),
    ("validation",),
    ("config",),
    ("parallel",),
    ("ops",),
    ("model",),
    ("data",),
    ("training",),
    ("checkpoint",),
    ("inference", "eval"),
    ("train", "cli", "tasks", "experiments", "__main__"),
]
# The training loop composes data, engine and checkpoint manager: it is the entry point's body, not a part
# the checkpoint layer could build on.
ENTRY_MODULES = {"megatron_mtp.training.loop"}


def _modules() -> dict:
    """module name -> file path, for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, name)
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    if module in ENTRY_MODULES:
        return len(LAYERS) - 1
    if module == PACKAGE:
        return -1  # the package's own __init__ (empty)
    top = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS (and docs/architecture.md)")


def _resolve(module: str, node: ast.AST) -> list:
    """Package modules an import statement names."""
    out = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            if not MODULES[module].endswith("__init__.py"):
                base = base[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
    for name in names:
        while name and name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name.startswith(PACKAGE + ".") or name == PACKAGE:
            out.append(name)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str) -> tuple:
    """(module-level imports, imports anywhere) of package modules, as sets of module names."""
    tree = ast.parse(open(MODULES[module]).read(), MODULES[module])
    top, everywhere = set(), set()

    def visit(node, at_top: bool):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = set(_resolve(module, child)) - {module}
                everywhere.update(found)
                if at_top:
                    top.update(found)
            inner = at_top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return top, everywhere


GRAPH = {m: imports(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_lower_layer_imports_a_higher_one(module):
    mine = layer_of(module)
    upward = sorted(m for m in GRAPH[module][1] if m != PACKAGE and layer_of(m) > mine)
    assert not upward, (f"{module} (layer {LAYERS[mine] if mine >= 0 else 'package'}) imports the higher "
                        f"{upward}; move the shared piece down or the caller up (docs/architecture.md).")


def test_no_import_cycle():
    state, stack, cycles = {}, [], []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m][0]):
            if n == PACKAGE:
                continue
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            dfs(m)
    assert not cycles, "module-level import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_imports():
    """The walker is not vacuous: known edges are found, at module level and inside functions."""
    top, everywhere = GRAPH["megatron_mtp.checkpoint.manager"]
    assert "megatron_mtp.checkpoint.store" in top and "megatron_mtp.parallel.state" in top
    assert layer_of("megatron_mtp.checkpoint.manager") > layer_of("megatron_mtp.training.engine")


def test_both_engines_implement_the_protocol():
    """Every member of training.engine.Engine is defined by both engines (checked on the classes: building a
    DeepSpeed engine needs a process group)."""
    import typing

    from megatron_mtp.training.deepspeed_engine import DeepSpeedEngine
    from megatron_mtp.training.engine import Engine
    from megatron_mtp.training.local_engine import LocalEngine

    members = {name for name in vars(Engine) if not name.startswith("_")} | set(typing.get_type_hints(Engine))
    assert {"train_step", "eval_step", "save_to", "load_from", "load_full_weights", "checkpoint_format"} <= members
    for cls in (LocalEngine, DeepSpeedEngine):
        methods = {name for name in members if callable(getattr(Engine, name, None))}
        missing = sorted(m for m in methods if not callable(getattr(cls, m, None)))
        assert not missing, f"{cls.__name__} lacks {missing} of training.engine.Engine"
        assert isinstance(cls.checkpoint_format, str) and cls.checkpoint_format.endswith("-v1")
