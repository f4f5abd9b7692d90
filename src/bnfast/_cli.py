"""Pieces shared by the command-line parsers (``python -m bnfast ...``)."""

from __future__ import annotations

import argparse

EXIT_STATUS = """\
exit status:
  0  success
  1  the self-check found an error above its tolerance (check)
  2  bad arguments or unknown command, or an optional dependency that an
     option needs is missing (e.g. matplotlib for --plot)"""


def shape(text: str) -> tuple[int, ...]:
    """An argparse type: ``"32,64,56,56"`` or ``"32x64x56x56"`` as a tuple of positive ints."""
    parts = text.replace("x", ",").split(",")
    try:
        dims = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (e.g. 32,64,56,56)") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"a shape needs >= 2 positive sizes, got {text!r}")
    return dims
