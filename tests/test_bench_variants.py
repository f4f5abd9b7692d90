"""``python -m bnfast bench --variants`` runs (at a small size: no timing claims here)."""

from __future__ import annotations

from bnfast import _bench, _bench_variants


def test_run_variants_small():
    rows = _bench_variants.run_variants((16, 4, 5, 5), "float32", ("NCHW", "NHWC"), (1,), min_rounds=1,
                                        budget=0.0)
    assert {r["variant"] for r in rows} == set(_bench_variants.VARIANTS)
    assert all(r["forward"] > 0 and r["backward"] > 0 and r["forward_ratio"] > 0 for r in rows)
    assert len(_bench_variants.format_variant_row(rows[0]).split()) >= 6


def test_bench_cli_variants(capsys, tmp_path):
    path = tmp_path / "v.json"
    assert _bench.main(["--variants", "--shapes", "8x3x4x4", "--threads", "1", "--layouts", "NHWC",
                        "--budget", "0", "--rounds", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "x BN" in out and "Cross-iter BN" in out and path.stat().st_size > 0
