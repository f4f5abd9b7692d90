#!/usr/bin/env python3
"""Compare two pytest-benchmark runs with a noise-aware regression rule.

Usage::

    python benchmarks/compare.py BASELINE.json NEW.json [options]

Both files are pytest-benchmark JSON (``--benchmark-json=FILE``, or the files
``--benchmark-autosave`` writes under ``.benchmarks/``).  Cases are matched by
name.  pytest-benchmark's own ``--benchmark-compare-fail=min:10%`` compares one
statistic against a fixed percentage, and fails on unchanged code: calls of a
microsecond vary by tens of percent from one run to the next.  Here a case
regresses only when all of these hold:

* its median is slower than the baseline's by more than the case's threshold,
  ``max(--threshold, --spread-factor * relative spread)``, where the relative
  spread is the larger of the two runs' interquartile range over median -- a
  case that scatters widely needs a larger change to count;
* its fastest round is slower too, by more than ``--threshold`` (a burst of
  machine noise moves the median, rarely the minimum);
* its baseline median is at least ``--small`` seconds (10 µs): shorter cases
  are judged only by ``--small-factor`` (a 2x slowdown fails at any size --
  e.g. a lost fast path -- smaller changes in them are reported, not failed).

By default only bnfast's own members of each group are judged (``impl`` in
``bnfast``, ``bnfast_alloc``): NumPy, PyTorch and the memory-limit reference
are context (``--impl all`` judges every case).  When both runs hold the
memory-limit reference (``roofline``: the same traffic with the same
threads), the summary gives its change too: if it moved by 20% or more, the
machine's state changed between the runs (another process, another CPU
frequency) and the verdicts are suspect.

Exit status: 0 no regression, 1 at least one regression, 2 bad input (a file
missing or unreadable, no case in common).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_THRESHOLD = 0.10  # relative slowdown of the median (and of the minimum) that counts
DEFAULT_SPREAD_FACTOR = 2.0  # the threshold grows to this many relative IQRs
DEFAULT_SMALL = 10e-6  # seconds: shorter cases are outside the percentage rule
DEFAULT_SMALL_FACTOR = 2.0  # ...but fail when this many times slower
DEFAULT_IMPLS = ("bnfast", "bnfast_alloc")


@dataclass
class Verdict:
    """The comparison of one case."""

    name: str
    base_median: float
    new_median: float
    ratio: float  # new median / baseline median
    min_ratio: float  # new min / baseline min
    threshold: float  # relative slowdown of the median that counts for this case
    status: str  # "ok", "faster", "REGRESSED", "small", "small REGRESSED"

    @property
    def regressed(self) -> bool:
        return self.status.endswith("REGRESSED")


def load(path: str) -> dict[str, dict[str, Any]]:
    """The benchmarks of a pytest-benchmark JSON file, by full name."""
    with open(path) as f:
        data = json.load(f)
    try:
        return {b.get("fullname") or b["name"]: b for b in data["benchmarks"]}
    except (KeyError, TypeError):
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)") from None


def _rel_spread(stats: dict[str, Any]) -> float:
    median = float(stats["median"])
    if median <= 0:
        return 0.0
    iqr = stats.get("iqr")
    if iqr is None:  # very old files: IQR from the quartiles, or the standard deviation
        iqr = stats["q3"] - stats["q1"] if "q3" in stats and "q1" in stats else stats.get("stddev", 0.0)
    return float(iqr) / median


def judge(
    name: str,
    base: dict[str, Any],
    new: dict[str, Any],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    spread_factor: float = DEFAULT_SPREAD_FACTOR,
    small: float = DEFAULT_SMALL,
    small_factor: float = DEFAULT_SMALL_FACTOR,
) -> Verdict:
    """Apply the rule (module docstring) to one case's two ``stats`` dicts."""
    m0, m1 = base["median"], new["median"]
    ratio = m1 / m0 if m0 > 0 else float("inf")
    min_ratio = new["min"] / base["min"] if base["min"] > 0 else float("inf")
    case_threshold = max(threshold, spread_factor * max(_rel_spread(base), _rel_spread(new)))
    if m0 < small:
        slow = ratio > small_factor and min_ratio > small_factor
        status = "small REGRESSED" if slow else "small"
        return Verdict(name, m0, m1, ratio, min_ratio, small_factor - 1, status)
    if ratio - 1 > case_threshold and min_ratio - 1 > threshold:
        status = "REGRESSED"
    elif 1 / ratio - 1 > case_threshold and 1 / min_ratio - 1 > threshold:
        status = "faster"
    else:
        status = "ok"
    return Verdict(name, m0, m1, ratio, min_ratio, case_threshold, status)


def _impl(bench: dict[str, Any]) -> str | None:
    impl = (bench.get("extra_info") or {}).get("impl")
    if impl is None:  # a run without extra_info: the parametrize id, test_op[<case>-<impl>]
        param = bench.get("param") or ""
        impl = param.rsplit("-", 1)[-1] if param else None
    return impl


def compare(
    base: dict[str, dict[str, Any]],
    new: dict[str, dict[str, Any]],
    *,
    impls: Iterable[str] | None = DEFAULT_IMPLS,
    **rule: float,
) -> tuple[list[Verdict], list[str], list[str]]:
    """Verdicts for the cases in both runs, and the names only in the baseline / only in the new run.

    ``impls``: the ``extra_info["impl"]`` values judged (None: every case)."""
    wanted = None if impls is None else set(impls)
    common = [n for n in base if n in new and (wanted is None or _impl(base[n]) in wanted)]
    verdicts = [judge(n, base[n]["stats"], new[n]["stats"], **rule) for n in common]
    only_base = [n for n in base if n not in new]
    only_new = [n for n in new if n not in base]
    return verdicts, only_base, only_new


def machine_drift(
    base: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], impl: str = "roofline"
) -> tuple[float, int] | None:
    """Geometric mean of new/baseline medians over the ``impl`` cases in both runs
    (the memory-limit reference does the same traffic with the same threads:
    when it is slower too, the machine was busier, not bnfast slower), and how
    many; None without such cases."""
    ratios = [
        new[n]["stats"]["median"] / base[n]["stats"]["median"]
        for n in base
        if n in new and _impl(base[n]) == impl and base[n]["stats"]["median"] > 0
    ]
    if not ratios:
        return None
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)), len(ratios)


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def report(verdicts: Sequence[Verdict], only_base: Sequence[str], only_new: Sequence[str]) -> list[str]:
    """The comparison as lines of text: every case, then a summary."""
    width = max([len(v.name) for v in verdicts] + [4])
    lines = [f"{'case':<{width}}  {'baseline':>10}  {'new':>10}  {'ratio':>6}  {'min ratio':>9}  "
             f"{'threshold':>9}  verdict"]  # fmt: skip
    for v in verdicts:
        lines.append(
            f"{v.name:<{width}}  {_time(v.base_median):>10}  {_time(v.new_median):>10}  {v.ratio:6.2f}  "
            f"{v.min_ratio:9.2f}  {v.threshold:+9.0%}  {v.status}"
        )
    regressed = [v for v in verdicts if v.regressed]
    faster = [v for v in verdicts if v.status == "faster"]
    small = [v for v in verdicts if v.status.startswith("small")]
    lines.append("")
    lines.append(
        f"{len(verdicts)} cases compared: {len(regressed)} regressed, {len(faster)} faster, "
        f"{len(small)} below the size of the percentage rule"
    )
    if only_base or only_new:
        lines.append(f"{len(only_base)} cases only in the baseline, {len(only_new)} only in the new run (not compared)")
    for v in regressed:
        lines.append(f"REGRESSION: {v.name}: median {v.ratio:.2f}x, minimum {v.min_ratio:.2f}x the baseline's")
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/compare.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("baseline", help="pytest-benchmark JSON of the reference run")
    p.add_argument("new", help="pytest-benchmark JSON of the run to judge")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"smallest relative slowdown that counts (default {DEFAULT_THRESHOLD})")
    p.add_argument("--spread-factor", type=float, default=DEFAULT_SPREAD_FACTOR,
                   help="a case's threshold is at least this many times its relative IQR "
                        f"(default {DEFAULT_SPREAD_FACTOR})")
    p.add_argument("--small", type=float, default=DEFAULT_SMALL,
                   help=f"seconds: cases with a shorter baseline median skip the percentage rule (default {DEFAULT_SMALL})")
    p.add_argument("--small-factor", type=float, default=DEFAULT_SMALL_FACTOR,
                   help=f"slowdown factor that fails a short case (default {DEFAULT_SMALL_FACTOR})")
    p.add_argument("--impl", default=",".join(DEFAULT_IMPLS),
                   help="comma-separated implementations judged, or 'all' (default bnfast,bnfast_alloc)")
    p.add_argument("--quiet", action="store_true", help="print the summary and the regressions only")
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else list(argv))
    try:
        base, new = load(args.baseline), load(args.new)
    except (OSError, ValueError) as err:
        print(f"compare.py: {err}", file=sys.stderr)
        return 2
    impls = None if args.impl == "all" else [s.strip() for s in args.impl.split(",") if s.strip()]
    verdicts, only_base, only_new = compare(
        base, new, impls=impls, threshold=args.threshold, spread_factor=args.spread_factor,
        small=args.small, small_factor=args.small_factor,
    )  # fmt: skip
    if not verdicts:
        print("compare.py: no case in common between the two runs (check --impl)", file=sys.stderr)
        return 2
    lines = report(verdicts, only_base, only_new)
    drift = machine_drift(base, new)
    if drift is not None:
        ratio, count = drift
        lines.insert(lines.index("") + 2, f"memory-limit reference ({count} cases): new/baseline median {ratio:.2f}x"
                     + (" -- the machine was busier or quieter: measure again before trusting a verdict"
                        if not 1 / 1.2 < ratio < 1.2 else ""))  # fmt: skip
    if args.quiet:
        lines = lines[lines.index("") + 1 :]
    print("\n".join(lines))
    return 1 if any(v.regressed for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
