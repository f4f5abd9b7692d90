"""Command line: ``python -m bnfast [COMMAND] [OPTIONS]``; ``--help`` lists the commands."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from ._cli import EXIT_STATUS

# name -> (module, one line for --help); the first is the default command
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("bnfast._selfcheck", "configuration, self-check, timing table vs NumPy (the default command)"),
    "bench": ("bnfast._bench", "benchmark table: time, GB/s, memory-limit ratio, vs NumPy and PyTorch"),
    "demo": ("bnfast._demo", "train a small CNN on the digits with and without batch normalization"),
}
DEFAULT_COMMAND = "check"

def _parser() -> argparse.ArgumentParser:
    commands = "\n".join(
        textwrap.fill(summary, 79, initial_indent=f"  {name:<6} ", subsequent_indent=" " * 9)
        for name, (_, summary) in COMMANDS.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m bnfast",
        usage="python -m bnfast [-h] [--version] [COMMAND] [OPTIONS ...]",
        description="bnfast: fast, accurate batch normalization for NumPy on the CPU.",
        epilog=(
            f"commands:\n{commands}\n\n"
            f"With no command, or options only, `{DEFAULT_COMMAND}` runs: `python -m bnfast --no-timing`\n"
            f"is `python -m bnfast {DEFAULT_COMMAND} --no-timing`.  `python -m bnfast COMMAND --help` "
            f"lists\na command's options.\n\n{EXIT_STATUS}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print bnfast's version and exit")
    parser.add_argument("command", nargs="?", metavar="COMMAND", help=f"one of {', '.join(COMMANDS)}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the subcommand; return the process exit code (see ``--help``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if args and args[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if args and args[0] == "--version":
        from ._version import __version__

        print(f"bnfast {__version__}")
        return 0
    command = args.pop(0) if args and not args[0].startswith("-") else DEFAULT_COMMAND
    if command not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(f"python -m bnfast: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    import importlib

    run = importlib.import_module(COMMANDS[command][0]).main
    try:
        return int(run(args))
    except SystemExit as exc:  # argparse exits on --help (0) and on bad arguments (2)
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
