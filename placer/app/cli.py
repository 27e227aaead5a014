"""The ``placer`` command line. It parses arguments and calls library functions; nothing else lives here.

The commands live in :mod:`placer.app.cli_inspect` (graph, cluster, baseline, run, export, show) and
:mod:`placer.app.cli_train` (train, place, compare, demo); each adds its arguments only when it runs, so
``placer --help`` imports neither torch nor the policies. Every expected failure (bad file, unknown name,
untraceable model, OOM placement) is printed as one line ``placer: error: ...`` with exit status 2 — never a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from placer.app import cli_inspect, cli_train  # noqa: F401 -- register their commands
from placer.app.cli_base import COMMANDS


class _Parser(argparse.ArgumentParser):
    """An argument error (unknown choice, bad duration) is a ``ValueError``, so it is one ``placer: error:`` line
    like every other expected failure (``--help`` still prints the usage)."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(f"{self.prog}: {message}")


def _command_in(argv: list[str]) -> str | None:
    """The sub-command ``argv`` runs (its first word that names one), if any."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``placer`` parser; only the arguments of the command ``argv`` runs are added (all when ``argv`` is
    ``None``)."""
    parser = _Parser(prog="placer", description="Reinforcement-learning device placement for PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    wanted = None if argv is None else _command_in(argv)
    for name, (help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == wanted:
            add_arguments(p)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's stop), raised where Ctrl-C's ``KeyboardInterrupt`` would be: the same
    orderly stop (a training run saves its checkpoint and placement; engine workers are stopped)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status: 0, 2 (one ``placer: error:`` line), 130 (Ctrl-C) or 143 (SIGTERM)."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return _main(argv)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.DEBUG if "-v" in argv or "--verbose" in argv else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    verbose = "-v" in argv or "--verbose" in argv
    try:
        parser = build_parser(argv)  # building a command's options can fail too (a registry that cannot load)
        args = parser.parse_args(argv)
        args.func(args)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        sys.stderr.write(f"placer: {'terminated' if terminated else 'interrupted'}\n")
        return 143 if terminated else 130
    except (ValueError, KeyError, OSError, RuntimeError, RecursionError) as e:
        if verbose:
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.strerror:  # a file that cannot be written or read: name it, no errno
            msg = f"{e.filename or 'file'}: {e.strerror}" if e.filename else e.strerror
        elif isinstance(e, RecursionError):
            msg = "input nested too deeply to read (maximum recursion depth exceeded)"
        # plain write, not rich: rich would wrap a long message over several lines
        sys.stderr.write(f"placer: error: {msg.splitlines()[0] if msg else type(e).__name__}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
