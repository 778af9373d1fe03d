"""The data layer reads bottom-up: validation, then readers, then datalists and preprocessing, then checks
and datasets. Checked on the sources (lazy imports inside functions included), so no cycle can creep in."""

from __future__ import annotations

import ast
from pathlib import Path

import anatomask_components.data as data_package

PACKAGE = "anatomask_components"
DATA = Path(data_package.__file__).parent


def package_imports(module: str) -> set[str]:
    """The package modules ``anatomask_components/data/<module>.py`` imports, anywhere in its source."""
    tree = ast.parse((DATA / f"{module}.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            if node.module in (PACKAGE, f"{PACKAGE}.data"):  # from anatomask_components.data import x
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                imported.add(node.module)
    return imported


def test_validation_is_the_bottom_of_the_data_layer():
    assert package_imports("validation") == set()


def test_readers_build_on_validation_only():
    assert package_imports("readers") == {f"{PACKAGE}.data.validation"}


def test_datalists_and_preprocessing_do_not_reach_up():
    above = {f"{PACKAGE}.data.{name}" for name in ("checks", "datasets", "fingerprint", "examples")}
    for module in ("datalists", "preprocessing"):
        assert not package_imports(module) & above, module


def test_the_data_modules_import_each_other_without_cycles():
    modules = sorted(path.stem for path in DATA.glob("*.py") if path.stem != "__init__")
    prefix = f"{PACKAGE}.data."
    graph = {
        module: {name[len(prefix) :] for name in package_imports(module) if name.startswith(prefix)}
        for module in modules
    }
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join([*path, module])}"
        state[module] = "open"
        for dependency in sorted(graph.get(module, ())):
            visit(dependency, [*path, module])
        state[module] = "done"

    for module in modules:
        visit(module, [])
