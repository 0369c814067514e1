"""The package's layers import only downward: data -> backbones -> layers -> methods -> config -> engine ->
evaluation -> bench -> serve -> cli, with leaf utilities (errors, registry, io_utils, overlap, state_dicts) importable
from anywhere. Checked on every import statement of every module, including imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import samadapt

LAYERS = ["data", "backbones", "layers", "methods", "config", "engine", "evaluation", "bench", "serve", "cli"]
LEAVES = {"errors", "registry", "io_utils", "overlap", "state_dicts", "__init__"}
ROOT = Path(samadapt.__file__).parent


def _top(module: str) -> str:
    return module.split(".")[1] if module.startswith("samadapt.") else ""


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported samadapt module) for every import in ``path``, relative imports resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name.startswith("samadapt.")]


def _layer(top: str) -> int | None:
    return None if top in LEAVES else LAYERS.index(top)


def test_every_module_imports_only_its_layer_or_below():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        module = "samadapt." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = _top(module.removesuffix(".__init__"))
        if own in LEAVES or own == "":
            level = -1  # leaves and the package root import nothing of the layers
        else:
            level = LAYERS.index(own)
        for line, name in _imports(path, module.removesuffix(".__init__")):
            target = _layer(_top(name)) if _top(name) in LAYERS or _top(name) in LEAVES else None
            if target is not None and target > level:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_every_top_level_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
            if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert tops <= set(LAYERS) | LEAVES, sorted(tops - set(LAYERS) - LEAVES)
