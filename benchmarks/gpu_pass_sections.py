"""The five sections of the GPU pass (benchmarks/gpu_pass.py), each ``section(run, clock) -> passed``.

A section stores its figures with ``run.put`` as it goes (a hard stop keeps them), checks ``clock``
before each sub-step and records the sub-steps it did not start as skipped ("budget"). ``passed`` is
False when a check failed, None for a section with nothing to check. Sizes come from :func:`sizes`:
the pass's on a GPU, a few replicas and steps for the CPU dry run (``--tiny``).

Measurement code is imported from the other benchmarks, not copied: ``ggnd_overhead`` (the MD step
of table 5, the small host models), ``block_scaling`` (the block's inputs and one evaluation),
``gpu_checks`` (perturbed GGND readouts).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
MODEL = BENCHMARKS / "inputs" / "mace_ggnd_3bpa_small.model"
MODEL_RECORD = MODEL.with_suffix(".json")
CPU_THROUGHPUT = BENCHMARKS / "results" / "replica_throughput.json"
HOSTS = ("mace", "nequip", "schnetpack")
TEMPERATURES = (300.0, 600.0)
PROBE_PREFIX = "GGND_PROBE "


@dataclass(frozen=True)
class Sizes:
    stability_replicas: int  # over both temperatures
    stability_time_ps: float
    sequential_replicas: int
    cpu_replicas: int
    cpu_time_ps: float
    autobatch_max_atoms: int | None  # None: TorchSim measures the device (CUDA)
    table5_replicas: tuple[int, ...]
    table5_steps: int
    table5_compiled_hosts: tuple[str, ...]
    block_cases: tuple[tuple[int, int], ...]  # (systems, atoms per system)
    block_repeats: int
    nccl_replicas: int  # per temperature
    nccl_time_ps: float


def sizes(tiny: bool) -> Sizes:
    if tiny:
        return Sizes(4, 0.003, 2, 2, 0.002, 54, (2,), 2, ("mace",), ((1, 27), (1, 64), (4, 27)), 1, 1, 0.003)
    single = tuple((1, n) for n in (27, 100, 300, 1000, 3000))
    return Sizes(512, 0.2, 4, 8, 0.02, None, (1, 64, 512), 10, HOSTS, (*single, (64, 27)), 5, 16, 0.1)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_start(device: str) -> int | None:
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_mib(device: str, baseline: int | None) -> float | None:
    import torch

    if baseline is None:
        return None  # the CPU has no allocator statistics; ggnd_overhead.py measures it in fresh processes
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - baseline) / 2**20, 1)


def stall(run) -> None:
    """Hang (tests of the hard stop: the watchdog must end the pass)."""
    run.say("stalling on purpose (--stall-in)")
    while True:
        time.sleep(1)


# --------------------------------------------------------------------------------------------------
# 1. correctness: tests/test_gpu_checks.py in a subprocess
# --------------------------------------------------------------------------------------------------
def correctness(run, clock) -> bool:
    records_file = run.work / "checks.jsonl"
    env = dict(os.environ, GGND_CHECK_DEVICE=run.args.device, GGND_CHECK_RECORDS=str(records_file))
    if run.args.tiny:
        env["GGND_CHECK_TINY"] = "1"
    command = [sys.executable, "-m", "pytest", "tests/test_gpu_checks.py", "-m", "cuda", "-q", "-rA"]
    command += ["-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
    status, output = run.run_child(command, clock.left(), env)
    outcomes = {}
    for line in output.splitlines():
        words = line.split(" ", 1)
        if len(words) == 2 and words[0] in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            outcomes[words[1].split(" - ")[0].strip()] = words[0].lower()
    tests = {}
    if records_file.exists():
        for line in records_file.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of a test stopped while writing it
                continue
            tests[entry["test"]] = {"outcome": outcomes.get(entry["test"], "unknown"), **entry["record"]}
    for test, outcome in outcomes.items():
        tests.setdefault(test, {"outcome": outcome})
    run.put("correctness", "tests", tests)
    run.put("correctness", "pytest_exit_status", status)
    run.put("correctness", "pytest_output_tail", output[-1500:])
    if status is None:
        run.put(
            "correctness", "stopped", "the test run reached the section cap; records of finished tests kept"
        )
    counts = {kind: sum(1 for t in tests.values() if t["outcome"] == kind) for kind in ("passed", "failed")}
    run.put("correctness", "counts", counts)
    return status == 0 and counts["passed"] > 0 and all(t.get("passed", True) for t in tests.values())


# --------------------------------------------------------------------------------------------------
# 2. batched stability with the shipped MACE+GGND model
# --------------------------------------------------------------------------------------------------
def _stability_run(model, device: str, replicas: int, time_ps: float, batching) -> dict[str, Any]:
    from ggnd_plugin.data import read_structures
    from ggnd_plugin.default_data import default_data_path
    from ggnd_plugin.md.stability import StabilityProtocol, run_stability

    start = read_structures(default_data_path("3bpa_300K_test"))
    reference = read_structures(default_data_path("3bpa_300K_train"))
    protocol = StabilityProtocol(
        temperatures=TEMPERATURES, replicas=max(1, replicas // len(TEMPERATURES)), time_ps=time_ps, seed=0
    )
    baseline = _peak_start(device)
    result = run_stability(
        {"mace_ggnd": model}, start, reference, protocol, progress=False, batching=batching
    )
    steps, seconds = result.execution["replica_steps"], result.execution["seconds"]
    failed = {
        f"{t:g}": sum(r["failed"] for r in result.rows if r["temperature_K"] == t) for t in TEMPERATURES
    }
    return {
        "replicas": len(result.rows),
        "md_steps": round(time_ps * 1000 / protocol.timestep_fs),
        "batching": result.execution["batching"],
        "max_batch_atoms": result.execution["max_batch_atoms"],
        "replica_steps": steps,
        "wall_s": round(seconds, 3),
        "replica_steps_per_s": round(steps / seconds, 1),
        "failed_by_temperature_K": failed,
        "median_stability_ps": statistics.median(r["stability_ps"] for r in result.rows),
        "peak_mib": _peak_mib(device, baseline),
    }


def _committed_cpu_figure() -> dict[str, Any]:
    record = json.loads(CPU_THROUGHPUT.read_text())
    rows = [r for r in record["results"] if r["model"] == "MACE+GGND"]
    best = max(rows, key=lambda r: r["torchsim_replica_steps_per_s"])
    return {
        "replica_steps_per_s": best["torchsim_replica_steps_per_s"],
        "replicas": best["replicas"],
        "source": "benchmarks/results/replica_throughput.json, row 'MACE+GGND' with the highest TorchSim rate",
        "model": record["host_model"] + " + GGNDConfig(); not the model of this section",
        "threads": record["torch_threads"],
        "timed_steps": record["timed_steps"],
    }


def batched_stability(run, clock) -> bool | None:
    import torch

    from ggnd_plugin.md.stability import Batching
    from ggnd_plugin.registry import get

    size, device = sizes(run.args.tiny), run.args.device
    adapter = get("mace")
    run.put("batched_stability", "model", {
        "file": str(MODEL.relative_to(ROOT)),
        "made_by": json.loads(MODEL_RECORD.read_text()) if MODEL_RECORD.exists() else "missing record",
        "dtype": "float64",
        "system": "3BPA (27 atoms), start frames 3bpa_300K_test.xyz, bonds from 3bpa_300K_train.xyz, NVE 1 fs, "
        f"{', '.join(f'{t:g}' for t in TEMPERATURES)} K, threshold 0.5 Å (ggnd stability's defaults)",
        "rates": "replica-steps per second of one run_stability call, set-up included (state building, first "
        "force call; with autobatching TorchSim's memory measurement)",
    })  # fmt: skip

    def model_on(where: str):
        return adapter.torchsim_model(adapter.load(MODEL, where), device=where, dtype=torch.float64)

    # The ratios' denominators before autobatching, whose memory probe can take the rest of the cap.
    plan = [
        ("one_batch", device, size.stability_replicas, size.stability_time_ps, Batching("off")),
        ("one_replica_at_a_time", device, size.sequential_replicas, size.stability_time_ps, Batching("binning", 27)),
        ("cpu_same_model", "cpu", size.cpu_replicas, size.cpu_time_ps, Batching("off")),
        ("autobatch", device, size.stability_replicas, size.stability_time_ps,
         Batching("in-flight", size.autobatch_max_atoms if not device.startswith("cuda") else None)),
    ]  # fmt: skip
    if not device.startswith("cuda"):  # the dry run: the device is the CPU already
        plan = [step for step in plan if step[0] != "cpu_same_model"]
    figures: dict[str, Any] = {"cpu_committed": _committed_cpu_figure()}
    run.put("batched_stability", "cpu_committed", figures["cpu_committed"])
    estimate = 5.0 if run.args.tiny else 20.0
    try:
        for name, where, replicas, time_ps, batching in plan:
            if not clock.allows(estimate):
                figures[name] = {"skipped": f"budget: {clock.left():.0f} s left of the section's cap"}
                run.put("batched_stability", name, figures[name])
                continue
            run.say(f"batched_stability: {name} ({replicas} replicas on {where})")
            figures[name] = _stability_run(model_on(where), where, replicas, time_ps, batching)
            run.put("batched_stability", name, figures[name])
            estimate = min(figures[name]["wall_s"], estimate * 3)
    finally:  # the ratios of what ran, even when the cap stops a run
        run.put("batched_stability", "ratios", _stability_ratios(figures))
    return None


def _stability_ratios(figures: dict[str, Any]) -> dict[str, float]:
    """One batch against one replica at a time and the CPU, autobatching against one batch."""

    def rate(name):
        return figures.get(name, {}).get("replica_steps_per_s")

    ratios: dict[str, float] = {}
    for label, other in (
        ("one_batch_over_one_replica_at_a_time", "one_replica_at_a_time"),
        ("one_batch_over_cpu_same_model", "cpu_same_model"),
        ("one_batch_over_cpu_committed", "cpu_committed"),
    ):
        if rate("one_batch") and rate(other):
            ratios[label] = round(rate("one_batch") / rate(other), 2)
    if rate("autobatch") and rate("one_batch"):
        ratios["autobatch_over_one_batch"] = round(rate("autobatch") / rate("one_batch"), 2)
    return ratios


# --------------------------------------------------------------------------------------------------
# 3. table 5: MD step and peak memory, host + GGND over host
# --------------------------------------------------------------------------------------------------
def _torchsim_model(adapter, model, device: str, compiled: bool):
    import torch

    from ggnd_plugin.block_compile import compile_blocks

    if compiled:  # TorchSim's wrappers of NequIP and SchNetPack share the model: compile a copy only
        model = copy.deepcopy(model)
    ts_model = adapter.torchsim_model(model, device, torch.float64)
    if compiled:
        compile_blocks(ts_model)
    return ts_model


def _force_call_peak(ts_model, frames, device: str) -> tuple[float | None, Any]:
    """Peak MiB of one force call of ``ts_model`` on ``frames`` (after a warm-up call), and the forces."""
    import torch
    import torch_sim as ts

    state = ts.io.atoms_to_state(frames, torch.device(device), torch.float64)
    ts_model(state)
    baseline = _peak_start(device)
    forces = ts_model(state)["forces"].detach()
    return _peak_mib(device, baseline), forces


def table5(run, clock) -> bool | None:
    import torch
    from ggnd_overhead import PACKAGE_FRAMES, md_step_seconds, small_host_model
    from gpu_checks import difference, perturb_ggnd

    from ggnd_plugin.block import GGNDConfig
    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.registry import get

    size, device = sizes(run.args.tiny), run.args.device
    frames = read_labelled(PACKAGE_FRAMES)
    run.put("table5", "method", {
        "models": "random host models of the adapters' 'small' size (ggnd_overhead.small_host_model), float64, "
        "with and without the default GGND block (GGNDConfig(), version 2; readouts perturbed, std 0.01)",
        "md_step": "ggnd_overhead.md_step_seconds: batched NVE in run_stability at 300 K, seconds per step "
        f"from the difference of a 2- and a {2 + size.table5_steps}-step run after a warm-up run",
        "peak_memory": "torch.cuda.max_memory_allocated rise over one force call of the TorchSim model "
        "(after a warm-up call); not measured on the CPU",
        "compiled": "compile_blocks on the TorchSim model (TorchInductor unless GGND_COMPILE_BACKEND says "
        "otherwise); compilation happens in the warm-up run",
    })  # fmt: skip
    rows: list[dict[str, Any]] = []
    # Eager first for every host and size (the table itself), then compiled: compiling is the slow part.
    plan = [(host, n, False) for host in HOSTS for n in size.table5_replicas]
    plan += [(host, n, True) for host in size.table5_compiled_hosts for n in size.table5_replicas]
    models: dict[str, tuple] = {}
    estimate = 5.0 if run.args.tiny else 10.0
    for host, replicas, compiled in plan:
        label = f"{host} x{replicas}" + (" compiled" if compiled else "")
        if not clock.allows(estimate * (3 if compiled and replicas == size.table5_replicas[0] else 1)):
            rows.append({"host": host, "replicas": replicas, "compiled": compiled, "skipped": "budget"})
            run.put("table5", "rows", rows)
            continue
        try:
            run.say(f"table5: {label}")
            began = time.time()
            if host not in models:
                adapter = get(host)
                base = small_host_model(host).to(device)
                torch.manual_seed(1)
                ggnd = perturb_ggnd(adapter.attach(base, GGNDConfig()), seed=1, std=0.01).to(device)
                # one TorchSim model per variant for every size, so the compiled one compiles once per shape kind
                models[host] = {
                    "adapter": adapter,
                    "ggnd model": ggnd,
                    "host": _torchsim_model(adapter, base, device, False),
                    "ggnd": _torchsim_model(adapter, ggnd, device, False),
                }
            variants = models[host]
            if compiled and "ggnd compiled" not in variants:
                torch._dynamo.reset()  # the previous host's graphs count against the recompilation limit
                variants["ggnd compiled"] = _torchsim_model(
                    variants["adapter"], variants["ggnd model"], device, True
                )
            start = [frames[i % len(frames)] for i in range(replicas)]  # 512 replicas from 250 frames
            row: dict[str, Any] = {"host": host, "replicas": replicas, "compiled": compiled}

            def step_seconds(names, start=start, replicas=replicas, variants=variants):
                prepared = [variants[name] for name in names]
                return md_step_seconds(
                    None,
                    None,
                    start,
                    frames,
                    device,
                    "float64",
                    replicas,
                    size.table5_steps,
                    ts_models=prepared,
                )

            if not compiled:
                host_s, ggnd_s = step_seconds(["host", "ggnd"])
                row.update(
                    host_md_step_ms=host_s * 1e3, ggnd_md_step_ms=ggnd_s * 1e3, ratio_md_time=ggnd_s / host_s
                )
                host_peak, _ = _force_call_peak(variants["host"], start, device)
                ggnd_peak, _ = _force_call_peak(variants["ggnd"], start, device)
                row.update(host_peak_mib=host_peak, ggnd_peak_mib=ggnd_peak)
                row["ratio_memory"] = ggnd_peak / host_peak if host_peak and ggnd_peak else None
            else:
                (compiled_s,) = step_seconds(["ggnd compiled"])
                eager = next(
                    (
                        r
                        for r in rows
                        if r["host"] == host and r["replicas"] == replicas and not r["compiled"]
                    ),
                    {},
                )
                row["ggnd_compiled_md_step_ms"] = compiled_s * 1e3
                if eager.get("host_md_step_ms"):
                    row["ratio_md_time"] = compiled_s * 1e3 / eager["host_md_step_ms"]
                    row["speedup_over_eager_ggnd"] = eager["ggnd_md_step_ms"] / (compiled_s * 1e3)
                peak, forces = _force_call_peak(variants["ggnd compiled"], start, device)
                _, reference = _force_call_peak(variants["ggnd"], start, device)
                row["ggnd_compiled_peak_mib"] = peak
                row["forces_compiled_vs_eager"] = difference(forces, reference)
            row["wall_s"] = round(time.time() - began, 1)
            estimate = max(row["wall_s"], 1.0)
            rows.append(row)
            run.put("table5", "rows", rows)
        except Exception as error:  # one host's failure must not lose the other hosts' rows
            if clock.left() <= 0:  # the cap, arriving wrapped (torch.compile re-raises it as its own)
                raise
            rows.append(
                {
                    "host": host,
                    "replicas": replicas,
                    "compiled": compiled,
                    "error": f"{type(error).__name__}: {error}"[:500],
                }
            )
            run.put("table5", "rows", rows)
    return False if any("error" in row for row in rows) else None


# --------------------------------------------------------------------------------------------------
# 4. the block alone
# --------------------------------------------------------------------------------------------------
def block_alone(run, clock) -> bool | None:
    import torch
    from block_scaling import CHUNK_SIZE, block_energy_and_forces, case_block, case_inputs

    size, device = sizes(run.args.tiny), run.args.device
    run.put("block", "method", {
        "block": "GGNDBlock, GGNDConfig() (version 2) but chunk_size, float32, random host features 32x0e+32x1o "
        "(block_scaling.py's cases: molecule-like blobs, the same inputs for the same N)",
        "time": f"median of {size.block_repeats} evaluations (pair table, energies, forces) after a warm-up",
        "peak_memory": "torch.cuda.max_memory_allocated rise over one evaluation; not measured on the CPU",
    })  # fmt: skip
    cases = sorted(
        ((mode, systems, per) for mode in ("dense", "chunked") for systems, per in size.block_cases),
        key=lambda c: (c[1] * c[2] * c[2], c[0]),
    )
    rows: list[dict[str, Any]] = []
    seconds_per_pair: dict[str, float] = {}
    peak_per_pair: dict[str, float] = {}
    for mode, systems, per in cases:
        n_atoms, pairs = systems * per, systems * per * per
        row: dict[str, Any] = {"mode": mode, "systems": systems, "atoms_per_system": per, "pairs": pairs}
        rows.append(row)
        guess = seconds_per_pair.get(mode, 0.0) * pairs * (2 + size.block_repeats)
        if not clock.allows(max(guess, 2.0)):
            row["skipped"] = f"budget: about {guess:.0f} s needed, {clock.left():.0f} s left"
            run.put("block", "rows", rows)
            continue
        if device.startswith("cuda") and mode in peak_per_pair:
            predicted = peak_per_pair[mode] * pairs
            free = torch.cuda.mem_get_info()[0]
            if predicted > 0.8 * free:
                row["skipped"] = f"predicted {predicted / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
                run.put("block", "rows", rows)
                continue
        run.say(f"block: {mode} {systems} x {per}")
        generator = torch.Generator().manual_seed(n_atoms * 1000 + systems)  # block_scaling's seed
        inputs = case_inputs(n_atoms, systems, generator)
        block = case_block(None if mode == "dense" else CHUNK_SIZE, 2, generator).to(device)
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        try:
            baseline = _peak_start(device)
            began = time.perf_counter()
            block_energy_and_forces(block, inputs)
            _sync(device)
            row["warm_up_s"] = time.perf_counter() - began
            row["peak_mib"] = _peak_mib(device, baseline)
            times = []
            for _ in range(size.block_repeats):
                began = time.perf_counter()
                block_energy_and_forces(block, inputs)
                _sync(device)
                times.append(time.perf_counter() - began)
            row.update(median_s=statistics.median(times), min_s=min(times), max_s=max(times))
            seconds_per_pair[mode] = row["median_s"] / pairs
            if row["peak_mib"]:
                peak_per_pair[mode] = row["peak_mib"] * 2**20 / pairs
        except torch.OutOfMemoryError as error:
            row["skipped"] = f"out of device memory: {str(error).splitlines()[0][:160]}"
        finally:
            del block, inputs
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        run.put("block", "rows", rows)
    return None


# --------------------------------------------------------------------------------------------------
# 5. nccl: ggnd stability under torchrun against one process
# --------------------------------------------------------------------------------------------------
def stability_arguments(device: str, size: Sizes) -> list[str]:
    from ggnd_plugin.default_data import default_data_path

    arguments = ["stability", str(MODEL), "--start", str(default_data_path("3bpa_300K_test"))]
    arguments += ["--reference", str(default_data_path("3bpa_300K_train"))]
    arguments += ["--temperature", *(f"{t:g}" for t in TEMPERATURES), "--replicas", str(size.nccl_replicas)]
    arguments += ["--time-ps", f"{size.nccl_time_ps:g}", "--device", device, "--seed", "0"]
    return [*arguments, "--no-plots", "--no-progress"]


def compare_runs(single: Path, sharded: Path) -> dict[str, Any]:
    """Replica rows of two ``ggnd stability`` outputs: identical, same outcomes, largest numeric difference."""

    def rows(folder):
        record = json.loads((folder / "results.json").read_text())
        return sorted(record["replicas"], key=lambda r: (r["model"], r["temperature_K"], r["replica"]))

    a, b = rows(single), rows(sharded)
    same_outcomes = len(a) == len(b) and all(
        (x["model"], x["temperature_K"], x["replica"], x["failed"], x.get("failure_step"))
        == (y["model"], y["temperature_K"], y["replica"], y["failed"], y.get("failure_step"))
        for x, y in zip(a, b, strict=False)
    )
    worst = 0.0
    for x, y in zip(a, b, strict=False):
        for key, value in x.items():
            other = y.get(key)
            if isinstance(value, float) and isinstance(other, float) and value == value and other == other:
                worst = max(worst, abs(value - other) / max(abs(value), 1e-300))
    return {"replicas": len(a), "identical": a == b, "same_outcomes": same_outcomes, "max_rel_numeric": worst}


def nccl(run, clock) -> bool:
    import torch

    from ggnd_plugin.cli import main as ggnd

    size, device = sizes(run.args.tiny), run.args.device
    arguments = stability_arguments(device, size)
    shown = [str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in arguments]
    run.put("nccl", "command", "ggnd " + " ".join(shown))
    run.say("nccl: one process")
    began = time.perf_counter()
    status = ggnd([*arguments, "--out", str(run.work / "single")])
    run.put(
        "nccl", "single_process", {"exit_status": status, "wall_s": round(time.perf_counter() - began, 1)}
    )
    if status != 0:
        return False
    world_sizes = [1] + ([2] if device.startswith("cuda") and torch.cuda.device_count() >= 2 else [])
    if len(world_sizes) == 1:
        run.put("nccl", "world_size_2", "not run: this machine has one GPU (nccl needs one GPU per rank)")
    passed = True
    for world in world_sizes:
        if not clock.allows(15.0):
            run.put("nccl", f"world_size_{world}", {"skipped": f"budget: {clock.left():.0f} s left"})
            continue
        run.say(f"nccl: torchrun, {world} rank(s)")
        out = run.work / f"ranks{world}"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(world),
        ]
        command += ["--", str(BENCHMARKS / "gpu_pass.py"), "--torchrun-child", *arguments, "--out", str(out)]
        began = time.perf_counter()
        status, output = run.run_child(command, clock.left(), env=dict(os.environ, OMP_NUM_THREADS="1"))
        record: dict[str, Any] = {"exit_status": status, "wall_s": round(time.perf_counter() - began, 1)}
        record["collectives"] = [
            json.loads(line.split(PROBE_PREFIX, 1)[1]) for line in output.splitlines() if PROBE_PREFIX in line
        ]
        if status == 0 and (out / "results.json").exists():
            record["against_one_process"] = compare_runs(run.work / "single", out)
            ok = record["against_one_process"]["same_outcomes"]
            ok = ok and len(record["collectives"]) == world and all(c["ok"] for c in record["collectives"])
        else:
            record["output_tail"] = output[-2000:]
            ok = False
        record["passed"] = ok
        passed = passed and ok
        run.put("nccl", f"world_size_{world}", record)
    if world_sizes == [1]:
        run.put("nccl", "note", "with WORLD_SIZE 1 ggnd stability runs as one process (ggnd_plugin.distributed "
                "joins a job only above one rank); the collectives probe initialised the backend itself")  # fmt: skip
    return passed


def torchrun_child(arguments: list[str]) -> int:
    """Inside torchrun: join the job with nccl (CUDA) or gloo, check the collectives ggnd uses, leave,
    then run ``ggnd ARGUMENTS`` (which joins again when there is more than one rank)."""
    import torch
    import torch.distributed as dist

    from ggnd_plugin.cli import main as ggnd

    device = arguments[arguments.index("--device") + 1] if "--device" in arguments else "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    where = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(where)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, device_id=where if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.full((4,), float(rank + 1), dtype=torch.float64, device=where)
    dist.all_reduce(value)
    message = [{"from": "rank 0"} if rank == 0 else None]
    dist.broadcast_object_list(message, src=0)
    dist.barrier()
    expected = world * (world + 1) / 2
    ok = bool((value == expected).all()) and message[0] == {"from": "rank 0"}
    probe = {"rank": rank, "world_size": world, "backend": backend, "device": str(where), "ok": ok}
    print(PROBE_PREFIX + json.dumps(probe), flush=True)
    dist.destroy_process_group()
    return ggnd(arguments)
