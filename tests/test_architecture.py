"""The layering rules, checked on the source (imports inside functions included):

* nothing below the CLI imports ``dd.cli`` (nor do the built-in plugins);
* no import cycles among dd's modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: Path, prefix: str) -> dict[str, Path]:
    out = {}
    for p in package.rglob("*.py"):
        parts = p.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts)
        out[name.removesuffix(".__init__")] = p
    return {k: v for k, v in out.items() if k.startswith(prefix)}


MODULES = {**_modules(ROOT / "dd", "dd"), **_modules(ROOT / "plugins" / "dd_plugins", "dd_plugins")}


def _imports(name: str, path: Path) -> set[str]:
    """dd modules that ``name`` imports anywhere in its file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")
                if path.name != "__init__.py":
                    pkg = pkg[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, *([base] if base else [])])
            subs = [f"{base}.{a.name}" for a in node.names]
            # ``from pkg import module`` runs ``pkg/__init__`` first: an edge to the package
            # too (``import pkg.module`` / ``from pkg.module import x`` name only the module)
            targets = [t for t in subs if t in MODULES] + [base]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_nothing_below_the_cli_imports_it():
    offenders = {
        name: sorted(t for t in deps if t == "dd.cli" or t.startswith("dd.cli."))
        for name, deps in GRAPH.items()
        if not (name == "dd.cli" or name.startswith("dd.cli.") or name == "dd.__main__")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles


def test_the_checker_sees_function_level_imports():
    assert "dd.runtime.progress" in GRAPH["dd.cli.detect"]  # imported inside _detect() only


def test_the_core_never_imports_a_built_in_plugin():
    """Built-ins come through the entry points like third-party plugins (dd.api.plugins)."""
    offenders = {
        name: sorted(t for t in deps if t.startswith("dd_plugins"))
        for name, deps in GRAPH.items()
        if name.startswith("dd")
        and not name.startswith("dd_plugins")
        and not name.startswith("dd.testing")
    }
    assert not {k: v for k, v in offenders.items() if v}


def _below(name: str, allowed: tuple[str, ...]) -> list[str]:
    return sorted(
        t
        for t in GRAPH[name]
        if t != "dd" and not any(t == a or t.startswith(a + ".") for a in allowed)
    )


#: Each layer folder and what it may import (docs/architecture.md, bottom to top).
LAYERS = {
    "dd.runtime": ("dd.runtime", "dd.errors"),
    "dd.ops": ("dd.ops", "dd.errors", "dd.runtime"),
    "dd.api": ("dd.api", "dd.ops", "dd.errors", "dd.runtime"),
    "dd.testing": ("dd.testing", "dd.api", "dd.ops", "dd.errors", "dd.runtime"),
    "dd.data": ("dd.data", "dd.runtime", "dd.errors"),
    "dd.report": ("dd.report", "dd.data", "dd.runtime", "dd.errors"),
    "dd.label": ("dd.label", "dd.report", "dd.data", "dd.runtime", "dd.errors"),
    "dd.inference": (
        "dd.inference",
        "dd.api",
        "dd.ops",
        "dd.data",
        "dd.report",
        "dd.runtime",
        "dd.errors",
    ),  # fmt: skip
    "dd.training": ("dd.training", "dd.report", "dd.ops", "dd.runtime", "dd.errors"),
}


def test_every_module_is_in_a_layer_folder():
    """The folders tell the layers: no dd module outside one (but the package's own files)."""
    loose = [
        name
        for name in MODULES
        if name.startswith("dd.") and name.count(".") == 1
        and name not in ("dd.errors", "dd.__main__")
        and not (ROOT / "dd" / name.split(".")[1]).is_dir()
    ]  # fmt: skip
    assert not loose


def test_moved_modules_still_import_under_their_old_names():
    import warnings

    import dd
    import dd.api.backbones

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import dd.backbones  # noqa: F401 - the old name
        from dd.plugins import get_host  # noqa: F401
    assert sys.modules["dd.backbones"] is dd.api.backbones
    assert any("dd.backbones moved to dd.api.backbones" in str(w.message) for w in caught)
    for old, new in dd.MOVED.items():
        assert new in MODULES and old not in MODULES, (old, new)


def test_layers_import_only_layers_below():
    """runtime <- ops <- plugin APIs <- data <- report <- label, inference <- training <-
    engines <- cli."""
    rules = LAYERS
    bad = {
        name: _below(name, allowed)
        for prefix, allowed in rules.items()
        for name in GRAPH
        if name == prefix or name.startswith(prefix + ".")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_one_progress_contract():
    """Progress bars come from dd.runtime.progress; nothing else builds a rich Progress."""
    builders = [
        name
        for name, path in MODULES.items()
        if name != "dd.runtime.progress" and "Progress(" in path.read_text(encoding="utf-8")
    ]
    assert not builders


def test_quiet_progress_takes_the_same_calls():
    from dd.runtime.progress import progress_or_quiet

    with progress_or_quiet("x", console=None) as bar:
        task = bar.add_task("x", total=3)
        bar.update(task, completed=1)
        bar.advance(task)


def test_no_class_is_longer_than_300_lines():
    """Split a class by responsibility (e.g. Backbone's sampling / training / LoRA parts, a
    training recipe's data or evaluation) before it grows past 300 lines."""
    long = []
    for package in (ROOT / "dd", ROOT / "plugins" / "dd_plugins"):
        for path in package.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > 300:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {length}")
    assert not long, long


def test_no_cli_module_loads_models_or_writes_results():
    """The CLI parses, calls an engine and prints: loading a model and writing a result
    happen below it (the names a command would call to do either itself)."""
    forbidden = {
        "load_backbone",
        "load_detector",
        "load_detector_warned",
        "from_pretrained",
        "save_pretrained",
        "atomic_write_json",
        "atomic_write_text",
        "atomic_open",
        "save_image_atomic",
        "write_text",
        "write_bytes",
        "open",
        "save",
    }
    found = []
    for name, path in MODULES.items():
        if not name.startswith("dd.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                if called in forbidden:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {called}")
    assert not found, found
