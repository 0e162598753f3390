"""The folder layout is the data flow: genrec.core (plumbing) <- dataset <- rqvae <- genrec.recommender <- evalu.
Imports point only down that flow; the quantizer core stands without the data layer."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> the layers of ours it may import (besides itself)
ALLOWED = {
    "genrec.core": set(),
    "dataset": {"genrec.core"},
    "rqvae": {"genrec.core"},  # the quantizer core
    "rqvae.generate": {"genrec.core", "dataset", "rqvae"},  # the glue to the competition's files
    "rqvae.plot": {"genrec.core", "rqvae"},
    "genrec.recommender": {"genrec.core", "dataset", "rqvae"},
    "evalu": {"genrec.core", "dataset", "rqvae", "genrec.recommender"},
}
# rqvae/__init__.py hands out the glue lazily (PEP 562 __getattr__); the runtime test below checks it stays lazy
LAZY = {("rqvae", "rqvae.generate")}
OURS = ("genrec", "dataset", "rqvae", "evalu", "train", "train_rqvae")


def _layer(module: str) -> str | None:
    for name in sorted(ALLOWED, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def _imports(path: Path, module: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = module.split(".")[:-node.level] if not path.name == "__init__.py" else \
                    module.split(".")[:len(module.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                out |= {name} if node.module else {f"{name}.{a.name}" for a in node.names}
            else:
                out.add(node.module or "")
    return {m for m in out if m.split(".")[0] in OURS}


def test_imports_point_down_the_data_flow():
    wrong = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        layer = _layer(module)
        if layer is None:
            continue
        for imp in _imports(path, module):
            target = _layer(imp) or imp
            if (module, imp) in LAZY:
                continue
            if target != layer and not any(target == a or target.startswith(a + ".") for a in ALLOWED[layer]):
                wrong.append(f"{module} imports {imp}")
    assert not wrong, wrong


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    return [m for m in out if m.split(".")[0] in OURS]


@pytest.mark.slow
def test_the_quantizer_core_imports_no_data_layer_module():
    loaded = _loaded_after("import rqvae.quantizer, rqvae")
    assert "rqvae.quantizer" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("dataset", "evalu") or m.startswith("genrec.recommender")
                or m == "rqvae.generate"], loaded


@pytest.mark.slow
def test_the_plumbing_imports_nothing_else_of_ours():
    loaded = _loaded_after("import genrec.core.cli, genrec.core.safeio, genrec.core.alloc, genrec.core.device, "
                           "genrec.core.dist")
    assert loaded and all(m == "genrec" or m.startswith("genrec.core") for m in loaded), loaded


def test_the_generate_glue_is_still_reachable_from_the_package():
    from rqvae import generate_semantic_ids, merge_features

    assert callable(generate_semantic_ids) and callable(merge_features)


def test_only_our_named_packages_are_installed():
    text = (ROOT / "pyproject.toml").read_text()
    line = next(l for l in text.splitlines() if l.startswith("packages"))
    tops = {p.strip(' "').split(".")[0] for p in line.split("=", 1)[1].strip(" []").split(",")}
    assert tops == {"dataset", "rqvae", "evalu", "genrec"}
