"""The layers of the package, written down as a contract that CI checks.

Base modules (the bottom of the house) import only base modules below them, in this order:

    errors < fsutil < progress < streaming < splits < labels < configio < config < imageio < manifest < metrics
    < encoders < model

so nothing imports upward from ``model``, ``metrics``, ``imageio``, ``manifest`` or ``config``.
Above them: ``checkpoint``, ``intensity``, ``cropping``, ``placement``, ``context`` and ``postprocessing``
< ``inference``
< ``data`` and ``tracking``, then the stages (``ingest``, ``train``, ``evaluate``, ``predict``), then
``pipeline`` and ``cli``.
Every import counts, also those inside functions and under ``TYPE_CHECKING``: an import circle is a design
circle even when Python happens to resolve it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "tumorseg"

BASE = ["errors", "fsutil", "progress", "streaming", "splits", "labels", "configio", "config",
        "imageio", "manifest", "metrics", "encoders", "model"]
"""Bottom layers, lowest first: each may import only those before it."""

ABOVE = {
    "checkpoint": set(BASE),
    "intensity": set(BASE),
    "cropping": set(BASE),
    "placement": set(BASE),
    "context": set(BASE),
    "postprocessing": set(BASE),
    "inference": set(BASE) | {"checkpoint", "intensity", "cropping", "placement", "context", "postprocessing"},
    "data": set(BASE) | {"checkpoint", "inference", "intensity", "cropping", "placement", "context",
                         "postprocessing"},
    "tracking": set(BASE),
    "review": set(BASE),
    "augment": set(BASE),
    "synth": set(BASE),
    "modelref": set(BASE) | {"checkpoint", "inference", "tracking"},
    "mlflow_model": set(BASE) | {"checkpoint", "inference"},
    "serve": set(BASE) | {"tracking", "modelref"},
}
"""Middle modules and what they may import (besides ``tumorseg`` itself, for ``__version__``)."""

STAGES = {"ingest", "train", "evaluate", "predict"}
MAX_LINES = 420


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The tumorseg modules ``name`` imports (resolved to modules, not packages, where one exists)."""
    path = MODULES[name]
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tumorseg"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".") if is_pkg else name.split(".")[:-1]
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            if not base.startswith("tumorseg"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    out.discard(name)
    return {m for m in out if m in MODULES}


def short(name: str) -> str:
    """``tumorseg.train.loop`` -> ``train`` (the top-level unit of the layering)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("name", sorted(m for m in MODULES if short(m) in BASE))
def test_base_modules_import_only_lower_base_modules(name: str) -> None:
    rank = BASE.index(short(name))
    allowed = set(BASE[:rank]) | {short(name)}  # a package's modules may import each other (no circles)
    bad = sorted(m for m in imports_of(name) if short(m) not in allowed)
    assert not bad, f"{name} imports {bad}; base modules may import only {sorted(allowed) or 'nothing'}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if short(m) in ABOVE))
def test_middle_modules_import_only_what_their_layer_allows(name: str) -> None:
    allowed = ABOVE[short(name)] | {"", short(name)}  # a package's modules may import each other (no circles)
    bad = sorted(m for m in imports_of(name) if short(m) not in allowed)
    assert not bad, f"{name} imports {bad}; allowed: {sorted(allowed - {''})}"


def test_stages_do_not_import_each_other_or_upward() -> None:
    for name in MODULES:
        unit = short(name)
        if unit not in STAGES:
            continue
        bad = sorted(m for m in imports_of(name) if short(m) in (STAGES - {unit}) | {"pipeline", "cli"})
        assert not bad, f"{name} imports {bad}: stages talk through files, the pipeline wires them"


def test_nothing_but_the_cli_imports_the_cli() -> None:
    users = sorted(m for m in MODULES if "tumorseg.cli" in imports_of(m) and m not in ("tumorseg.__main__",))
    assert users == []


def test_no_import_circles() -> None:
    graph = {m: imports_of(m) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The contract is only worth something if its checker can fail."""
    global MODULES
    saved = MODULES
    try:
        pkg = tmp_path / "tumorseg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "model.py").write_text("from tumorseg import train\n")
        (pkg / "train.py").write_text("def f():\n    from tumorseg.model import x\n")
        MODULES = {".".join(["tumorseg", *p.relative_to(pkg).with_suffix("").parts]).removesuffix(".__init__"): p
                   for p in pkg.rglob("*.py")}
        assert imports_of("tumorseg.model") == {"tumorseg.train"}
        assert imports_of("tumorseg.train") == {"tumorseg.model"}
        with pytest.raises(AssertionError, match="import circle"):
            test_no_import_circles()
        with pytest.raises(AssertionError, match="imports"):
            test_base_modules_import_only_lower_base_modules("tumorseg.model")
    finally:
        MODULES = saved


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_400_lines(name: str) -> None:
    n = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{name}: {n} lines; split it by concern (a subpackage with a clear name)"
