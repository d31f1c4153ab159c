"""The GPU pass (benchmarks/gpu_pass.py) cannot break unnoticed between GPU windows.

- its dry run: ``--device cpu --tiny`` runs every section (a few replicas and steps, the correctness
  tests against the CPU itself) and writes a JSON with each of them done and passed;
- its budget: a section past its cap is stopped, one that raises is recorded as failed, one the budget
  has no room for is skipped, each with its reason, and the others still run (in this process, with
  stand-in sections);
- its hard stop: at the deadline the watchdog writes what the pass has and exits with status 2;
- it refuses to replace its output without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_pass.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_pass  # noqa: E402

SECTION_NAMES = [name for name, _, _ in gpu_pass.SECTIONS]


def run_pass(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != gpu_pass.T0_VARIABLE}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
    print(
        f"gpu_pass.py {' '.join(arguments)}: {time.perf_counter() - started:.1f} s, exit {result.returncode}"
    )
    return result


def test_dry_run_runs_every_section_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_pass.json"
    result = run_pass("--device", "cpu", "--tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads(out.read_text())
    sections = record["sections"]
    assert list(sections) == SECTION_NAMES
    for name, section in sections.items():
        assert section["status"] == "done" and section["passed"] is not False, (name, section)
    assert record["machine"]["device_name"].startswith("CPU") and record["machine"]["versions"]["ggnd-plugin"]

    tests = sections["correctness"]["results"]["tests"]
    assert len(tests) == 8 and all(t["outcome"] == "passed" and t["passed"] for t in tests.values())
    stability = sections["batched_stability"]["results"]
    for run in ("one_batch", "autobatch", "one_replica_at_a_time"):
        assert stability[run]["replica_steps_per_s"] > 0 and stability[run]["replicas"] >= 2
    assert stability["cpu_committed"]["replica_steps_per_s"] > 0
    rows = sections["table5"]["results"]["rows"]
    assert {r["host"] for r in rows if not r["compiled"]} == {"mace", "nequip", "schnetpack"}
    assert all(r["ratio_md_time"] > 0 for r in rows) and any(r["compiled"] for r in rows)
    assert all(r["forces_compiled_vs_eager"]["max_rel"] < 1e-9 for r in rows if r["compiled"])
    block = sections["block"]["results"]["rows"]
    assert {r["mode"] for r in block} == {"dense", "chunked"} and all(r["median_s"] > 0 for r in block)
    nccl = sections["nccl"]["results"]["world_size_1"]
    assert nccl["against_one_process"]["same_outcomes"] and nccl["collectives"][0]["backend"] == "gloo"

    table = out.with_suffix(".md").read_text()
    assert "| nccl | done |" in table and "## Table 5 on the device" in table
    assert str(ROOT) not in out.read_text()  # results name no absolute paths of this machine


def fake_pass(tmp_path, budget_s: float) -> gpu_pass.Pass:
    args = argparse.Namespace(
        device="cpu",
        tiny=True,
        budget_s=budget_s,
        out=tmp_path / "gpu_pass.json",
        sections=SECTION_NAMES,
        stall_in=None,
    )
    return gpu_pass.Pass(args, time.time())


def test_sections_are_capped_failures_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    caps = [(name, 1.0, 0.0) for name in SECTION_NAMES[:-1]] + [(SECTION_NAMES[-1], 1.0, 1e6)]
    monkeypatch.setattr(gpu_pass, "SECTIONS", tuple(caps))
    monkeypatch.setattr(gpu_pass, "RESERVE_S", 0.0)

    def hangs(run, clock):
        run.put("correctness", "before", 1)
        while True:
            time.sleep(0.05)

    def raises(run, clock):
        raise ValueError("broken section")

    def compile_interrupted(run, clock):  # TorchDynamo re-raises the alarm as its own error
        try:
            while True:
                time.sleep(0.05)
        except gpu_pass.SectionCapReached as cap:
            error = RuntimeError("BackendCompilerFailed: backend='inductor' raised SectionCapReached")
            error.inner_exception = cap
            raise error from None

    functions = {
        "correctness": hangs,
        "batched_stability": compile_interrupted,
        "table5": raises,
        "block": lambda run, clock: True,
        "nccl": lambda run, clock: True,
    }
    run = fake_pass(tmp_path, budget_s=60)
    previous = gpu_pass.signal.signal(gpu_pass.signal.SIGALRM, gpu_pass._cap_reached)
    try:
        status = gpu_pass.run_sections(run, functions)
    finally:
        gpu_pass.signal.signal(gpu_pass.signal.SIGALRM, previous)
    assert status == 1  # table5 failed
    record = json.loads(run.args.out.read_text())["sections"]
    assert record["correctness"]["status"] == "stopped" and "cap" in record["correctness"]["reason"]
    assert record["correctness"]["results"] == {"before": 1}  # what it had is kept
    assert record["batched_stability"]["status"] == "stopped"  # not "failed": the cap, inside a compile
    assert (
        record["table5"]["status"] == "failed" and "ValueError: broken section" in record["table5"]["reason"]
    )
    assert record["block"] == {**record["block"], "status": "done", "passed": True}
    assert record["nccl"]["status"] == "skipped" and record["nccl"]["reason"].startswith("budget")
    assert "| nccl | skipped (budget" in run.args.out.with_suffix(".md").read_text()


def test_the_deadline_stops_the_pass_and_writes_what_it_has(tmp_path):
    out = tmp_path / "gpu_pass.json"
    result = run_pass("--device", "cpu", "--tiny", "--out", str(out), "--budget-s", "0", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["hard_stop"] == "deadline reached"
    assert all(s["status"] in ("skipped", "stopped") for s in record["sections"].values())
    assert "deadline reached" in out.with_suffix(".md").read_text()


def test_an_existing_result_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "gpu_pass.json"
    out.write_text("{}")
    result = run_pass("--device", "cpu", "--tiny", "--out", str(out), timeout=60)
    assert result.returncode == 2 and "pass --overwrite to replace it" in result.stderr
    assert out.read_text() == "{}"


@pytest.mark.parametrize("tiny", [True, False])
def test_section_sizes_fit_their_purpose(tiny):
    import gpu_pass_sections

    size = gpu_pass_sections.sizes(tiny)
    if tiny:  # the dry run: a few replicas and steps
        assert size.stability_replicas <= 4 and max(size.table5_replicas) <= 2
    else:  # the pass: hundreds of replicas, table 5 at 1, 64, 512, the block to 3,000 atoms
        assert size.stability_replicas >= 256 and size.table5_replicas == (1, 64, 512)
        assert max(per for _, per in size.block_cases) == 3000 and size.autobatch_max_atoms is None
    assert gpu_pass.DEFAULT_BUDGET_S + gpu_pass.RESERVE_S <= 480  # the 8 minutes of a device window
