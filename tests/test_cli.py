"""The command lines: one flag style (both spellings), one boolean parser, one-line errors before any work,
no folders left by a failed run, the summary on stdout, the console scripts, the IDs picture."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genrec.core.cli import CliError, FlagParser, add_bool, env_bool, parse_bool

ROOT = Path(__file__).resolve().parents[1]


def test_flag_parser_takes_both_spellings_and_shows_one():
    p = FlagParser()
    p.add_argument("--data_dir")
    p.add_argument("--eval-out")
    add_bool(p, "filter_seen", None)
    a = p.parse_args(["--data-dir", "D", "--eval_out=E", "--no-filter-seen"])
    assert (a.data_dir, a.eval_out, a.filter_seen) == ("D", "E", False)
    assert p.parse_args(["--filter-seen"]).filter_seen is True
    assert p.parse_args(["--filter_seen", "No"]).filter_seen is False
    assert "--data_dir" in p.format_help() and "--data-dir" not in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--data"])  # no abbreviations: with two spellings they could mean another flag


@pytest.mark.parametrize("word,value", [("true", True), ("YES", True), ("On", True), ("1", True), ("false", False),
                                        ("no", False), ("OFF", False), ("0", False)])
def test_one_boolean_parser(word, value, monkeypatch):
    assert parse_bool(word) is value
    monkeypatch.setenv("X_FLAG", word)
    assert env_bool("X_FLAG", not value) is value


@pytest.mark.parametrize("word", ["flase", "disable", "maybe", "2"])
def test_a_wrong_boolean_is_an_error_naming_it(word, monkeypatch, capsys):
    with pytest.raises(ValueError, match=word):
        parse_bool(word)
    monkeypatch.setenv("ALLOW_SEMANTIC_GENERATION", word)
    with pytest.raises(CliError, match=f"ALLOW_SEMANTIC_GENERATION: '{word}' is not a boolean"):
        env_bool("ALLOW_SEMANTIC_GENERATION", True)
    from evalu.infer import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--allow_semantic_generation", word])
    assert "is not a boolean" in capsys.readouterr().err


def test_env_flag_unset_or_empty_takes_the_default(monkeypatch):
    monkeypatch.delenv("X_FLAG", raising=False)
    assert env_bool("X_FLAG", True) is True
    monkeypatch.setenv("X_FLAG", " ")
    assert env_bool("X_FLAG", False) is False


def test_train_cli_defaults_are_todays_model(tmp_path):
    """No model flag given -> ModelConfig() as documented (the first version's fields only describe old checkpoints)."""
    from genrec.recommender.recommender import ModelConfig
    from genrec.recommender.trainer import TrainConfig

    p = FlagParser()
    TrainConfig.add_arguments(p)
    assert TrainConfig.from_args(p.parse_args([])).model == ModelConfig()
    c = TrainConfig.from_args(p.parse_args(["--use-item-id", "off", "--num_epochs", "3", "--filter-seen", "yes"]))
    assert (c.model.use_item_id, c.epochs, c.filter_seen) == (False, 3, True)
    assert TrainConfig.from_args(p.parse_args(["--filter_seen", "auto"])).filter_seen is None
    assert TrainConfig.from_args(p.parse_args([])).filter_seen is None


def test_filter_seen_is_one_type_in_training_and_at_inference():
    """bool | None (None: auto) in both configs, and both CLIs take the same words."""
    import typing

    from evalu.infer import InferConfig, parse_args
    from genrec.core.cli import from_namespace
    from genrec.recommender.trainer import TrainConfig

    hint = lambda cls: typing.get_type_hints(cls)["filter_seen"]  # noqa: E731
    assert hint(TrainConfig) == hint(InferConfig) == typing.Optional[bool]
    for word, want in (("auto", None), ("off", False), ("yes", True)):
        assert from_namespace(InferConfig, parse_args(["--filter_seen", word])).filter_seen is want


def _cli(args: list[str], env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def _one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "ERROR" in ln or ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_in_every_cli(world, checkpoint, tmp_path):
    tr, ev = world
    _one_line_error(_cli(["evalu/infer.py", "--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir",
                          str(tmp_path / "r"), "--device", "cuda"]), 2, "--device cuda", "--device cpu")
    _one_line_error(_cli(["train.py", "--data_dir", str(tr), "--output_dir", str(tmp_path / "o"), "--device", "cuda"]),
                    2, "--device cuda")
    _one_line_error(_cli(["train_rqvae.py", "--data-dir", str(tr), "--output-dir", str(tmp_path / "q"),
                          "--device", "cuda"]), 2, "--device cuda")
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists() and not (tmp_path / "q").exists()


def test_infer_flag_errors_come_before_any_work(world, checkpoint, tmp_path, monkeypatch, caplog):
    from evalu.infer import main

    _, ev = world
    base = ["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(tmp_path / "r")]
    assert main(base + ["--query_batch_size", "0"]) == 2
    assert main(base + ["--labels", str(tmp_path / "nope.jsonl")]) == 2
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
    assert main(base + ["--retrieval", "faiss"]) == 2
    assert main(["--data_dir", str(tmp_path / "missing"), "--model_dir", str(checkpoint), "--result_dir",
                 str(tmp_path / "r")]) == 2
    assert main(["--data_dir", str(ev), "--model_dir", str(tmp_path / "missing"), "--result_dir",
                 str(tmp_path / "r")]) == 2
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("--query_batch_size must be >= 1" in m for m in msgs)
    assert any("nope.jsonl: no such file" in m for m in msgs)
    assert any("--retrieval faiss needs faiss" in m for m in msgs)
    assert any("missing: no such folder" in m for m in msgs)
    assert not (tmp_path / "r").exists()  # a failed run leaves no trace


def test_infer_summary_on_stdout_and_labels_default_to_the_data_dir(world, checkpoint, tmp_path, capsys):
    from evalu.infer import main

    _, ev = world
    assert main(["--data-dir", str(ev), "--model-dir", str(checkpoint), "--result-dir", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "overall" in out and "HR@10" in out and str(tmp_path / "r" / "result.json") in out
    assert "INFO" not in out  # logs go to stderr
    report = json.loads((tmp_path / "r" / "infer_report.json").read_text())
    assert "metrics" in report  # eval dir's labels.jsonl, not named on the command line
    assert "setup" in report["seconds"]


def test_bad_labels_file_keeps_the_results(world, checkpoint, tmp_path):
    from evalu.infer import main

    _, ev = world
    (ev / "labels.jsonl").write_text('{"user_id": "u1", "creative_id": \n')
    assert main(["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(tmp_path / "r")]) == 0
    assert len(json.loads((tmp_path / "r" / "result.json").read_text())["user"]) > 0
    assert "metrics_error" in json.loads((tmp_path / "r" / "infer_report.json").read_text())


def test_train_rqvae_plot_writes_the_picture(world, tmp_path):
    pytest.importorskip("matplotlib")
    import train_rqvae

    tr, _ = world
    assert train_rqvae.main(["--data-dir", str(tr), "--output-dir", str(tmp_path / "o"), "--epochs", "1",
                             "--plot"]) == 0
    png = tmp_path / "o" / "semantic_id_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((tmp_path / "o" / "semantic_id_report.json").read_text())
    assert len(rep["levels"][0]["items_per_code"]) == 256 and rep["fit"]["residual_by_level"]
    assert sum(int(k) * v for k, v in rep["group_sizes"].items()) == rep["items"]


def test_plot_without_matplotlib_is_one_line(world, tmp_path, monkeypatch):
    import train_rqvae

    tr, _ = world
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert train_rqvae.main(["--data_dir", str(tr), "--output_dir", str(tmp_path / "o"), "--plot"]) == 1
    assert not (tmp_path / "o").exists()


def test_console_scripts_are_declared_and_point_at_mains():
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"genrec-infer", "genrec-train", "genrec-train-rqvae", "genrec-synth", "genrec-convert-ml100k",
                            "genrec-merge"}
    for target in scripts.values():
        mod, fn = target.split(":")
        assert callable(getattr(importlib.import_module(mod), fn))


def test_bootstrap_draws_the_picture_when_asked(world, checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    from evalu.infer import main

    _, ev = world
    assert main(["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir", str(tmp_path / "r"),
                 "--plot"]) == 0
    rep = json.loads((tmp_path / "r" / "infer_report.json").read_text())
    assert Path(rep["semantic_id"]["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_an_unwritable_results_dir_fails_before_the_work(world, checkpoint, tmp_path, monkeypatch, caplog):
    import evalu.infer as inf

    _, ev = world
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(inf, "ensure_semantic_ids", lambda *a, **k: pytest.fail("worked on an unwritable results dir"))
    assert inf.main(["--data_dir", str(ev), "--model_dir", str(checkpoint), "--result_dir",
                     str(tmp_path / "afile" / "results")]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot be written" in errors[0]


def test_a_wrong_flag_value_is_one_line_and_exit_2(capsys):
    from genrec.core.cli import FlagParser

    p = FlagParser(prog="genrec-x")
    p.add_argument("--score_dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--n", type=int, default=1)
    for argv in (["--score_dtype", "int8"], ["--n", "many"], ["--nope"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("genrec-x: error: "), err


def test_allocator_tuning_applies_once_and_can_be_switched_off(monkeypatch):
    """glibc's allocator is set by the entry points (never raising): applied where glibc has mallopt, not with
    GENREC_NO_MALLOC_TUNING=1, and a C library without mallopt (macOS) leaves it alone."""
    import ctypes
    import platform

    import genrec.core.alloc as alloc

    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    class Libc:  # a function attribute, as ctypes gives: it takes argtypes / restype
        pass

    Libc.mallopt = staticmethod(mallopt)
    monkeypatch.setattr(alloc, "_tuned", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setenv("GENREC_NO_MALLOC_TUNING", "1")
    assert alloc.tune_allocator() is False and calls == []
    monkeypatch.setenv("GENREC_NO_MALLOC_TUNING", "0")
    assert alloc.tune_allocator() is True and alloc.tune_allocator() is True
    assert sorted(calls) == sorted(alloc._SETTINGS)  # once, every setting

    monkeypatch.setattr(alloc, "_tuned", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a C library without mallopt
    assert alloc.tune_allocator() is False

    def missing(name):
        raise OSError("no C library")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert alloc.tune_allocator() is False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":  # the real one takes every setting
        monkeypatch.undo()
        monkeypatch.setattr(alloc, "_tuned", False)
        monkeypatch.delenv("GENREC_NO_MALLOC_TUNING", raising=False)
        assert alloc.tune_allocator() is True


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_where_a_one_line_error_came_from(capsys, monkeypatch, how):
    import argparse

    from genrec.core.cli import run_cli, setup_logging

    def body() -> int:
        raise ValueError("a bad value in the data")

    monkeypatch.delenv("GENREC_DEBUG", raising=False)
    setup_logging(argparse.Namespace(debug=None, log_level="INFO", progress=None))
    assert run_cli(body) == 1
    err = capsys.readouterr().err
    assert "a bad value in the data" in err and "Traceback" not in err
    if how == "env":
        monkeypatch.setenv("GENREC_DEBUG", "1")
    setup_logging(argparse.Namespace(debug=how == "flag", log_level="INFO", progress=None))
    assert run_cli(body) == 1
    err = capsys.readouterr().err
    assert "a bad value in the data" in err and "Traceback" in err and "in body" in err
    setup_logging(argparse.Namespace(debug=None, log_level="INFO", progress=None))


@pytest.mark.parametrize("error, code", [(MemoryError(), 1), (RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] "
                                                                            "Connection closed by peer"), 1)])
def test_running_out_of_memory_or_ranks_is_one_line(capsys, error, code):
    import argparse

    import torch

    from genrec.core.cli import run_cli, setup_logging

    setup_logging(argparse.Namespace(debug=None, log_level="INFO", progress=None))

    def body() -> int:
        raise error

    assert run_cli(body) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

    def oom() -> int:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    assert run_cli(oom) == 1 and "out of memory" in capsys.readouterr().err


def test_a_runtime_error_that_is_a_bug_keeps_its_traceback():
    from genrec.core.cli import run_cli

    def body() -> int:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)")

    with pytest.raises(RuntimeError, match="shapes"):
        run_cli(body)
