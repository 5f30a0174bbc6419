"""The package's folders are its layers (README, "Architecture"): each may import only from the layers
above it, so the router stays a plain library that a served model or a notebook loads without the
service, the jobs or MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mixllm"

# Each layer and the layers it may import from (besides itself).
MAY_IMPORT = {
    "config": {"core"},  # for core.errors.ConfigError only
    "core": {"config"},
    "evaluation": {"config", "core"},
    "io": {"config", "core"},
    "jobs": {"config", "core", "evaluation", "io"},
    "service": {"config", "core", "evaluation", "io", "jobs"},
    "flows": {"config", "core", "evaluation", "io", "jobs"},  # Prefect's wiring of the jobs
    "cli": {"config", "core", "evaluation", "io", "jobs", "service", "flows"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, with its line, at any depth of its code (lazy imports too);
    `from mixllm import x` counts as `mixllm.x`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "mixllm" else [f"mixllm.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names]
    return found


def mixllm_imports(path: Path) -> list[tuple[int, str]]:
    """Every `mixllm.<layer>` a module imports."""
    return [(line, name) for line, name in imported_modules(path) if name.startswith("mixllm.")]


def layer_of(dotted: str) -> str:
    return dotted.split(".")[1]


def test_every_module_lives_in_a_layer_folder():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside a layer folder: {loose}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(MAY_IMPORT), f"layer folders {sorted(folders)} against the table {sorted(MAY_IMPORT)}"


def test_no_module_imports_a_layer_below_its_own():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0]
        if own not in MAY_IMPORT:
            continue
        for line, name in mixllm_imports(path):
            other = layer_of(name)
            if other != own and other not in MAY_IMPORT[own] and other != "__version__":
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_layer_check_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from mixllm.service.app import MixLLMService\n", encoding="utf-8")
    assert mixllm_imports(module) == [(2, "mixllm.service.app")]


def test_only_the_registry_imports_mlflow():
    importers = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 for _, name in imported_modules(path) if name == "mlflow" or name.startswith("mlflow.")}
    assert sorted(importers) == ["io/registry.py"]


def test_nothing_outside_the_package_is_imported_as_a_top_level_module():
    """The flows live in the package (mixllm.flows): a top-level `flows` package, installed beside
    every other project's, would be a name clash waiting to happen, and the CLI imported it."""
    own_top_level = {p.name for p in PACKAGE.parent.iterdir() if (p / "__init__.py").exists()} - {"mixllm"}
    wrong = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for path in sorted(PACKAGE.rglob("*.py"))
             for line, name in imported_modules(path) if name.split(".")[0] in own_top_level | {"flows"}]
    assert not wrong, "\n".join(wrong)
