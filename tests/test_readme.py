"""README.md stays a guide that works: its Python snippets run, its set-up commands are the ones CI runs, its
links point inside the repository, and it stays short and free of dated narration."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_the_rqvae_snippet_runs():
    (snippet,) = [b for b in _blocks("python") if "fit(" in b]
    exec(compile(snippet, "README.md", "exec"), {})  # its own asserts check the result


def test_the_infer_snippet_names_the_real_entry_point():
    """Running it builds the demo (tests/test_infer.py runs infer() on a tiny world); here: it compiles and
    imports what it says."""
    (snippet,) = [b for b in _blocks("python") if "infer()" in b]
    compile(snippet, "README.md", "exec")
    from evalu.infer import infer  # noqa: F401


def test_the_set_up_commands_are_the_ones_ci_runs():
    (setup,) = [b for b in _blocks("bash") if "pytest" in b]
    test_cmd = next(line.split("#")[0].strip() for line in setup.splitlines() if "pytest" in line)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_links_stay_inside_the_repository_and_resolve():
    links = re.findall(r"\]\(([^)]+)\)", README)
    assert links and not [x for x in links if "://" in x]
    assert [x for x in links if not (ROOT / x.split("#")[0]).exists()] == []


def test_short_and_without_dates():
    assert len(README.splitlines()) <= 250
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README)
