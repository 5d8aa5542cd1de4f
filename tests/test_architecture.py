"""The package's import structure: no import cycles, and no import from a lower layer into a higher one.

Every import counts, at module level or inside a function (or under ``TYPE_CHECKING``): a cycle hidden in a
function is still a cycle. Each module has a layer (:data:`LAYERS`); a module may import its own layer and
those below. A new module must be given a layer here, so its place in the architecture is decided, not drifted
into. Stage modules importing helpers from other stages are listed in :data:`KNOWN_STAGE_IMPORTS` until the
re-layout (issue 20) moves those helpers down; the list may only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: dict[str, int] = {
    # 0: foundations, no rlhfkit imports of note (the package itself: its version and docstring)
    "rlhfkit": 0,
    "rlhfkit.config": 0,
    "rlhfkit.data.io": 0,
    "rlhfkit.data.records": 0,
    "rlhfkit.stats": 0,
    "rlhfkit.losses": 0,
    "rlhfkit.optim": 0,
    "rlhfkit.run_layout": 0,
    "rlhfkit.log": 0,
    "rlhfkit.feedback.agreement": 0,
    "rlhfkit.data": 0,
    # 1: data formats and batch layout; feedback sources that are pure functions
    "rlhfkit.data.sft": 1,
    "rlhfkit.data.preferences": 1,
    "rlhfkit.data.pairwise": 1,
    "rlhfkit.packing": 1,
    "rlhfkit.feedback": 1,
    "rlhfkit.feedback.scorers": 1,
    "rlhfkit.feedback.simulated": 1,
    "rlhfkit.feedback.web": 1,
    "rlhfkit.feedback.web.store": 1,
    "rlhfkit.tracking": 1,
    # 2: models, forward passes, generation, serving
    "rlhfkit.models": 2,
    "rlhfkit.forward": 2,
    "rlhfkit.policy": 2,
    "rlhfkit.rollout": 2,
    "rlhfkit.vllm_engine": 2,
    "rlhfkit.serve": 2,
    # 3: the training loop; human and AI feedback front ends
    "rlhfkit.loop": 3,
    "rlhfkit.feedback.judge": 3,
    "rlhfkit.feedback.terminal": 3,
    "rlhfkit.feedback.web.admin": 3,
    "rlhfkit.feedback.web.app": 3,
    "rlhfkit.feedback.web.cli": 3,
    # 4: stages (what a user runs), and the reward functions and probes they share
    "rlhfkit.sft": 4,
    "rlhfkit.sample": 4,
    "rlhfkit.label": 4,
    "rlhfkit.reward": 4,
    "rlhfkit.rewards": 4,
    "rlhfkit.dpo": 4,
    "rlhfkit.rl": 4,
    "rlhfkit.probe": 4,
    "rlhfkit.evaluate": 4,
    "rlhfkit.elo": 4,
    "rlhfkit.iterated": 4,
    # 5: orchestration and front ends
    "rlhfkit.pipeline": 5,
    "rlhfkit.report": 5,
    "rlhfkit.cli": 5,
}

STAGES = {
    "rlhfkit.sft",
    "rlhfkit.sample",
    "rlhfkit.label",
    "rlhfkit.reward",
    "rlhfkit.dpo",
    "rlhfkit.rl",
    "rlhfkit.evaluate",
    "rlhfkit.iterated",
}

KNOWN_STAGE_IMPORTS = {
    ("rlhfkit.evaluate", "rlhfkit.reward"),
    ("rlhfkit.evaluate", "rlhfkit.sample"),
    ("rlhfkit.evaluate", "rlhfkit.sft"),
    ("rlhfkit.iterated", "rlhfkit.dpo"),
    ("rlhfkit.iterated", "rlhfkit.label"),
    ("rlhfkit.iterated", "rlhfkit.sample"),
    ("rlhfkit.iterated", "rlhfkit.sft"),
    ("rlhfkit.rl", "rlhfkit.sample"),
    ("rlhfkit.rl", "rlhfkit.sft"),
    ("rlhfkit.sample", "rlhfkit.sft"),
}
"""(importer, imported) pairs of stages, each for a helper that belongs lower (``demo_data_path`` and
``load_prompts`` in data/, ``RewardModel`` in the modeling layer): to be removed, never added to."""


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path, package: str = "rlhfkit") -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, every import statement anywhere in the module counted."""
    files = {module_name(p, src): p for p in (src / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names]  # `from pkg import module` names a module
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and target != package:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(SRC)) == []


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers():
    graph = import_graph(SRC)
    assert sorted(set(graph) - set(LAYERS)) == [], "give each new module a layer in LAYERS"
    assert sorted(set(LAYERS) - set(graph)) == [], "a module in LAYERS no longer exists"
    upward = sorted(
        f"{a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})" for a in graph for b in graph[a] if LAYERS[b] > LAYERS[a]
    )
    assert upward == []


def test_stages_import_no_other_stage_beyond_the_known_list_which_only_shrinks():
    graph = import_graph(SRC)
    between = {(a, b) for a in STAGES for b in graph[a] if b in STAGES}
    assert sorted(between - KNOWN_STAGE_IMPORTS) == [], "a stage imports another stage: move the helper down a layer"
    assert sorted(KNOWN_STAGE_IMPORTS - between) == [], "gone: remove it from KNOWN_STAGE_IMPORTS"


def _package(tmp_path: Path, modules: dict[str, str]) -> Path:
    for name, text in modules.items():
        path = tmp_path / "rlhfkit" / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_a_cycle_through_a_function_local_or_relative_import_is_found(tmp_path):
    src = _package(
        tmp_path,
        {
            "__init__": "",
            "a": "from rlhfkit import b\n",
            "b": "def f():\n    from rlhfkit.c import thing\n",
            "c": "from .a import x\n",  # relative: rlhfkit.a
            "d": "import rlhfkit.a\n",  # imports into the cycle, not part of it
        },
    )
    graph = import_graph(src)
    assert graph["rlhfkit.c"] == {"rlhfkit.a"} and graph["rlhfkit.d"] == {"rlhfkit.a"}
    assert cycles(graph) == [["rlhfkit.a", "rlhfkit.b", "rlhfkit.c"]]
    (src / "rlhfkit" / "c.py").write_text("x = 1\n")
    assert cycles(import_graph(src)) == []
