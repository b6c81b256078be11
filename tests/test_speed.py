"""Speed features: --round-to auto, bench, sweep, --target-macs/--target-latency.

No test here asserts on a time: timings only flow through to reports. Measured numbers live in
bench/RESULTS.md (bench/speed.py, bench/scaling.py, bench/memory.py).
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from onnxprune.cli.common import parse_round_to
from onnxprune.runtime import machine as hw
from onnxprune.runtime.session import cuda_available
from onnxprune.testing import from_text

# conv stack with channel counts that are not multiples of 8 or 16 after halving
ODD_CNN = """
<ir_version: 8, opset_import: ["" : 17]>
odd (float[1,3,16,16] x) => (float[1,10] y)
<float[40,3,3,3] w1, float[40] b1, float[56,40,3,3] w2, float[56] b2, float[10,56] wf, float[10] bf>
{
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
  r2 = Relu (c2)
  p = GlobalAveragePool (r2)
  f = Flatten (p)
  y = Gemm <transB=1> (f, wf, bf)
}
"""


def _cuda() -> bool:
    return cuda_available()


# ------------------------------------------------------------------------------------------------
# --round-to auto


def test_round_to_auto_follows_cpu_flags_and_provider():
    assert hw.nchwc_block(frozenset({"sse4_2", "avx2", "avx512f"}))[0] == 16
    assert hw.nchwc_block(frozenset({"sse4_2", "avx2", "fma"}))[0] == 8
    assert hw.nchwc_block(frozenset())[0] == 8
    value, why = hw.auto_round_to("cpu")
    assert value in (8, 16) and why
    assert value == (16 if "avx512f" in hw.cpu_flags() else 8)
    if _cuda():
        assert hw.auto_round_to("cuda")[0] == 8


def test_round_to_argument_parsing(run_main, tmp_path):
    assert parse_round_to("auto") == "auto" and parse_round_to("AUTO") == "auto"
    assert parse_round_to("16") == 16
    p = tmp_path / "m.onnx"
    onnx.save(from_text(ODD_CNN), str(p))
    r = run_main("prune", p, "-o", tmp_path / "o.onnx", "--round-to", "fast")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--round-to" in r.stderr


def _conv_out_channels(model: onnx.ModelProto) -> dict[str, int]:
    inits = {i.name: i for i in model.graph.initializer}
    return {n.name or n.output[0]: int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv"}


def test_round_to_auto_keeps_channel_multiples(run_main, tmp_path):
    p = tmp_path / "odd.onnx"
    onnx.save(from_text(ODD_CNN), str(p))
    out, rep = tmp_path / "pruned.onnx", tmp_path / "report.json"
    r = run_main("prune", p, "-o", out, "--ratio", "0.5", "--round-to", "auto", "--ep", "cpu", "--verify",
                 "--report", rep)
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    mult = report["plan"]["options"]["round_to"]
    assert mult in (8, 16)
    assert report["round_to"] == {"requested": "auto", "resolved": mult, "why": report["round_to"]["why"]}
    assert f"--round-to auto: {mult}" in r.stdout
    before, after = _conv_out_channels(onnx.load(str(p))), _conv_out_channels(onnx.load(str(out)))
    assert after != before
    for name, c in after.items():
        assert c % mult == 0, f"{name}: {c} channels, not a multiple of {mult}"
        assert c <= before[name]
    # 40 -> 20 kept, rounded up; 56 -> 28, rounded up
    assert sorted(after.values()) == sorted(math.ceil(c / 2 / mult) * mult for c in before.values())


def test_round_to_auto_on_resnet18(run_main, resnet18_onnx, tmp_path):
    out, rep = tmp_path / "pruned.onnx", tmp_path / "report.json"
    r = run_main("prune", resnet18_onnx, "-o", out, "--ratio", "0.3", "--round-to", "auto", "--ep", "cpu",
                 "--report", rep)
    assert r.returncode == 0, r.stderr
    mult = json.loads(rep.read_text())["plan"]["options"]["round_to"]
    assert mult in (8, 16)
    before, after = _conv_out_channels(onnx.load(str(resnet18_onnx))), _conv_out_channels(onnx.load(str(out)))
    pruned = [n for n in after if after[n] < before[n]]
    assert pruned
    for name, c in after.items():
        assert c % mult == 0 or c == before[name], f"{name}: {c} channels"


# ------------------------------------------------------------------------------------------------
# bench


def test_bench_cuda_missing_fails_loudly(run_cli, tmp_path):
    if _cuda():
        pytest.skip("CUDAExecutionProvider is available here")
    p = tmp_path / "m.onnx"
    onnx.save(from_text(ODD_CNN), str(p))
    r = run_cli("bench", p, "--ep", "cuda")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "CUDA" in lines[0] and lines[0].startswith("onnxprune: error:")


def test_bench_pair_reports_provider_macs_and_speedup(run_main, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(from_text(ODD_CNN.replace("float[1,3,16,16] x", "float[N,3,16,16] x")
                        .replace("float[1,10] y", "float[N,10] y")), str(p))
    out = tmp_path / "pruned.onnx"
    assert run_main("prune", p, "-o", out, "--ratio", "0.5").returncode == 0
    rep = tmp_path / "bench.json"
    r = run_main("bench", p, out, "--ep", "cpu", "--threads", "1", "--batch", "2", "--warmup", "1",
                 "--repeat", "3", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert "execution provider: CPU (CPUExecutionProvider" in r.stdout
    assert "speedup:" in r.stdout and "MACs" in r.stdout
    data = json.loads(rep.read_text())
    assert data["ep"] == "cpu" and data["batch"] == 2
    assert [lat["runs"] for lat in data["latency"]] == [3, 3]
    m0, m1 = (s["macs"] for s in data["stats"])
    assert m0 > m1 > 0 and data["mac_ratio"] == pytest.approx(m0 / m1)
    # MACs at the benchmarked input: batch 2
    assert m0 == 2 * (16 * 16 * 40 * 27 + 16 * 16 * 56 * 40 * 9 + 10 * 56)


class _FakeRunner:
    """A CPU runner that records its index in ``log`` at every run and takes 1 ms."""

    ep, providers = "cpu", ["CPUExecutionProvider"]

    def __init__(self, i: int, log: list, batch: int = 1):
        self.i, self.log, self.feeds = i, log, {"x": np.zeros((batch, 3))}

    def __call__(self) -> float:
        self.log.append(self.i)
        return 0.001


def test_interleaving_rotates_the_order():
    from onnxprune.measure.latency import measure_runners

    calls: list = []
    lats = measure_runners([_FakeRunner(0, calls, 4), _FakeRunner(1, calls, 4)], warmup=0, repeat=8, block=1)
    assert [lat.runs for lat in lats] == [8, 8] and lats[0].batch == 4
    rounds = [tuple(calls[k:k + 2]) for k in range(0, len(calls), 2)]
    assert rounds.count((0, 1)) == rounds.count((1, 0)) == 4  # each goes first equally often
    # blocks: 3 runs per model per round, the first (cache re-warming) not recorded
    calls.clear()
    lats = measure_runners([_FakeRunner(0, calls, 4), _FakeRunner(1, calls, 4)], warmup=0, repeat=8, block=3)
    assert [lat.runs for lat in lats] == [8, 8]
    assert calls == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_a_cpu_session_waits_before_its_block_when_another_ran_last(monkeypatch):
    """Other sessions' spinning worker threads: a pause before each block that switches runner, none
    within a block or when the same runner goes on (round boundaries), none for one runner alone."""
    from onnxprune.measure import latency as lat_mod

    events: list = []
    monkeypatch.setattr(lat_mod.time, "sleep", lambda s: events.append(("sleep", s)))
    lat_mod.measure_runners([_FakeRunner(0, events), _FakeRunner(1, events)], warmup=0, repeat=4, block=3)
    # round 1 runs 0 then 1, round 2 (reversed) 1 then 0: a pause before each block whose runner is not
    # the one that ran just before it
    assert events == [0, 0, 0, ("sleep", lat_mod.SWITCH_PAUSE_S), 1, 1, 1, 1, 1, 1,
                      ("sleep", lat_mod.SWITCH_PAUSE_S), 0, 0, 0]
    events.clear()
    lat_mod.measure_runners([_FakeRunner(0, events)], warmup=0, repeat=4, block=3)
    assert ("sleep", lat_mod.SWITCH_PAUSE_S) not in events


@pytest.mark.gpu
def test_bench_cuda_runs_on_cuda(run_cli, resnet18_onnx):
    if not _cuda():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (needs onnxruntime-gpu and an NVIDIA GPU)")
    r = run_cli("bench", resnet18_onnx, "--ep", "cuda", "--batch", "8", "--warmup", "2", "--repeat", "5")
    assert r.returncode == 0, r.stderr
    assert "execution provider: CUDA (CUDAExecutionProvider" in r.stdout


# ------------------------------------------------------------------------------------------------
# sweep


def test_parse_ratios():
    from onnxprune.cli.common import parse_ratios
    from onnxprune.errors import UserError

    assert parse_ratios("0,0.1,...,0.9") == pytest.approx([i / 10 for i in range(10)])
    assert parse_ratios("0.5,0,0.25") == [0, 0.25, 0.5]
    for bad in ("0,1", "a,b", "0,...,0.5", ""):
        with pytest.raises(UserError):
            parse_ratios(bad)


def test_sweep_writes_plot_and_report(run_main, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install 'onnxprune[bench]')")
    p = tmp_path / "odd.onnx"
    onnx.save(from_text(ODD_CNN), str(p))
    png, rep = tmp_path / "sweep.png", tmp_path / "sweep.json"
    r = run_main("sweep", p, "--ratios", "0,0.25,...,0.75", "--ep", "cpu", "--threads", "1", "--warmup", "1",
                 "--repeat", "3", "--plot", png, "--report", rep)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(rep.read_text())
    rows = data["rows"]
    assert [row["ratio"] for row in rows] == [0, 0.25, 0.5, 0.75]
    macs = [row["macs"] for row in rows]
    assert all(a >= b for a, b in zip(macs, macs[1:], strict=False)) and macs[-1] < macs[0]
    for row in rows:
        for key in ("params", "latency_ms", "original_ms", "speedup", "rel_error_generated", "mac_ratio"):
            assert key in row
    assert rows[0]["rel_error_generated"] == 0.0
    assert data["machine"]["nchwc_block"] in (8, 16)


# ------------------------------------------------------------------------------------------------
# targets


def test_target_macs_half_on_resnet18(run_main, resnet18_onnx, tmp_path):
    out, rep = tmp_path / "pruned.onnx", tmp_path / "report.json"
    r = run_main("prune", resnet18_onnx, "-o", out, "--target-macs", "0.5", "--ep", "cpu", "--report", rep)
    assert r.returncode == 0, r.stderr
    data = json.loads(rep.read_text())
    frac = data["stats"]["pruned"]["macs"] / data["stats"]["original"]["macs"]
    assert 0.5 * 0.97 <= frac <= 0.5, frac
    assert data["target"]["chosen"]["mac_ratio"] == pytest.approx(frac)
    assert data["plan"]["options"]["ratio"] == data["target"]["ratio"]
    assert "target MACs <= 0.5x" in r.stdout


def test_target_unreachable_is_a_user_error(run_main, tmp_path):
    p = tmp_path / "odd.onnx"
    onnx.save(from_text(ODD_CNN), str(p))
    r = run_main("prune", p, "-o", tmp_path / "o.onnx", "--target-macs", "0.0001")
    assert r.returncode == 2 and "not reachable" in r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_target_latency_search_uses_cached_measurements(monkeypatch):
    """The latency search logic with a deterministic stand-in for the measurement."""
    from onnxprune import pipeline
    from onnxprune.measure.targets import RatioSearch
    from onnxprune.planning.options import PlanOptions

    an = pipeline.analyze_model(from_text(ODD_CNN))
    measured: list[float] = []

    def fake_measure(self, ev, pruned):
        measured.append(ev.ratio)
        ev.original_ms, ev.latency_ms = 10.0, 10.0 * (0.2 + 0.8 * ev.mac_ratio)

    monkeypatch.setattr(RatioSearch, "_measure", fake_measure)
    s = RatioSearch(an, PlanOptions(ratio=0.5), target_latency=0.6, ep="cpu")
    res = s.search()
    assert res.chosen.latency_ratio <= 0.6
    assert len(measured) == len(set(measured))  # every ratio measured at most once
    sigs = [e.signature for e in s.cache.values() if e.ratio in measured]
    assert len(sigs) == len(set(sigs))  # equal plans share one measurement
    # the chosen ratio is the smallest evaluated one meeting the target
    assert all(e.latency_ratio is None or e.latency_ratio > 0.6 or e.ratio >= res.ratio for e in s.cache.values())


def test_sweep_takes_prunes_plan_and_timing_groups(run_main, tmp_path):
    """sweep parses --round-to auto, --importance and the timing options with prune's groups."""
    p = tmp_path / "odd.onnx"
    onnx.save(from_text(ODD_CNN), str(p))
    rep = tmp_path / "sweep.json"
    r = run_main("sweep", p, "--ratios", "0,0.5", "--ep", "cpu", "--threads", "1", "--warmup", "1", "--repeat", "2",
                 "--round-to", "auto", "--importance", "l1", "--report", rep)
    assert r.returncode == 0, r.stderr
    data = json.loads(rep.read_text())
    assert data["round_to"] == hw.auto_round_to("cpu")[0] and data["importance"] == "l1"
    assert f"--round-to auto: {data['round_to']}" in r.stdout
    for bad in (["--round-to", "0"], ["--importance", "l3"], ["--ratio", "0.5"], ["--repeat", "0"]):
        r = run_main("sweep", p, "--ep", "cpu", *bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)
