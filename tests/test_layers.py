"""The house plan, checked: which wing may import which, no import cycles, every package installed.

Every module under engine/ and tui/ is read with `ast`, so an import counts wherever it is written:
at the top, inside a function (the engine imports heavy wings lazily) or under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"engine": "tunebench.engine", "tui": "tunebench.tui"}
TORCH_STACK = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "liger_kernel")
UI_LIBRARIES = ("textual", "rich")

# The engine's wings, each with the wings it may import (its own always). Imports point down,
# cli -> process / deploy -> train / infer -> cuda / models -> core, except that cuda builds on the two
# train modules below the recipe, on the models' fused kernels (the decode uses them too) and on
# the one place that finds a model's decoder layers.
MAY_IMPORT = {
    "core": set(),
    "models": {"core"},
    "cuda": {"core", "train.types", "train.plain", "models.kernels", "models.blocks"},  # never the recipe
    "train": {"core", "models", "cuda"},
    "infer": {"core", "models"},
    "process": {"core", "models", "train", "infer"},
    "deploy": {"core", "models", "infer"},  # its own process: the HTTP app over the decode
    "cli": {"core", "models", "train", "cuda", "infer", "process", "deploy", "tui"},
}
# Imported by the TUI, so held to the TUI's own rule.
TUI_MAY_IMPORT = {"core", "process.client"}


def find_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module and package of engine/ and tui/."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = find_modules()


def imports_of(name: str) -> set[str]:
    """Every module `name` imports, relative imports resolved; `from pkg import mod` names the module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in MODULES else source)
    return found


IMPORTS = {name: imports_of(name) for name in MODULES}


def place(name: str) -> str:
    """'tui', or the engine wing a module belongs to ('core', 'train', ...; 'engine' for the package)."""
    parts = name.split(".")
    if parts[1] == "tui":
        return "tui"
    return parts[2] if len(parts) > 2 else "engine"


def allowed(target: str, rules: set[str]) -> bool:
    """Whether `target` is in one of `rules`: a wing ('core'), a module ('train.types') or 'tui'."""
    if place(target) == "tui":
        return "tui" in rules
    inside_engine = target.split(".", 2)[2] if target.count(".") >= 2 else ""
    return any(inside_engine == rule or inside_engine.startswith(rule + ".") for rule in rules)


def broken(rule_of) -> list[str]:
    """'module -> import' for every import of ours that `rule_of(module)` does not allow."""
    problems = []
    for name, targets in IMPORTS.items():
        rules = rule_of(name)
        if rules is None:
            continue
        for target in sorted(targets):
            if target in MODULES and target != name and not allowed(target, rules):
                problems.append(f"{name} -> {target}")
    return problems


def test_the_tui_imports_only_core_and_the_client():
    assert broken(lambda name: TUI_MAY_IMPORT | {"tui"} if place(name) == "tui" else None) == []


def test_each_wing_imports_only_the_wings_below_it():
    def rules(name: str) -> set[str] | None:
        wing = place(name)
        if wing not in MAY_IMPORT:
            return None
        if name == "tunebench.engine.process.client":
            return {"core", "process.client"}
        return MAY_IMPORT[wing] | {wing}

    assert broken(rules) == []


def test_nothing_imports_the_cli():
    """The console script is its only entry; a wing that imported it would import every wing."""
    users = [
        f"{name} -> {target}"
        for name, targets in IMPORTS.items()
        if place(name) != "cli"
        for target in sorted(targets)
        if target.startswith("tunebench.engine.cli")
    ]
    assert users == []


@pytest.mark.parametrize(
    ("where", "forbidden"),
    [("core", TORCH_STACK), ("process.client", TORCH_STACK), ("tui", TORCH_STACK)]
    + [(wing, UI_LIBRARIES) for wing in MAY_IMPORT if wing != "cli"],
)
def test_light_places_import_no_heavy_library(where, forbidden):
    """core and the client load in milliseconds for the TUI, and never load torch; the engine
    never imports the UI libraries (only cli opens the TUI)."""
    found = [
        f"{name} -> {target}"
        for name, targets in IMPORTS.items()
        if allowed(name, {where})
        for target in sorted(targets)
        if target.split(".")[0] in forbidden
    ]
    assert found == []


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import between our modules."""
    graph = {name: {t for t in targets if t in MODULES and t != name} for name, targets in IMPORTS.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []


def test_every_package_folder_is_installed():
    """setuptools installs only the packages pyproject lists: a folder left out would be missing
    from a non-editable install."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0] for name in MODULES}
    assert listed == folders


def test_the_rules_see_lazy_imports():
    """The recipe picks the CUDA path inside a function: that import must count."""
    assert "tunebench.engine.cuda.path" in IMPORTS["tunebench.engine.train.recipe"]
    assert "tunebench.engine.cuda" not in IMPORTS["tunebench.engine.train.recipe"]
