"""docs/cli-reference.md is generated from the parsers: this test fails when a CLI's --help and the doc differ.
Regenerate with `python tests/test_cli_reference.py`."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli-reference.md"

# (console script, the same from a checkout, module with build_parser())
CLIS = [
    ("genrec-infer", "python evalu/infer.py", "evalu.infer"),
    ("genrec-train", "python train.py", "train"),
    ("genrec-train-rqvae", "python train_rqvae.py", "train_rqvae"),
    ("genrec-synth", "python -m dataset.synth", "dataset.synth"),
    ("genrec-convert-ml100k", "python -m dataset.convert_ml100k", "dataset.convert_ml100k"),
    ("genrec-merge", "python -m evalu.shard", "evalu.shard"),
]
ENV_DEFAULTS = ("EVAL_DATA_PATH", "EVAL_RESULT_PATH", "MODEL_OUTPUT_PATH", "TRAIN_DATA_PATH", "TRAIN_CKPT_PATH")


def render() -> str:
    """The reference: every CLI's --help as a user sees it (env vars that set defaults unset, 100 columns)."""
    sys.path.insert(0, str(ROOT))
    env = {k: v for k, v in os.environ.items() if k not in ENV_DEFAULTS}
    parts = ["# CLI reference", "",
             "Generated from the parsers by `python tests/test_cli_reference.py`; `tests/test_cli_reference.py` fails "
             "when a `--help` and this page differ. Flag style, errors and exit codes: [cli.md](cli.md).", ""]
    with mock.patch.dict(os.environ, {**env, "COLUMNS": "100"}, clear=True):
        for script, checkout, module in CLIS:
            p = importlib.import_module(module).build_parser()
            p.prog = script
            parts += [f"## `{script}`", "", f"Also `{checkout}`.", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def test_the_cli_reference_matches_every_help():
    assert DOC.read_text() == render(), "docs/cli-reference.md is stale: run python tests/test_cli_reference.py"


def test_every_console_script_is_in_the_reference():
    text = (ROOT / "pyproject.toml").read_text()
    scripts = {line.split("=")[0].strip() for line in text.split("[project.scripts]")[1].split("[")[0].splitlines()
               if "=" in line}
    assert scripts == {c[0] for c in CLIS}


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}")
