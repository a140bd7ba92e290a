"""A short soak in CI (the same mode runs for hours by hand): nothing lost, nothing leaked, answers unchanged."""

from dspark.loadtest.soak import run_soak


def test_soak_mixed_traffic(model_dir):
    from conftest import ServerProcess

    s = ServerProcess(model_dir, "--max-num-seqs", "8", "--num-kv-blocks", "64", "--block-size", "8")
    try:
        report = run_soak(s.url, seconds=12, users=6, pid=s.proc.pid)
    finally:
        s.stop()
    assert not report["problems"], report["problems"][:5]
    assert report["total"] >= 30 and all(report["requests"].get(k) for k in ("greedy", "bad", "drop", "abandon"))
    d = report["drained"]
    assert d["running"] == 0 and d["waiting"] == 0 and d["kv_free"] == d["kv_total"]
    assert report["rss_kib_after"] < 1.25 * report["rss_kib_before"]
