"""The house rules of the package, checked on the source (a small AST walk; docs/architecture.md explains them).

Each room (a subpackage of ``lorafleet``) may import itself, the foundation modules and the rooms listed for it in
``MAY_IMPORT`` — nothing else, at module level or inside a function. Lower rooms never import higher ones, so no
room-level cycle can form. An import inside a function is allowed only with a one-line reason (a heavy optional
dependency deferred: ``# noqa: PLC0415 - defers torch``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lorafleet

PACKAGE = Path(lorafleet.__file__).parent

# Top-level modules every room may import; they import nothing of lorafleet but each other.
FOUNDATION = {"__init__", "config", "results", "digest", "errors", "limits"}

# The rooms, lowest first, and the rooms each may import (the one place the layering is written down).
MAY_IMPORT: dict[str, set[str]] = {
    "adapters": set(),  # LoRA/VeRA weights, the operator, PEFT files: knows nothing of lorafleet
    "base": set(),  # loading the shared base model
    "registry": {"adapters"},  # identities, revisions, aliases, blobs, memory; checks/imports/exports adapter blobs
    "serving": {"adapters", "base"},  # the engine: knows the registry only through a fetch(digest) callable
    "training": {"adapters", "base", "registry"},  # the trainer, the job queue and its worker
    "evaluation": {"adapters", "base", "registry", "serving", "training"},  # metrics, personas, the gate
    "continual": {"adapters", "base", "registry", "serving", "training", "evaluation"},  # train → evaluate → gate
    "instant": {"adapters", "base", "registry", "serving", "training", "evaluation"},  # generated adapters
    "api": {"adapters", "base", "registry", "serving", "training", "evaluation", "continual", "instant"},  # HTTP
    "cluster": {"adapters", "base", "registry", "serving", "training", "api"},  # Ray Serve replicas
    "bench": {"adapters", "base", "registry", "serving", "training", "evaluation"},  # the scale experiments
    "testing": {"adapters", "base", "registry", "serving", "api", "instant"},  # harnesses for tests and benchmarks
    "cli": {"adapters", "base", "registry", "serving", "training", "evaluation", "continual", "api", "cluster",
            "bench", "instant"},  # every command; nothing imports it
}
ROOMS = set(MAY_IMPORT)


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if "migrations" in rel.parts:  # alembic scripts, run by alembic
            continue
        yield path, rel


def _room_of(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path, rel: Path):
    """(line, target module, at module level?, source line) of every lorafleet import in the file."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    module_level = set()
    for node in tree.body:  # a module-level try/if (an optional import) still counts as module level
        module_level.update(id(n) for n in (ast.walk(node) if isinstance(node, ast.Try | ast.If) else [node]))
    package = ["lorafleet", *rel.parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                targets = [".".join([*base, *([node.module] if node.module else [])])]
            else:
                targets = [node.module or ""]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "lorafleet" or target.startswith("lorafleet."):
                yield node.lineno, target, id(node) in module_level, lines[node.end_lineno - 1]


def _target_room(target: str) -> str:
    parts = target.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_room_is_placed():
    found = {_room_of(rel) for _, rel in _modules()}
    unplaced = found - ROOMS - FOUNDATION
    assert not unplaced, f"new rooms must be placed in MAY_IMPORT (and docs/architecture.md): {sorted(unplaced)}"
    assert all(deps <= ROOMS for deps in MAY_IMPORT.values())


def test_the_layering_has_no_cycle():
    order: list[str] = []
    remaining = {room: set(deps) for room, deps in MAY_IMPORT.items()}
    while remaining:
        ready = sorted(room for room, deps in remaining.items() if deps <= set(order))
        assert ready, f"a cycle among {sorted(remaining)}"
        order += ready
        for room in ready:
            del remaining[room]
    assert order.index("adapters") < order.index("serving") < order.index("api") < order.index("cli")


def test_rooms_import_only_what_they_may():
    wrong = []
    for path, rel in _modules():
        room = _room_of(rel)
        allowed = {room} | FOUNDATION | (MAY_IMPORT.get(room, set()) if room in ROOMS else set())
        if room in FOUNDATION:
            allowed = set(FOUNDATION)
        for line, target, _, _ in _imports(path, rel):
            if _target_room(target) not in allowed:
                wrong.append(f"{rel}:{line}: {room} imports {target}")
    assert not wrong, "imports against the layering (see MAY_IMPORT):\n" + "\n".join(wrong)


def test_imports_inside_functions_say_why():
    silent = []
    for path, rel in _modules():
        for line, _target, module_level, source in _imports(path, rel):
            if not module_level and "PLC0415 -" not in source:
                silent.append(f"{rel}:{line}: {source.strip()}")
    assert not silent, ("import at the top of the module, or say why it is deferred "
                        "(`# noqa: PLC0415 - defers torch`):\n" + "\n".join(silent))


@pytest.mark.parametrize("module", ["lorafleet.cli", "lorafleet.config", "lorafleet.registry",
                                    "lorafleet.evaluation.personas", "lorafleet.continual.schedule"])
def test_light_modules_stay_torch_free(module):
    """`lorafleet --help` and the registry tools start without torch (seconds saved on every command)."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
