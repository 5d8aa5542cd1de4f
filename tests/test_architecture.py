"""The package's import structure: no import cycles, and no import from a lower layer into a higher one.

Every import counts, at module level or inside a function (or under ``TYPE_CHECKING``): a cycle hidden in a
function is still a cycle. Each module has a layer (:data:`LAYERS`); a module may import its own layer and
those below. A new module must be given a layer here, so its place in the architecture is decided, not drifted
into. The folders are the layers' shape: ``data/`` (1), ``modeling/`` (2), ``generation/`` (3), ``training/`` (its
loop at 4), then the stages (5) and what orchestrates them (6). No stage imports another stage (:data:`STAGES`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: dict[str, int] = {
    # 0: foundations: configs, logging, file and metric names, pure math (no model, no data format)
    "rlhfkit": 0,
    "rlhfkit._moved": 0,
    "rlhfkit.config": 0,
    "rlhfkit.log": 0,
    "rlhfkit.stats": 0,
    "rlhfkit.losses": 0,
    "rlhfkit.run_layout": 0,
    "rlhfkit.data": 0,
    "rlhfkit.data.io": 0,
    "rlhfkit.data.records": 0,
    "rlhfkit.modeling": 0,
    "rlhfkit.generation": 0,
    "rlhfkit.training": 0,
    "rlhfkit.training.optim": 0,
    "rlhfkit.training.sharding": 0,
    "rlhfkit.feedback.agreement": 0,
    "rlhfkit.feedback.grades": 0,
    # 1: data/ (formats, prompts, the packed batch layout); feedback sources that are pure functions; metrics files
    "rlhfkit.data.sft": 1,
    "rlhfkit.data.preferences": 1,
    "rlhfkit.data.pairwise": 1,
    "rlhfkit.data.unpaired": 1,
    "rlhfkit.data.offline": 1,
    "rlhfkit.data.packing": 1,
    "rlhfkit.data.prompts": 1,
    "rlhfkit.data.constitution": 1,
    "rlhfkit.data.samples": 1,
    "rlhfkit.feedback": 1,
    "rlhfkit.feedback.scorers": 1,
    "rlhfkit.feedback.simulated": 1,
    "rlhfkit.feedback.web": 1,
    "rlhfkit.feedback.web.store": 1,
    "rlhfkit.feedback.web.pairs": 1,
    "rlhfkit.training.tracking": 1,
    "rlhfkit.ratings": 1,
    # 2: modeling/ (loading and saving, attention and log-prob kernels, forward passes, policy and value head,
    # reward-model scoring)
    "rlhfkit.modeling.models": 2,
    "rlhfkit.modeling.attention": 2,
    "rlhfkit.modeling.logps": 2,
    "rlhfkit.modeling.forward": 2,
    "rlhfkit.modeling.policy": 2,
    "rlhfkit.modeling.reward_model": 2,
    "rlhfkit.modeling.ilql_heads": 2,
    # 3: generation/ (rollouts, the decoding fast path, chat backends, vLLM) and the server over it
    "rlhfkit.generation.rollout": 3,
    "rlhfkit.generation.fast_decode": 3,
    "rlhfkit.generation.vllm_engine": 3,
    "rlhfkit.generation.chat": 3,
    "rlhfkit.generation.ilql_decode": 3,
    "rlhfkit.generation.workers": 3,
    "rlhfkit.serve": 3,
    # 4: training/'s loop; human and AI feedback front ends
    "rlhfkit.training.loop": 4,
    "rlhfkit.training.reference": 4,
    "rlhfkit.feedback.judge": 4,
    "rlhfkit.chat_clients": 4,
    "rlhfkit.feedback.terminal": 4,
    "rlhfkit.feedback.web.admin": 4,
    "rlhfkit.feedback.web.app": 4,
    "rlhfkit.feedback.web.cli": 4,
    # 5: stages (what a user runs), and the reward functions and probes they share; the doctor reading their metrics
    "rlhfkit.sft": 5,
    "rlhfkit.sample": 5,
    "rlhfkit.label": 5,
    "rlhfkit.reward": 5,
    "rlhfkit.rewards": 5,
    "rlhfkit.dpo": 5,
    "rlhfkit.kto": 5,
    "rlhfkit.ilql": 5,
    "rlhfkit.cai": 5,
    "rlhfkit.cai_label": 5,
    "rlhfkit.rl": 5,
    "rlhfkit.probe": 5,
    "rlhfkit.doctor": 5,
    "rlhfkit.evaluate": 5,
    "rlhfkit.elo": 5,
    "rlhfkit.active": 5,
    # 6: orchestration of stages (the pipeline, iterated DPO's rounds), the report, the command line
    "rlhfkit.iterated": 6,
    "rlhfkit.pipeline": 6,
    "rlhfkit.report": 6,
    "rlhfkit.cli": 6,
    "rlhfkit.__main__": 6,
}

STAGES = {
    "rlhfkit.sft",
    "rlhfkit.sample",
    "rlhfkit.label",
    "rlhfkit.reward",
    "rlhfkit.dpo",
    "rlhfkit.kto",
    "rlhfkit.ilql",
    "rlhfkit.cai",
    "rlhfkit.cai_label",
    "rlhfkit.rl",
    "rlhfkit.evaluate",
    "rlhfkit.elo",
    "rlhfkit.active",
}
"""A stage never imports another stage: what two stages share lives a layer below them."""


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


def test_no_stage_imports_another_stage():
    graph = import_graph(SRC)
    between = sorted(f"{a} imports {b}" for a in STAGES for b in graph[a] if b in STAGES)
    assert between == [], "a stage imports another stage: move what they share down a layer"


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


def test_old_import_paths_of_moved_modules_still_work():
    """A module that moved into a folder is still importable by its old name: the very same module when it moved
    whole (so monkeypatching either name patches both), a view over its parts when it was split."""
    import importlib

    from rlhfkit import _moved

    for old, new in _moved.MOVED.items():
        module = importlib.import_module(old)
        parts = [importlib.import_module(n) for n in new]
        if len(parts) == 1:
            assert module is parts[0], old
            assert module.__spec__.name == new[0]  # the real module's spec survives the alias
        for part in parts:  # every public name of every part is reachable through the old name
            for name in (n for n in vars(part) if not n.startswith("_")):
                assert getattr(module, name) is getattr(part, name), f"{old}.{name}"
    from rlhfkit.modeling.models import load_tokenizer as new_load_tokenizer
    from rlhfkit.models import load_tokenizer  # the `from old import name` form
    from rlhfkit.rollout import HFGenerator, prepacked_linears

    assert load_tokenizer is new_load_tokenizer
    assert HFGenerator.__module__ == "rlhfkit.generation.rollout"
    assert prepacked_linears.__module__ == "rlhfkit.generation.fast_decode"
    with pytest.raises(AttributeError, match="rlhfkit.packing"):
        _ = importlib.import_module("rlhfkit.packing").no_such_name
