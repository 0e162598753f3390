"""Command-line plumbing every CLI shares: one boolean parser for flags and env vars, both spellings of every
long flag (`--data_dir` and `--data-dir`), dataclass fields -> flags, logging and progress bars, one-line errors.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import numbers
import os
import signal
import sys
import threading
import traceback
import types
import typing
from typing import Any, Callable, Iterable, Mapping, NoReturn

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class CliError(ValueError):
    """A wrong setting (flag value, env var, path or config field), found before any work: one line to the user,
    exit status 2."""

    exit_code = 2


def check_whole(owner: Any, name: str, least: int = 1) -> None:
    """Config field `name` of `owner` is a whole number >= `least` (a bool is not), else a CliError naming the
    flag."""
    v = getattr(owner, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least:
        raise CliError(f"--{name} {v!r}: must be a whole number >= {least}")


def check_number(owner: Any, name: str, positive: bool = False) -> None:
    """Config field `name` of `owner` is a finite number >= 0 (> 0 when `positive`; a bool is not), else a
    CliError naming the flag."""
    v = getattr(owner, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 \
            or (positive and v == 0):
        raise CliError(f"--{name} {v!r}: must be a finite number " + ("> 0" if positive else ">= 0"))


def parse_bool(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off in any case; anything else is an error naming it and the accepted words."""
    v = str(text).strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise ValueError(f"{text!r} is not a boolean (use one of {', '.join(_TRUE + _FALSE)})")


def env_bool(name: str, default: bool) -> bool:
    """The boolean env var `name` (unset or empty: `default`), parsed like a flag."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return parse_bool(raw)
    except ValueError as e:
        raise CliError(f"{name}: {e}") from None


def fraction(text: str) -> float:
    """argparse type: a number within 0-1 (a share), else a one-line error naming it."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number within 0-1")
    return v


def _bool_type(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _auto_bool_type(text: str) -> bool | None:
    """A boolean word, or `auto` (None: the setting decides itself)."""
    return None if str(text).strip().lower() == "auto" else _bool_type(text)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Docstrings kept as written; every flag's default shown (unless its help already says it)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return bool(action.option_strings) and action.default not in (None, argparse.SUPPRESS) \
            and not isinstance(action, (argparse._StoreConstAction, argparse._HelpAction)) \
            and "default" not in (action.help or "").lower()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # argparse prints nothing for a flag without help
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._shows_default(action) or text.startswith("default:"):
            return text
        return f"{text} (default: %(default)s)"


class FlagParser(argparse.ArgumentParser):
    """argparse that accepts both spellings of every long flag: `--a_b` and `--a-b` (and `--a_b=v`), whichever
    way the flag was defined; `--help` shows the defined one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("allow_abbrev", False)  # an abbreviation could mean another flag once both spellings exist
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        by_key = {o.replace("-", "_"): o for o in self._option_string_actions if o.startswith("--")}
        out = []
        for i, tok in enumerate(args):
            if tok == "--":  # everything after it is positional
                out += args[i:]
                break
            name, eq, value = tok.partition("=")
            if tok.startswith("--") and name not in self._option_string_actions:
                name = by_key.get(name.replace("-", "_"), name)
            out.append(name + eq + value if tok.startswith("--") else tok)
        return super().parse_known_args(out, namespace)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        """A wrong flag or value: one line and exit 2, not argparse's usage block first (`--help` has it)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_bool(p: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, default: bool | None,
             help: str = "", dest: str | None = None) -> None:
    """`--name` (true), `--name BOOL` and `--no_name` (false); the parsed value stays None when not given. A
    setting whose default is None (it decides itself) also takes `auto` (None)."""
    dest = dest or name
    shown = " or auto (default)" if default is None else f" (default {'true' if default else 'false'})"
    p.add_argument(f"--{name}", dest=dest, type=_auto_bool_type if default is None else _bool_type, nargs="?",
                   const=True, default=None, metavar="BOOL",
                   help=f"{help + '; ' if help else ''}true/false, yes/no, on/off, 1/0{shown}")
    p.add_argument(f"--no_{name}", dest=dest, action="store_const", const=False, help=f"same as --{name} false")


def _field_type(cls: type, f: dataclasses.Field) -> tuple[Any, bool]:
    """(element type, is a list) of a dataclass field, Optional[...] unwrapped."""
    try:
        hint = typing.get_type_hints(cls)[f.name]
    except Exception:  # noqa: BLE001 - unresolvable annotation: fall back to the default's type
        hint = type(f.default) if f.default is not dataclasses.MISSING else str
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if args else str
        origin = typing.get_origin(hint)
    if origin in (list, tuple):
        elem = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return (elem[0] if elem else str), True
    return hint, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_dataclass_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                            skip: Iterable[str] = (), aliases: Mapping[str, Iterable[str]] | None = None,
                            help: Mapping[str, str] | None = None, choices: Mapping[str, Iterable[str]] | None = None,
                            types: Mapping[str, Callable[[str], Any]] | None = None,
                            taken: set[str] | None = None) -> None:
    """One flag per field of `cls`, named as the field, default None (= the dataclass default, shown in --help).
    `aliases`: more names for a field; `types`: a parser for a field's value; `taken`: flag names already
    defined (skipped, then added to). The class may carry CHOICES, ALIASES and HELP dicts of its own."""
    skip = set(skip)
    aliases = {**getattr(cls, "ALIASES", {}), **(aliases or {})}
    help = {**getattr(cls, "HELP", {}), **(help or {})}
    choices = {**getattr(cls, "CHOICES", {}), **(choices or {})}
    types = types or {}
    taken = taken if taken is not None else set()
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in taken or not f.init:
            continue
        taken.add(f.name)
        typ, is_list = _field_type(cls, f)
        default, text = _default(f), help.get(f.name, "")
        names = [f"--{f.name}", *(f"--{a}" for a in aliases.get(f.name, ()))]
        if typ is bool and not is_list:
            add_bool(p, f.name, default, text)
            for a in aliases.get(f.name, ()):
                p.add_argument(f"--{a}", dest=f.name, type=_bool_type, nargs="?", const=True, default=None,
                               help=argparse.SUPPRESS)
            continue
        shown = " ".join(map(str, default)) if is_list and default is not None else default
        kw: dict[str, Any] = {"dest": f.name, "default": None,
                              "help": text if default is None and text else f"{text + '; ' if text else ''}default {shown}"}
        if is_list:
            kw["nargs"] = "+"
        if f.name in choices:
            kw["choices"] = list(choices[f.name])
        kw["type"] = types.get(f.name) or (typ if typ in (int, float) else str)
        p.add_argument(*names, **kw)


def from_namespace(cls: type, ns: argparse.Namespace | Mapping[str, Any], **extra: Any) -> Any:
    """`cls` from the flags that were given (None = not given: the dataclass default)."""
    src = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns)
    fs = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kw = {k: v for k, v in src.items() if k in fs and v is not None}
    for k, v in kw.items():
        if isinstance(v, list) and isinstance(_default(fs[k]), tuple):
            kw[k] = tuple(v)
    return cls(**{**kw, **extra})


# --- logging and progress --------------------------------------------------------------------------------------

_progress: bool | None = None  # None: bars only when stderr is a terminal


def progress_disabled() -> bool | None:
    """tqdm's `disable` for our bars: True/False when forced (--progress), None = tqdm's own rule (off when
    stderr is not a terminal), so bars never run into redirected logs."""
    return None if _progress is None else not _progress


def add_logging_arguments(p: argparse.ArgumentParser) -> None:
    add_bool(p, "progress", None, "progress bars (auto: only when stderr is a terminal)")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="default INFO; logs go to stderr; DEBUG adds the traceback of every error and degradation")
    add_bool(p, "debug", False, "same as --log_level DEBUG (env GENREC_DEBUG)")


def debug_enabled(ns: argparse.Namespace | None = None) -> bool:
    """--debug, or GENREC_DEBUG set true: tracebacks of one-line errors and degradations are logged."""
    if getattr(ns, "debug", None):
        return True
    try:
        return env_bool("GENREC_DEBUG", False)
    except CliError as e:  # a wrong value must not cost the run its error message
        print(f"warning: {e}; taken as false", file=sys.stderr)
        return False


def setup_logging(ns: argparse.Namespace | None = None) -> None:
    """Logs to stderr (through tqdm, so a bar never splits a log line), progress bars as asked."""
    global _progress
    _progress = getattr(ns, "progress", None)
    level = "DEBUG" if debug_enabled(ns) else (getattr(ns, "log_level", "INFO") or "INFO")
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):  # ours from an earlier call (a test, a second CLI in one process); others stay
        if isinstance(h, _TqdmHandler):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


class _TqdmHandler(logging.StreamHandler):
    """A stderr handler that writes through tqdm.write: active bars are cleared and redrawn around the line. The
    stream is whatever sys.stderr is at the time (it may have been replaced since the handler was made)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _say(message: str) -> None:
    log = logging.getLogger("cli")
    if log.isEnabledFor(logging.DEBUG) and logging.getLogger().handlers:
        log.debug("where it came from:", exc_info=True)
    elif debug_enabled():
        traceback.print_exc()
    if logging.getLogger().handlers:
        log.error("%s", message)
    else:
        print(f"error: {message}", file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a run stops the way Ctrl-C stops it (cleanup runs), exit status 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _resource_failure(e: BaseException) -> str | None:
    """What ran out, for the failures that are the machine's rather than the code's: memory (host or GPU) and
    the other ranks of a torchrun job (one that died or hangs past GENREC_DIST_TIMEOUT)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return "out of memory (lower --query_batch_size / --batch_size, or use fewer workers)"
    if type(e).__module__.startswith("torch.distributed") or \
            type(e).__name__ in ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError") or \
            any(w in str(e) for w in ("gloo", "NCCL", "Connection closed by peer", "Timed out")):
        return "another rank of the torchrun job failed or stopped answering (see its log; GENREC_DIST_TIMEOUT)"
    return None


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI's body: a wrong flag value, env var or path found before any work (an error with exit_code 2,
    such as CliError) is one line and exit 2; another ValueError/OSError/ImportError is one line and exit 1 (its
    traceback logged at DEBUG: --debug or GENREC_DEBUG=1), and so is running out of memory or losing the other
    ranks of a torchrun job. Ctrl-C is exit 130 and SIGTERM exit 143, at any stage (nothing half-written stays:
    every file is written atomically). Anything else is a bug and keeps its traceback."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return main()
    except (OSError, ValueError, ImportError) as e:
        _say(str(e))
        return int(getattr(e, "exit_code", 1))
    except (MemoryError, RuntimeError) as e:
        why = _resource_failure(e)
        if why is None:
            raise  # a bug: its traceback
        _say(f"{why}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return 1
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
