"""Command line: ``python -m bnfast [check|bench|demo] ...``.

With no command, or ``check``: configuration, a self-check against the
reference and a short timing table against NumPy.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "check"
    if command == "check":
        from ._selfcheck import main as run
    elif command == "bench":
        from ._bench import main as run
    elif command == "demo":
        from ._demo import main as run
    else:
        print(f"unknown command {command!r}; use check, bench or demo", file=sys.stderr)
        return 2
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
