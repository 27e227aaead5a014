"""Link calibration: the least-squares fit, and a real 2-process gloo run (slow)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from placer.calibrate import calibrate_cluster, fit_link


def test_fit_recovers_latency_and_bandwidth():
    sizes = [1_000, 100_000, 1_000_000, 10_000_000]
    one_way = [50e-6 + s / 2e9 for s in sizes]  # 50 us + 2 GB/s
    lat, bw, r2 = fit_link(sizes, one_way)
    assert lat == pytest.approx(50e-6) and bw == pytest.approx(2e9) and r2 == pytest.approx(1.0)


def test_fit_clamps_to_a_valid_link():
    lat, bw, _ = fit_link([1_000, 2_000], [2e-3, 1e-3])  # noisy: time falls with size
    assert lat >= 0 and bw > 0
    lat, _, _ = fit_link([1_000, 1_000_000], [0.0, 1e-3])  # would give a negative intercept
    assert lat == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 devices"):
        calibrate_cluster(1)
    with pytest.raises(ValueError, match="two distinct"):
        calibrate_cluster(2, sizes_bytes=[1024])


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_two_gloo_workers():
    t0 = time.monotonic()
    c = calibrate_cluster(2, sizes_bytes=(1 << 10, 1 << 20, 1 << 22), repeats=5, matmul_n=128, matmul_iters=5,
                          timeout_s=60)
    assert time.monotonic() - t0 < 30
    assert c.device_names == ("cpu:0", "cpu:1")
    assert c.latency_s[0, 1] > 0 and c.latency_s[0, 1] == c.latency_s[1, 0] and c.latency_s[0, 1] < 0.05
    assert c.bandwidth_Bps[0, 1] > 1e6
    assert all(d.speed > 0 for d in c.devices)
    assert c.meta["source"] == "calibrated" and "0-1" in c.meta["one_way_median_s"]
    assert not multiprocessing.active_children()
