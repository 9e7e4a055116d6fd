"""A small dispatcher shared by the three console scripts: one module per subcommand, imported lazily.

Each subcommand module defines ``HELP`` (one line), ``configure_parser(parser)`` and ``main(args) -> int``.
Lazy imports keep ``--help`` fast and let a subcommand whose optional dependency is missing fail alone,
with a clear message, instead of breaking the whole tool.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# Default --threads per kind of work, as a function of the usable CPUs: (rule in words, rule).
# Measured with bench/bench_threads.py (table and reasoning in docs/threads.md).
THREAD_RULES: dict[str, tuple[str, Callable[[int], int]]] = {
    "loop": ("CPUs − 1, at most 4", lambda cpus: max(1, min(4, cpus - 1))),
    "train": ("CPUs − 1, at most 8", lambda cpus: max(1, min(8, cpus - 1))),
    "simulate": ("CPUs − 1, at most 4", lambda cpus: max(1, min(4, cpus - 1))),
}


def default_threads(kind: str, cpus: int | None = None) -> int:
    """The default thread count of ``kind`` (``loop``, ``train``, ``simulate``) on ``cpus`` usable CPUs."""
    return THREAD_RULES[kind][1](usable_cpus() if cpus is None else int(cpus))


def _thread_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {n}")
    return n


def add_threads_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str, kind: str) -> None:
    """``--threads N``: ``what`` threads; unset: :func:`default_threads` of ``kind``; 0: the library's own choice."""
    rule = THREAD_RULES[kind][0]
    parser.add_argument("--threads", type=_thread_count, default=None, metavar="N",
                        help=f"{what} (default: {rule}: {default_threads(kind)} here; 0: the library's own choice)")


def resolve_threads(value: int | None, kind: str) -> int:
    """``--threads``: the value given, else the default of ``kind`` (0 is passed on: the library decides)."""
    return default_threads(kind) if value is None else int(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to an option's help only where it informs: not when the help already states its
    default, for required options, for flags and for options whose default is unset (``None``). A command's
    ``EPILOG`` (e.g. the ``sim://`` options under ``nsdd-edge run --help``) is printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text.lower() or action.required or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return super()._get_help_string(action)


def build_parser(prog: str, description: str, commands: dict[str, str]
                 ) -> tuple[argparse.ArgumentParser, dict[str, tuple[object | None, str]]]:
    """The dispatcher's parser (one subparser per command, each listed once in ``--help``) and, per command,
    ``(module or None when its import failed, help line)``."""
    parser = argparse.ArgumentParser(prog=prog, description=description.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"Run '{prog} COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    modules: dict[str, tuple[object | None, str]] = {}
    for name, module_name in commands.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional dependency is missing: show it, keep the rest working
            help_text = f"(unavailable: {exc})"
            module = None
        else:
            help_text = getattr(module, "HELP", "")
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=getattr(module, "EPILOG", None), formatter_class=HelpFormatter)
        if module is not None:
            module.configure_parser(p)
        modules[name] = (module, help_text)
    return parser, modules


def run_dispatcher(prog: str, description: str, commands: dict[str, str],
                   argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser(prog, description, commands)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module, help_text = modules[args.command]
    if module is None:
        print(f"{prog} {args.command}: {help_text}", file=sys.stderr)
        return 2
    return int(module.main(args) or 0)
