"""The benchmark tooling (``python -m bnfast bench``) works; no timings are judged."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bnfast import _bench, _kernels


def test_cpu_model_comes_from_cpuinfo():
    name = _bench.cpu_model()
    assert isinstance(name, str) and name
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")]
        if models and models[0]:
            assert name.startswith(models[0])


def test_header_names_cpu_isa_and_caches():
    text = "\n".join(_bench.header_lines(None))
    assert _bench.cpu_model() in text
    assert _kernels.simd_in_use() in text
    assert "L1d" in text and "L3" in text and "streaming stores above" in text
    info = _bench.machine_info()
    assert info["stream_threshold"] == _kernels.stream_threshold()
    assert info["cache_l3"] == _kernels.cache_sizes()["l3"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 5, 70001, 300001])
def test_traffic_reference_copies_and_adds(dtype, n):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    before_threads, before_threshold = _kernels.get_num_threads(), _kernels.stream_threshold()
    try:
        for threads in (1, 2, 3):
            _kernels.set_num_threads(threads)
            for threshold in (None, 0):  # plain and streaming stores
                _kernels.set_stream_threshold(threshold)
                out = np.full(n + 1, np.nan, dtype)[1:]  # not 16-byte aligned for float64
                _kernels.traffic(out, a)
                assert np.array_equal(out, a)
                _kernels.traffic(out, a, b)
                assert np.array_equal(out, a + b)
    finally:
        _kernels.set_num_threads(before_threads)
        _kernels.set_stream_threshold(before_threshold)


def test_traffic_rejects_mismatched_arrays():
    a = np.zeros(10)
    with pytest.raises(ValueError):
        _kernels.traffic(np.zeros(10, np.float32), a)
    with pytest.raises(ValueError):
        _kernels.traffic(np.zeros(9), a)
    with pytest.raises(ValueError):
        _kernels.traffic(np.zeros(20)[::2], a)
    with pytest.raises(ValueError):
        _kernels.traffic(np.zeros(10, np.int64), np.zeros(10, np.int64))


def test_torch_sees_nhwc_in_channels_last_format():
    torch = pytest.importorskip("torch")
    for shape, fmt in (((2, 3, 4, 5), torch.channels_last), ((2, 3, 4, 5, 6), torch.channels_last_3d)):
        x, _, _ = _bench._make(shape, True, np.float32)
        t = _bench._torch_view(torch, x, True)
        assert tuple(t.shape) == shape and t.is_contiguous(memory_format=fmt)
        assert t.data_ptr() == x.ctypes.data  # a view: the same bytes as bnfast reads


def test_suite_is_issue_9s():
    assert _bench.SUITE == [
        (32, 64, 28, 28), (32, 64, 56, 56), (64, 64, 112, 112), (128, 256, 14, 14), (8, 3, 224, 224),
        (1, 64, 56, 56), (256, 1024), (4096, 64), (2, 32, 16, 28, 28), (8, 16),
    ]  # fmt: skip


def test_help_describes_the_reference(capsys):
    with pytest.raises(SystemExit) as exc:
        _bench.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "memory-limit reference" in out and "channels_last" in out and "--plot" in out


def test_run_and_plot_without_torch(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _bench.run([(8, 16), (2, 3, 4, 4)], ops=("inference", "backward"), dtypes=("float32",),
                      threads=(1, 2), min_rounds=1, budget=0.0, use_torch=False, use_numpy=False)
    assert len(rows) == 3 * 2 * 2  # NC; NCHW and NHWC -- x 2 ops x 2 thread counts
    assert all(r["torch_s"] is None and r["roof_s"] > 0 for r in rows)
    path = tmp_path / "chart.png"
    _bench.plot(rows, str(path), torch_note="PyTorch is not installed")
    assert path.stat().st_size > 0


def test_family_bench_runs_every_member_and_direction(monkeypatch, capsys, tmp_path):
    """`bench --family` on small stand-ins of the suite's cases: one row per case, JSON written."""
    from bnfast import _bench_family as fam

    monkeypatch.setattr(fam, "FAMILY_SUITE", [
        ("layer_norm", (16, 64), ("rows",)), ("rms_norm", (16, 64), ("rows",)),
        ("group_norm", (2, 64, 4, 4), ("NCHW", "NHWC")), ("instance_norm", (2, 8, 4, 4), ("NCHW", "NHWC")),
    ])  # fmt: skip
    path = tmp_path / "family.json"
    assert _bench.main(["--family", "--threads", "1", "--no-torch", "--budget", "0", "--rounds", "1",
                        "--passes", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    import json

    rows = json.loads(path.read_text())["results"]
    assert len(rows) == 6 * 2 and {r["direction"] for r in rows} == {"forward", "backward"}
    assert all(r["time_s"] > 0 and r["roof_s"] > 0 and r["torch_s"] is None for r in rows)
    assert "group_norm" in out and "instance_norm" in out


def test_family_bench_torch_callables_match_bnfast():
    """The PyTorch side of each family case computes what bnfast computes."""
    torch = pytest.importorskip("torch")
    from bnfast import _bench_family as fam

    for member, shape, layout in [("layer_norm", (8, 32), "rows"), ("rms_norm", (8, 32), "rows"),
                                  ("group_norm", (2, 64, 3, 3), "NCHW"), ("group_norm", (2, 64, 3, 3), "NHWC"),
                                  ("instance_norm", (2, 4, 3, 3), "NCHW"), ("instance_norm", (2, 4, 3, 3), "NHWC")]:
        if layout == "rows":
            rng = np.random.default_rng(0)
            x, g, axis = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32), -1
        else:
            x, g, axis = _bench._make(shape, layout == "NHWC", np.dtype(np.float32))
        for direction in ("forward", "backward"):
            fns = fam._case_fns(member, direction, x, g, axis, torch, layout == "NHWC")
            ours = fns["bnfast"]()
            theirs = fns["torch"]()
            a = ours[0]
            t = theirs if isinstance(theirs, torch.Tensor) else theirs[0]
            t = t.reshape(shape)  # instance norm's backward runs on the (1, N*C, H, W) view
            t = t.numpy() if layout != "NHWC" else t.permute(0, 2, 3, 1).numpy()
            np.testing.assert_allclose(a, t.reshape(a.shape), rtol=1e-4, atol=1e-4, err_msg=f"{member} {layout} {direction}")


def test_contention_bench_times_every_load(capsys, tmp_path):
    """`bench --contention` on a small case: one row per implementation and
    thread count with a median per load, the busy process gone afterwards."""
    import json

    path = tmp_path / "contention.json"
    assert _bench.main(["--contention", "--threads", "1,2", "--no-torch", "--shapes", "2x3x4x4",
                        "--ops", "inference,backward", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["op"], r["threads"]) for r in rows] == [("inference", 1), ("inference", 2),
                                                       ("backward", 1), ("backward", 2)]
    assert all(r["impl"] == "bnfast" and r["quiet"] > 0 and r["1 busy thread"] > 0 and r["2 busy threads"] > 0
               for r in rows)
    assert "x quiet" in capsys.readouterr().out


def test_busy_process_runs_during_the_block_only():
    from bnfast import _bench_contention as con

    with con.busy(0) as none:
        assert none is None
    with con.busy(2) as proc:
        assert proc.poll() is None  # spinning
    assert proc.poll() is not None  # stopped
