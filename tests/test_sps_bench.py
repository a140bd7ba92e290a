"""The SPS-vs-floor benchmark's code path, on a tiny random model on the CPU (real figures come from a GPU).

The floor's inputs are checked against numbers worked out by hand from TINY's shape, so a floor that drops the KV
term, counts the embedding table or mixes up units fails here, not silently in a GPU report."""

import pytest

from dspark.loadtest.sps import TINY, busy_us, sps_curve, write_sps

# TINY in bf16: per layer q/o 64x64, k/v 64x32, gate/up 64x128, down 128x64, two 64 norms, two 16 q/k norms;
# 2 layers + the final norm + the 512x64 LM head; the input embedding is read by row, so not counted.
TINY_WEIGHT_BYTES = 2 * (2 * (2 * 4096 + 2 * 2048 + 3 * 8192 + 2 * 64 + 2 * 16) + 64 + 512 * 64)
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 2  # K and V, 2 layers, 2 KV heads of 16, bf16


def test_sps_curve_reports_the_floor_it_defines(tmp_path):
    context, draft = 40, 3
    rows = sps_curve(TINY, "cpu", "torch", context=context, draft=draft, requests=(1, 4), repeats=2)
    steps, meta = rows[:-1], rows[-1]
    assert [r["batch_tokens"] for r in steps] == [4, 16] and [r["requests"] for r in steps] == [1, 4]
    assert meta["weight_gb"] * 1e9 == pytest.approx(TINY_WEIGHT_BYTES)
    bw = meta["copy_bandwidth_gb_s"] * 1e9
    assert bw > 1e8  # a copy on any machine that runs this moves more than 0.1 GB/s
    for r in steps:
        kv = r["requests"] * (context + draft + 1) * TINY_KV_BYTES_PER_TOKEN
        assert r["floor_ms"] == pytest.approx((TINY_WEIGHT_BYTES + kv) / bw * 1e3)
        assert r["floor_ratio"] == pytest.approx(r["step_ms"] / r["floor_ms"])
        assert r["sps"] == pytest.approx(1e3 / r["step_ms"])
        assert r["step_ms"] > 0
        assert r["bytes_to_host"] == 16 * r["requests"]  # accepted count and final token per request, int64
    md = tmp_path / "b.md"
    write_sps(str(md), rows, "cmd", "cpu", "torch", context, draft)
    text = md.read_text()
    assert "<!-- bench:sps-torch-ctx40 -->" in text and "<!-- /bench:sps-torch-ctx40 -->" in text
    row = steps[1]
    assert (f"| 4 | 16 | {row['step_ms']:.2f} | {row['sps']:.1f} | {row['floor_ms']:.2f} | {row['floor_ratio']:.2f}x | "
            f"64 | - | - |" in text)  # no profile on the CPU
    assert all(r["launches"] is None and r["gpu_busy"] is None for r in steps)


def test_busy_time_counts_overlapping_kernels_once():
    assert busy_us([]) == 0
    assert busy_us([(0, 10), (5, 12), (12, 13), (20, 25), (21, 22)]) == 18  # 0-13 and 20-25
