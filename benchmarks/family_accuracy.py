"""Accuracy of the normalization family in float32 at large offsets, beside PyTorch's.

x = offset + N(0, 1), shape (8, 16, 12, 12), float32; the error is the max
abs difference of the output from the float64 reference on the same float32
values.  Run: ``python benchmarks/family_accuracy.py`` (PyTorch optional).
"""

from __future__ import annotations

import numpy as np

import bnfast
from bnfast import _reference as R

try:
    import torch
    F = torch.nn.functional
except ImportError:  # the bnfast column alone
    torch = None

OFFSETS = (1e3, 1e4, 1e5, 1e6)
SHAPE = (8, 16, 12, 12)


def cases(x: np.ndarray):
    """{name: (bnfast output, float64 reference, torch output or None)}, NCHW-shaped."""
    x64 = x.astype(np.float64)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    tx = torch.from_numpy(x) if torch else None
    txl = tx.contiguous(memory_format=torch.channels_last) if torch else None
    t = (lambda f: f().numpy()) if torch else (lambda f: None)
    nhwc = lambda y: y.transpose(0, 3, 1, 2)  # noqa: E731
    return {
        "layer_norm": (bnfast.layer_norm(x, SHAPE[1:]), R.layer_norm_forward(x64, SHAPE[1:])[0],
                       t(lambda: F.layer_norm(tx, SHAPE[1:]))),
        "rms_norm": (bnfast.rms_norm(x, SHAPE[1:], eps=1e-6), R.rms_norm_forward(x64, SHAPE[1:], None, 1e-6)[0],
                     t(lambda: F.rms_norm(tx, SHAPE[1:], eps=1e-6))),
        "group_norm": (bnfast.group_norm(x, 4), R.group_norm_forward(x64, 4)[0], t(lambda: F.group_norm(tx, 4))),
        "group_norm NHWC": (nhwc(bnfast.group_norm(xl, 4, axis=-1)), R.group_norm_forward(x64, 4)[0],
                            t(lambda: F.group_norm(txl, 4))),
        "instance_norm": (bnfast.instance_norm(x), R.instance_norm_forward(x64)[0], t(lambda: F.instance_norm(tx))),
        "instance_norm NHWC": (nhwc(bnfast.instance_norm(xl, axis=-1)), R.instance_norm_forward(x64)[0],
                               t(lambda: F.instance_norm(txl))),
        "filter_response NCHW": (bnfast.filter_response_norm(x), R.filter_response_norm_forward(x64, None, None, None)[0],
                                 None),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    rows = {off: cases((off + rng.standard_normal(SHAPE)).astype(np.float32)) for off in OFFSETS}
    names = list(next(iter(rows.values())))
    print("| offset | " + " | ".join(names) + " |")
    print("| --- " * (len(names) + 1) + "|")
    for off, res in rows.items():
        cells = []
        for name in names:
            y, ref, ty = res[name]
            cell = f"{np.abs(y - ref).max():.1e}"
            if ty is not None:
                cell += f" ({np.abs(ty - ref).max():.1e})"
            cells.append(cell)
        print(f"| {off:.0e} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
