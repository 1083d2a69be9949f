"""Smoke test of benchmarks/bandwidth_accuracy.py --quick: the harness runs end to end.

Checks that it works (outputs, columns, measured bytes, the rate cap holds), not speed. Needs
``unshare -n`` and ``tc`` (root): skipped with the reason otherwise.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bandwidth_accuracy.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bandwidth_accuracy as bw  # noqa: E402


def _netns_reason() -> str | None:
    ok, tc, why = bw.netns_support()
    return None if ok and tc else f"no rate-capped network namespace here: {why}"


def test_parse_rate():
    assert bw.parse_rate("200mbit") == 200e6
    assert bw.parse_rate("1gbit") == 1e9
    assert bw.parse_rate("uncapped") is None
    with pytest.raises(ValueError):
        bw.parse_rate("fast")


def test_torch_cost_model_matches_hand_count():
    import torch

    params = [torch.empty(1000, 64), torch.empty(1000), torch.empty(10, 1000), torch.empty(10)]
    numel = sum(p.numel() for p in params)
    assert bw.torch_model_bytes("fp32", params, 4) == pytest.approx(1.5 * 4 * numel)
    assert bw.torch_model_bytes("fp16_hook", params, 2) == pytest.approx(2 * numel)
    # rank 1: P and Q of both matrices ((1000 + 64) * 2 < 64000, (10 + 1000) * 2 < 10000); biases dense
    assert bw.torch_model_bytes("powersgd_r1", params, 2) == pytest.approx(4 * (1064 + 1000 + 1010 + 10))
    # rank 4: (10 + 1000) * 4 * 2 = 8080 < 10000, still compressed; rank 5 would not be
    assert bw.torch_model_bytes("powersgd_r4", params, 2) == pytest.approx(4 * (1064 * 4 + 1000 + 1010 * 4 + 10))
    assert bw.torch_model_bytes("powersgd_r5", params, 2) == pytest.approx(4 * (1064 * 5 + 1000 + 10000 + 10))


def test_our_cost_model_counts_both_phases_and_messages():
    bucket = {"numel": 1000, "collective": "two_phase", "payload_bytes": 400, "reduce_payload_bytes": 50,
              "messages": 12}
    both, phase1, messages = bw._our_model_bytes({"buckets": {0: bucket}}, 4)
    assert phase1 == pytest.approx(1.5 * 400)  # as if the reduced shard were S/N
    assert both == pytest.approx(0.75 * (400 + 4 * 50))  # (N-1)/N S + (N-1) R
    assert messages == 12
    gather = dict(bucket, collective="allgather", reduce_payload_bytes=None, messages=6)
    both, phase1, messages = bw._our_model_bytes({"buckets": {0: gather}}, 4)
    assert both == pytest.approx(3 * 400) and phase1 == pytest.approx(3 * 400) and messages == 6
    assert bw.wire_model_bytes(1000.0, 10, 300.0, 0.001) == pytest.approx(1001.0 + 3000.0)


@pytest.mark.timeout(900)
def test_quick_run(tmp_path):
    reason = _netns_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "bw"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output", str(out)],
                       capture_output=True, text=True, timeout=850, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ETA" in r.stdout  # per-run progress lines
    for name in ("bandwidth.csv", "bandwidth.md", "bandwidth.json", "accuracy_vs_bits.png",
                 "accuracy_vs_time.png", "runs.jsonl"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "bandwidth.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(bw.CSV_COLUMNS) <= set(rows[0])
    # quick: 4 methods x (200mbit, uncapped) x N=2 x 2 seeds
    assert len(rows) == len(bw.QUICK_METHODS) * 2 * 1 * 2
    assert {r["method"] for r in rows} == set(bw.QUICK_METHODS)
    assert {r["rate"] for r in rows} == {"200mbit", "uncapped"}
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert row["mode"] == "measured"
        assert float(row["bytes_per_rank_per_step"]) > 0
        assert 0 <= float(row["final_accuracy"]) <= 1
        assert float(row["step_p50_s"]) > 0
    capped = [r for r in rows if r["rate"] == "200mbit"]
    for row in capped:
        assert float(row["cap_payload_mbit"]) == pytest.approx(200, rel=0.2)
    uncapped = [r for r in rows if r["rate"] == "uncapped"]
    assert min(float(r["cap_payload_mbit"]) for r in uncapped) > 240  # the cap is really gone
    # fp32 moves the ring all-reduce's bytes; measured on the loopback within 5% of the model
    for row in rows:
        if row["method"] == "fp32":
            assert float(row["bytes_measured_over_model"]) == pytest.approx(1.0, abs=0.05)
    # gradcomp's codecs: measured within 5% of the wire-level model (payload + measured framing)
    for row in rows:
        assert 50 < float(row["framing_bytes_per_message"]) < 5000, row["framing_bytes_per_message"]
        if bw.METHODS[row["method"]].family == "ours":
            assert float(row["messages_per_rank_per_step"]) >= 1
            assert float(row["bytes_measured_over_wire_model"]) == pytest.approx(1.0, abs=0.05), row["method"]
    md = (out / "bandwidth.md").read_text()
    assert "## Figures" in md and "200 Mbit/s, N=2" in md and "CPU:" in md
