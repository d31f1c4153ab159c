"""`ggnd demo --quick`: the whole story at toy size, through the CLI as `make demo` runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mace")

# The whole demo end to end (MACE fits through the host's training command, fine-tuning, MD): the tests
# run it (issue 5) in `make test-slow`, with the other host training runs end to end.
pytestmark = pytest.mark.slow

MODELS = ("baseline", "ggnd-scratch", "ggnd-upgrade")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "ggnd_plugin.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, time.perf_counter() - started, result


def test_demo_writes_the_report_with_every_model_and_temperature(demo_run):
    out, _, result = demo_run
    report = (out / "report.md").read_text()
    summary = json.loads((out / "report.json").read_text())
    for name in MODELS:
        assert f"| {name} |" in report
        assert name in result.stdout  # the comparison table is printed
        for temperature in ("300K", "600K", "1200K"):
            metrics = summary["metrics"][name][temperature]
            assert math.isfinite(metrics["energy_mae"]) and metrics["energy_mae"] > 0
            assert math.isfinite(metrics["forces_mae"]) and metrics["forces_mae"] > 0
            assert metrics["n_frames"] == 10
    for image in ("survival.png", "max_bond_deviation.png"):
        assert (out / "stability" / image).stat().st_size > 1000
        assert f"stability/{image}" in report


def test_demo_stability_covers_models_temperatures_and_replicas(demo_run):
    out, _, _ = demo_run
    results = json.loads((out / "stability" / "results.json").read_text())
    rows = results["replicas"]
    assert {row["model"] for row in rows} == set(MODELS)
    assert {float(row["temperature_K"]) for row in rows} == {600.0, 1200.0}
    assert len(rows) == 3 * 2 * 2
    horizon = results["protocol"]["time_ps"]
    for row in rows:
        assert 0 < row["stability_ps"] <= horizon + 1e-9
        assert row["failed"] == (row["stability_ps"] < horizon - 1e-9)


def test_the_three_models_are_different_and_the_upgrade_contains_the_baseline(demo_run):
    import torch

    from ggnd_plugin.registry import get

    out, _, _ = demo_run
    adapter = get("mace")
    files = json.loads((out / "report.json").read_text())["models"]
    baseline = adapter.load(Path(files["baseline"]))
    scratch = adapter.load(Path(files["ggnd-scratch"]))
    upgrade = adapter.load(Path(files["ggnd-upgrade"]))
    assert adapter.ggnd_blocks(baseline) == []
    assert len(adapter.ggnd_blocks(scratch)) == 1 and len(adapter.ggnd_blocks(upgrade)) == 1
    # Fine-tuning trained the GGND readout away from its zero start.
    assert upgrade.ggnd.readout_state.weight.abs().max() > 0
    host_names = {name for name, _ in baseline.named_parameters()}
    upgraded_host = dict(upgrade.host.named_parameters())
    assert host_names == set(upgraded_host)
    assert any(not torch.equal(p, upgraded_host[name]) for name, p in baseline.named_parameters()), (
        "fine-tuning should move the host weights too (not frozen in the demo)"
    )


def test_a_second_run_reuses_every_stage(demo_run):
    out, first_seconds, _ = demo_run
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "ggnd_plugin.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fitting" not in result.stderr
    assert time.perf_counter() - started < first_seconds / 2
