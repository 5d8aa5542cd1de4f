"""Every Python name in README's usage table imports from where README says (re-housing must keep them)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_table_names() -> list[str]:
    """``rlhfkit.x.y`` and its ``(XConfig)`` from the second column of README's command | function | ... table."""
    names = []
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if not line.startswith("| `rlhfkit ") or len(cells) < 3:
            continue
        for dotted, config in re.findall(r"`(rlhfkit(?:\.\w+)+)(?:\((\w+)\))?`", cells[1]):
            names.append(dotted)
            if config:
                names.append(dotted.rsplit(".", 1)[0] + "." + config)
        for module, inner in re.findall(r"`(rlhfkit(?:\.\w+)+)` \((.*)\)", cells[1]):  # a package, then its names
            for name, config in re.findall(r"`([\w.]+)(?:\((\w+)\))?`", inner):
                names.append(f"{module}.{name}")
                if config:
                    names.append(f"{module}.{name.rsplit('.', 1)[0]}.{config}" if "." in name else f"{module}.{config}")
    return names


def resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_name_in_the_usage_table_imports():
    names = usage_table_names()
    assert len(names) >= 25, names  # the table was read, not skipped
    assert "rlhfkit.rl.train" in names and "rlhfkit.rl.RLConfig" in names and "rlhfkit.feedback.web.admin.export" in names
    missing = []
    for dotted in names:
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as e:
            missing.append(f"{dotted}: {e}")
    assert not missing, missing
