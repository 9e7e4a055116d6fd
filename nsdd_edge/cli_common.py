"""A small dispatcher shared by the three console scripts: one module per subcommand, imported lazily.

Each subcommand module defines ``HELP`` (one line), ``configure_parser(parser)`` and ``main(args) -> int``.
Lazy imports keep ``--help`` fast and let a subcommand whose optional dependency is missing fail alone,
with a clear message, instead of breaking the whole tool.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence


def run_dispatcher(prog: str, description: str, commands: dict[str, str],
                   argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    lines = []
    for name, module_name in commands.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional dependency is missing: show it, keep the rest working
            help_text = f"(unavailable: {exc})"
            module = None
        else:
            help_text = getattr(module, "HELP", "")
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if module is not None:
            module.configure_parser(p)
        modules[name] = (module, help_text)
        lines.append(f"  {name:<14} {help_text}")
    parser.epilog = "commands:\n" + "\n".join(lines) + f"\n\nRun '{prog} COMMAND --help' for a command's options."
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module, help_text = modules[args.command]
    if module is None:
        print(f"{prog} {args.command}: {help_text}", file=sys.stderr)
        return 2
    return int(module.main(args) or 0)
