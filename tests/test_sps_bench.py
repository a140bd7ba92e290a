"""The SPS-vs-floor benchmark's code path, on a tiny random model on the CPU (real figures come from a GPU)."""

from loadtest.sps import TINY, sps_curve, write_sps


def test_sps_curve_runs_and_reports_the_floor(tmp_path):
    rows = sps_curve(TINY, "cpu", "torch", context=40, draft=3, requests=(1, 4), repeats=2)
    steps, meta = rows[:-1], rows[-1]
    assert [r["batch_tokens"] for r in steps] == [4, 16]
    assert all(r["step_ms"] > 0 and 0 < r["floor_ms"] and r["floor_ratio"] > 0 for r in steps)
    assert meta["copy_bandwidth_gb_s"] > 0 and meta["weight_gb"] > 0
    md = tmp_path / "b.md"
    write_sps(str(md), rows, "cmd", "cpu", "torch", 40, 3)
    assert "<!-- bench:sps-torch -->" in md.read_text() and "| 4 | 16 |" in md.read_text()
