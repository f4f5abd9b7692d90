"""``python -m bnfast bench --contention``: batch norm's times beside other busy processes.

On a shared machine another process may hold a core while a kernel runs.
Each case is timed quiet, then beside a process spinning one busy thread,
then beside a process spinning two (GIL-free hashing in each thread, so both
cores are contended): bnfast at each requested thread count and PyTorch at
the same counts, interleaved round by round under each load.  The figure is
the median call (a best-of would hide the calls the load slowed), and
``x quiet`` is the loaded median over the quiet one.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from ._bench import _case_fns, _fmt_time, _make
from ._functional import get_contention_backoff, get_num_threads, set_contention_backoff, set_num_threads

DEFAULT_CASES = (("train", (32, 64, 56, 56)), ("inference", (32, 64, 56, 56)), ("backward", (32, 64, 56, 56)),
                 ("train", (32, 64, 28, 28)), ("backward", (32, 64, 28, 28)))
LOADS = (("quiet", 0), ("1 busy thread", 1), ("2 busy threads", 2))
HEADER = (f"{'op':<9} {'shape':<16} {'impl':<6} {'thr':>3} {'quiet':>11}  {'1 busy':>11} {'x quiet':>7}  "
          f"{'2 busy':>11} {'x quiet':>7}")

# n threads that never sleep and (hashing 1 MiB at a time) never hold the GIL long
_SPINNER = """import hashlib, sys, threading
buf = bytes(1 << 20)
def spin():
    while True:
        hashlib.sha256(buf).digest()
for _ in range(int(sys.argv[1]) - 1):
    threading.Thread(target=spin, daemon=True).start()
spin()
"""


@contextlib.contextmanager
def busy(threads: int) -> Iterator[subprocess.Popen | None]:
    """Another process with ``threads`` busy threads (none for 0) while the block runs; yields it."""
    if threads == 0:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", _SPINNER, str(threads)])
    try:
        time.sleep(0.3)  # started and spinning
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _medians(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median time of each callable, rounds interleaved (several calls per
    timing for tiny ones)."""
    first = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t
    inner = {n: max(1, int(2e-4 / max(t, 1e-9))) for n, t in first.items()}
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t) / inner[name])
    return {n: statistics.median(v) for n, v in samples.items()}


def run_contention(cases=DEFAULT_CASES, threads=(1, 2), *, rounds: int = 30, use_torch: bool = True,
                   progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Time each case quiet and under each load; one dict per (case, implementation, threads).

    Parameters
    ----------
    cases : sequence of (op, shape)
        ``op`` is ``train``, ``inference`` or ``backward``; shapes NCHW, float32.
    threads : sequence of int
        Thread counts for bnfast and PyTorch.
    rounds : int
        Interleaved rounds per load; the median of them is reported.
    use_torch : bool
        Time PyTorch too, when it is importable.
    progress : callable, optional
        Called with each finished row.

    Returns
    -------
    list of dict
        Keys ``op``, ``shape``, ``impl``, ``threads`` and, per load name in
        `LOADS`, its median time in seconds.
    """
    from ._bench import _torch

    torch = _torch() if use_torch else None
    saved, saved_torch = get_num_threads(), torch.get_num_threads() if torch is not None else None
    rows = []
    try:
        for op, shape in cases:
            x, g, axis = _make(shape, False, "float32")
            for n in threads:
                set_num_threads(n)
                if torch is not None:
                    torch.set_num_threads(n)
                fns = {k: f for k, f in _case_fns(op, x, g, axis, torch, False).items() if k in ("bnfast", "torch")}
                times: dict[str, dict[str, float]] = {k: {} for k in fns}
                for load, busy_threads in LOADS:
                    set_contention_backoff(get_contention_backoff())  # each load from a fresh back-off state
                    with busy(busy_threads), (torch.no_grad() if torch is not None else contextlib.nullcontext()):
                        for k, t in _medians(fns, rounds).items():
                            times[k][load] = t
                for k in fns:
                    row = dict(op=op, shape=shape, impl=k, threads=n, **times[k])
                    rows.append(row)
                    if progress is not None:
                        progress(row)
    finally:
        set_num_threads(saved)
        if torch is not None:
            torch.set_num_threads(saved_torch)
    return rows


def format_contention_row(r: dict) -> str:
    """One line of the table of `run_contention`."""
    quiet = r["quiet"]
    cells = "  ".join(f"{_fmt_time(r[name])} {r[name] / quiet:>6.2f}x" for name, _ in LOADS[1:])
    shape = "(" + ",".join(map(str, r["shape"])) + ")"
    return f"{r['op']:<9} {shape:<16} {r['impl']:<6} {r['threads']:>3} {_fmt_time(quiet)}  {cells}"
