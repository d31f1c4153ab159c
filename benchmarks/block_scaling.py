"""Time and peak memory of energy + forces through the GGND block alone, dense and chunked.

What is measured: one energy-and-forces evaluation of :class:`ggnd_plugin.block.GGNDBlock`
(default :class:`~ggnd_plugin.block.GGNDConfig` except ``chunk_size``; float32): the pair table
(``block.pairs``, rebuilt every call like a neighbour list), the forward pass to per-atom energies, their
sum per system, and ``torch.autograd.grad`` of the total with respect to the positions. The host is
replaced by a fixed random feature tensor of MACE-like irreps ``32x0e+32x1o``; the readout weights, which
start at zero, are set to random values so the forces are those of a trained block (the cost does not
depend on the values). Positions are molecule-like blobs: a jittered simple-cubic lattice of spacing
2.1 Å (about 0.11 atoms/Å^3, the density of organic molecules including hydrogens; nearest neighbours
>= 1.5 Å), keeping the N sites nearest the centre, with three species at random.

Cases: one system of N = 27, 100, 300, 1000, 3000 atoms and batches of 16 x 27 and 64 x 27 atoms,
each dense (``chunk_size=None``) and chunked (``chunk_size=64``).

Versions: every case is measured for GGND numerics version 1 (ggnd-plugin 0.1.0, the block of files
trained with it) and version 2 (the current default) side by side: both blocks in the same timing
subprocess on the same inputs, their repeats interleaved, so the speed-up ``v1 / v2`` of a case is
measured under the same conditions. Memory is read per version, each in its own fresh subprocess.

Time: after one warm-up evaluation, ``--repeats`` evaluations are timed in CPU seconds of the process
(``time.process_time``, one thread: other jobs on the shared machine do not count; wall seconds with
``--threads`` above 1) and the median is reported, together with the minimum and maximum; for a case whose warm-up took more than 30 s
the warm-up itself is the timing (``repeats`` 0): first-call costs are negligible there and a repeat
would not beat the noise of the shared machine.

Peak memory: the rise of the process's resident-set high-water mark (``ru_maxrss``) above its value
after setup (imports, model, inputs), read in fresh subprocesses, two numbers per case:

1. ``rss_peak_default_allocator_bytes``: in the timing subprocess (warm-up and timed repeats), with
   glibc's allocator as users run it. This is what the process took from the machine, but glibc raises
   its mmap threshold (up to 32 MiB) each time a large block is freed, after which blocks of that size
   come from the heap and stay resident when freed: it overstates what the computation needs.
2. ``peak_bytes`` (the working set): a second subprocess started with ``MALLOC_MMAP_THRESHOLD_=131072``
   in its environment, which fixes glibc's threshold from the first allocation (and switches off its
   dynamic raising), so every block of 128 KiB or more has its own mapping and leaves RSS when freed.
   The first evaluation is measured (after a warm-up, freed small blocks would be reused from the heap
   unseen). The rise is the peak of live memory up to page rounding and small-object noise (a few MiB,
   including first-call allocations). An earlier version pinned the threshold with ``mallopt`` in
   the timing process after the timed runs; that overstated chunked cases about 4x (826 MiB against 199
   MiB at N = 1000, measured side by side), because the heap had already grown.

The mark only rises when memory is touched, so both count what the operating system had to provide,
not what was reserved.

Safety on a shared machine: before a case runs, its peak is predicted from the largest case of the same
mode already measured (memory proportional to the number of pairs for dense, to N for chunked); a case
predicted above the budget (``--memory-budget-gib``, default 14, but never more than the memory available
at that moment minus 4 GiB) is recorded with ``seconds``/``peak_bytes`` null and a ``skipped`` reason. The subprocess also caps its own address space at its post-setup size plus the budget
(``resource.setrlimit(RLIMIT_AS)``), so a wrong prediction ends in a clean allocation error (recorded as
skipped), never in the machine swapping or the OOM killer hitting someone else.

Growth exponents: least-squares slopes of log(seconds) and log(peak_bytes) against log(N) over the
single-system cases per mode, over all measured N and over the large-N tail (N >= 300, where fixed
per-call overheads no longer dominate).

Usage::

    .venv/bin/python benchmarks/block_scaling.py [--quick] [--out PATH] [--repeats 3] [--threads 1]

Writes benchmarks/results/block_scaling.json (``--quick``: only N = 27, 100 and a batch of 8 x 27, and
by default to benchmarks/results/block_scaling_quick.json so the committed result is not overwritten).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "block_scaling.json"
QUICK_RESULT = ROOT / "benchmarks" / "results" / "block_scaling_quick.json"

HOST_IRREPS = "32x0e+32x1o"
NUM_SPECIES = 3
LATTICE_SPACING = 2.1  # Å
LATTICE_JITTER = 0.3  # Å, uniform in each coordinate
CHUNK_SIZE = 64
SINGLE_SIZES = (27, 100, 300, 1000, 3000)
BATCHES = ((16, 27), (64, 27))
QUICK_SIZES = (27, 100)
QUICK_BATCHES = ((8, 27),)
VERSIONS = (1, 2)
TAIL_FROM = 300  # N from which the large-N exponent is fitted
LONG_CASE_SECONDS = 30.0
PINNED_MMAP_THRESHOLD = 128 * 1024  # bytes; glibc's initial value
DEFAULT_RSS = "rss_peak_default_allocator_bytes"
SAFETY_MARGIN = 4 * 2**30  # bytes of available memory left to the other jobs on the machine


# --------------------------------------------------------------------------------------------------
# One case, inside its own subprocess
# --------------------------------------------------------------------------------------------------
def molecule_blob(n_atoms: int, generator):
    """N sites of a jittered cubic lattice nearest its centre: a compact molecule-like cluster."""
    import torch

    side = math.ceil((6 * n_atoms / math.pi) ** (1 / 3)) + 2
    axis = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    order = torch.argsort(
        grid.norm(dim=-1) + 1e-6 * torch.rand(len(grid), generator=generator, dtype=torch.float64)
    )
    sites = grid[order[:n_atoms]] * LATTICE_SPACING
    jitter = (torch.rand(n_atoms, 3, generator=generator, dtype=torch.float64) * 2 - 1) * LATTICE_JITTER
    return (sites + jitter).float()


def max_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def address_space_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def case_inputs(n_atoms: int, n_systems: int, generator) -> dict:
    """Positions (float32), system index, species and random host features of ``n_systems`` blobs of
    ``n_atoms // n_systems`` atoms, drawn from ``generator`` in this order."""
    import torch

    n_per = n_atoms // n_systems
    positions = torch.cat([molecule_blob(n_per, generator) for _ in range(n_systems)])
    batch = torch.arange(n_systems).repeat_interleave(n_per)
    n_atoms = positions.shape[0]
    species = torch.randint(0, NUM_SPECIES, (n_atoms,), generator=generator)
    host = torch.randn(n_atoms, block_feature_spec().irreps.dim, generator=generator, dtype=torch.float32)
    return {"positions": positions, "batch": batch, "species": species, "host": host, "n_systems": n_systems}


def block_feature_spec():
    from ggnd_plugin.block import FeatureSpec

    return FeatureSpec({"node_feats": HOST_IRREPS}, num_species=NUM_SPECIES)


def case_block(chunk_size: int | None, version: int, generator):
    """The measured block: default config but ``chunk_size``, float32, random readouts from ``generator``."""
    import torch

    from ggnd_plugin.block import GGNDBlock, GGNDConfig

    torch.manual_seed(0)
    block = GGNDBlock(block_feature_spec(), GGNDConfig(chunk_size=chunk_size, version=version)).float()
    with torch.no_grad():
        block.readout_state.weight.normal_(generator=generator)
        block.readout_host.weight.normal_(std=0.1, generator=generator)
    return block


def block_energy_and_forces(block, inputs: dict):
    """One evaluation: pair table, energies per system, forces (the gradient of their sum)."""
    import torch

    from ggnd_plugin.block import system_energy

    batch, n_systems = inputs["batch"], inputs["n_systems"]
    x = inputs["positions"].clone().requires_grad_(True)
    pairs = block.pairs(x, batch)
    energy = system_energy(block(inputs["host"], x, inputs["species"], pairs, batch=batch), batch, n_systems)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach(), -grad


def run_case(case: dict) -> dict:
    """Measure one case in this process (call it in a fresh subprocess).

    Timing: every version in ``case["versions"]`` on the same inputs, repeats interleaved. Memory:
    the one version ``case["version"]``, first evaluation only.
    """
    import torch

    torch.set_num_threads(case["threads"])
    generator = torch.Generator().manual_seed(case["n_atoms"] * 1000 + case["n_systems"])
    n_systems, n_per = case["n_systems"], case["n_atoms"] // case["n_systems"]
    inputs = case_inputs(case["n_atoms"], n_systems, generator)
    versions = case["versions"] if case.get("phase") == "time" else [case["version"]]
    blocks = {version: case_block(case["chunk_size"], version, generator) for version in versions}

    def energy_and_forces(block):
        return block_energy_and_forces(block, inputs)

    budget = case.get("memory_budget_bytes")
    space = address_space_bytes()
    if budget is not None and space:
        resource.setrlimit(resource.RLIMIT_AS, (space + budget, resource.RLIM_INFINITY))
    record = {"pair_count": n_systems * n_per * n_per}
    if case.get("phase") in ("memory", "rss"):
        # memory: the environment fixed glibc's mmap threshold before the first allocation (see the
        # docstring) and the first evaluation is measured: after a warm-up, blocks below the threshold
        # that the warm-up freed would be reused from the heap without raising the mark. rss: glibc as
        # users run it, over a warm-up and two more evaluations (an MD run repeats them).
        block = blocks[case["version"]]
        try:
            baseline = max_rss_bytes()
            start = time.perf_counter()
            energy, forces = energy_and_forces(block)
            if case["phase"] == "rss" and time.perf_counter() - start < LONG_CASE_SECONDS:
                for _ in range(2):
                    energy, forces = energy_and_forces(block)
            peak = max_rss_bytes() - baseline
        except (RuntimeError, MemoryError) as error:
            message = str(error).splitlines()[0][:200]
            return {"skipped": f"allocation failed under the address-space cap: {message}"}
        if not (torch.isfinite(energy).all() and torch.isfinite(forces).all()):
            raise SystemExit("non-finite energy or forces")
        if case["phase"] == "rss":
            return {DEFAULT_RSS: peak}
        return {"peak_bytes": peak, "peak_bytes_method": "working set (MALLOC_MMAP_THRESHOLD_=131072)"}
    # CPU seconds of this process with one thread, or wall seconds with more: other jobs on a shared
    # machine then do not count (the working-set and RSS phases below are not timed).
    clock = time.process_time if case["threads"] == 1 else time.perf_counter
    results: dict[str, dict] = {}
    warm_up: dict[int, float] = {}
    times: dict[int, list[float]] = {}
    outputs = {}
    baseline = max_rss_bytes()
    for version, block in blocks.items():
        try:
            start = clock()
            outputs[version] = energy_and_forces(block)
            warm_up[version] = clock() - start
            times[version] = [warm_up[version]] if warm_up[version] >= LONG_CASE_SECONDS else []
        except (RuntimeError, MemoryError) as error:
            message = str(error).splitlines()[0][:200]
            results[str(version)] = {"skipped": f"allocation failed under the address-space cap: {message}"}
    # Interleaved repeats: both versions see the same state of the shared machine. A version whose
    # warm-up took minutes is timed by its warm-up (first-call costs are negligible there).
    repeating = [v for v in times if warm_up[v] < LONG_CASE_SECONDS]
    for _ in range(case["repeats"]):
        for version in repeating:
            start = clock()
            outputs[version] = energy_and_forces(blocks[version])
            times[version].append(clock() - start)
    for version in times:
        energy, forces = outputs[version]
        if not (torch.isfinite(energy).all() and torch.isfinite(forces).all()):
            raise SystemExit(f"version {version}: non-finite energy or forces")
        results[str(version)] = {
            "seconds": statistics.median(times[version]),
            "repeats": len(times[version]) if version in repeating else 0,
            "warm_up_seconds": warm_up[version],
            "seconds_min": min(times[version]),
            "seconds_max": max(times[version]),
            "force_rms": float(forces.pow(2).mean().sqrt()),
        }
    return {**record, "versions": results, "setup_rss_bytes": baseline}


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def predicted_peak(case: dict, version: int, measured: list[dict]) -> float | None:
    """Working set of the next case, from the largest measured case of the same mode and version.

    Scaled by the number of pairs: exact for dense, an upper bound for chunked. The resident memory under
    glibc's default allocator can exceed it (README); the address-space cap in the subprocess catches that.
    """
    same = [
        r
        for r in measured
        if r["mode"] == case["mode"] and r["versions"].get(str(version), {}).get("peak_bytes")
    ]
    if not same:
        return None
    ref = max(same, key=lambda r: r["pair_count"])
    return ref["versions"][str(version)]["peak_bytes"] * case["pair_count"] / ref["pair_count"]


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_in_subprocess(case: dict, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    env = {**os.environ, "OMP_NUM_THREADS": str(case["threads"]), "MKL_NUM_THREADS": str(case["threads"])}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # rss and time: glibc's defaults, as users run it
    if case.get("phase") == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(PINNED_MMAP_THRESHOLD)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"skipped": f"took longer than the {timeout:.0f} s per-case limit"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"subprocess exited with {done.returncode}: {tail[0][:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit_slope(points: list[tuple[float, float]]) -> float | None:
    points = [(math.log(x), math.log(y)) for x, y in points if x and y and y > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def growth_exponents(cases: list[dict], versions) -> dict:
    """Least-squares slopes of log(y) against log(N) per version and mode, single systems."""
    out: dict[str, dict] = {}
    for version in versions:
        key = str(version)
        out[key] = {}
        for mode in ("dense", "chunked"):
            single = [
                (r["n_atoms"], r["versions"][key])
                for r in cases
                if r["mode"] == mode and r["n_systems"] == 1 and r["versions"].get(key, {}).get("seconds")
            ]
            tail = [(n, v) for n, v in single if n >= TAIL_FROM]

            def slope(points, field):
                return fit_slope([(n, v.get(field)) for n, v in points if v.get(field)])

            out[key][mode] = {
                "n_atoms": [n for n, _ in single],
                "time": slope(single, "seconds"),
                "memory": slope(single, "peak_bytes"),
                "memory_default_allocator": slope(single, DEFAULT_RSS),
                "tail_n_atoms": [n for n, _ in tail],
                "time_tail": slope(tail, "seconds"),
                "memory_tail": slope(tail, "peak_bytes"),
                "memory_default_allocator_tail": slope(tail, DEFAULT_RSS),
            }
    return out


def machine_info(threads: int) -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "dtype": "float32",
        "load_average_at_start": load,
        "note": (
            "2-core machine shared with other jobs while this ran; absolute seconds carry that noise "
            "(see seconds_min/seconds_max), the exponents much less so"
        ),
    }


def print_table(cases: list[dict], exponents: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def mib(value):
        return "-" if value is None else f"{value / 2**20:.0f}"

    def seconds(value):
        return "-" if value is None else f"{value:.4g}"

    table = Table(
        title="GGND block, energy + forces (float32, CPU): version 1 (0.1.0) vs version 2, one run; "
        "peak = working set, RSS = default glibc"
    )
    columns = (
        "mode",
        "systems x atoms",
        "v1 s",
        "v2 s",
        "speed-up",
        "v1/v2 peak MiB",
        "v1/v2 RSS MiB",
        "note",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("mode", "note") else "right")
    for r in cases:
        per = r["n_atoms"] // r["n_systems"]
        one, two = r["versions"].get("1", {}), r["versions"].get("2", {})
        speedup = r.get("speedup")
        table.add_row(
            r["mode"] + ("" if r["chunk_size"] is None else f" ({r['chunk_size']})"),
            f"{r['n_systems']} x {per}",
            seconds(one.get("seconds")),
            seconds(two.get("seconds")),
            "-" if speedup is None else f"{speedup:.1f}x",
            f"{mib(one.get('peak_bytes'))} / {mib(two.get('peak_bytes'))}",
            f"{mib(one.get(DEFAULT_RSS))} / {mib(two.get(DEFAULT_RSS))}",
            "; ".join(f"v{k}: {v['skipped']}" for k, v in r["versions"].items() if "skipped" in v)[:60],
        )
    console = Console(width=170)
    console.print(table)
    exp = Table(title="growth exponents d log(y) / d log(N), single systems (tail: N >= 300)")
    for column in ("version", "mode", "time", "memory", "RSS", "time (tail)", "memory (tail)", "RSS (tail)"):
        exp.add_column(column, justify="right")

    def fmt(value):
        return "-" if value is None else f"{value:.2f}"

    for version, modes in exponents.items():
        for mode, e in modes.items():
            exp.add_row(
                version,
                mode,
                fmt(e["time"]),
                fmt(e["memory"]),
                fmt(e["memory_default_allocator"]),
                fmt(e["time_tail"]),
                fmt(e["memory_tail"]),
                fmt(e["memory_default_allocator_tail"]),
            )
    console.print(exp)


def _key(record: dict) -> tuple[str, int, int]:
    return record["mode"], record["n_atoms"], record["n_systems"]


def _parse_only(text: str) -> tuple[str, int, int]:
    parts = text.split(":")
    if parts[0] not in ("dense", "chunked") or len(parts) not in (2, 3):
        raise SystemExit(f"--only {text!r}: expected MODE:N or MODE:N:SYSTEMS with MODE dense or chunked")
    systems = int(parts[2]) if len(parts) == 3 else 1
    return parts[0], int(parts[1]), systems  # N counts all atoms: a batch of 64 x 27 is chunked:1728:64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N only (smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case")
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    parser.add_argument("--versions", type=int, nargs="+", default=list(VERSIONS), choices=VERSIONS)
    parser.add_argument(
        "--memory-budget-gib", type=float, default=14.0, help="skip cases predicted to need more"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="MODE:N[:SYSTEMS]",
        help="run only these cases (e.g. dense:1000 chunked:1728:64) and merge them into --out",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out (without --only, which merges into it)"
    )
    args = parser.parse_args(argv)

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0

    sizes, batches = (QUICK_SIZES, QUICK_BATCHES) if args.quick else (SINGLE_SIZES, BATCHES)
    out = args.out or (QUICK_RESULT if args.quick else RESULT)
    if out.exists() and not args.only and not args.overwrite:
        # Before hours of measuring, not after: the committed results are not replaced by accident.
        parser.error(f"{out} already exists; pass --overwrite to replace it")
    budget = int(args.memory_budget_gib * 2**30)
    plan = [(mode, n, 1) for mode in ("dense", "chunked") for n in sizes]
    plan += [(mode, s * n, s) for mode in ("dense", "chunked") for s, n in batches]
    machine = machine_info(args.threads)
    cases: list[dict] = []
    if args.only:
        previous = {_key(r): r for r in json.loads(out.read_text())["cases"]} if out.exists() else {}
        wanted = {_parse_only(text) for text in args.only}
        cases = [previous[key] for key in previous if key not in wanted]
        plan = [item for item in plan if item in wanted] + sorted(wanted - set(plan))
    for mode, n_atoms, n_systems in plan:
        per = n_atoms // n_systems
        case = {
            "mode": mode,
            "n_atoms": n_atoms,
            "n_systems": n_systems,
            "chunk_size": None if mode == "dense" else args.chunk_size,
            "repeats": args.repeats,
            "threads": args.threads,
            "pair_count": n_systems * per * per,
        }
        record = {**case, "versions": {}}
        available = available_memory_bytes()
        case_budget = budget if available is None else min(budget, available - SAFETY_MARGIN)
        case["memory_budget_bytes"] = max(case_budget, 2**28)
        runnable = []
        for version in args.versions:
            estimate = predicted_peak(case, version, cases)
            if estimate is not None and estimate > case_budget:
                record["versions"][str(version)] = {
                    "predicted_peak_bytes": estimate,
                    "skipped": (
                        f"predicted peak {estimate / 2**30:.1f} GiB exceeds the {case_budget / 2**30:.1f} "
                        f"GiB budget (--memory-budget-gib {args.memory_budget_gib:g}, capped at the "
                        "available memory minus 4 GiB: the machine is shared)"
                    ),
                }
            else:
                runnable.append(version)
        if runnable:
            print(
                f"{mode:8s} {n_systems} x {per} atoms, versions {runnable} ...", file=sys.stderr, flush=True
            )
            timing = run_in_subprocess({**case, "phase": "time", "versions": runnable}, args.timeout)
            if "skipped" in timing:
                for version in runnable:
                    record["versions"][str(version)] = {"skipped": timing["skipped"]}
            else:
                record["versions"].update(timing["versions"])
            for version in runnable:
                measured = record["versions"][str(version)]
                if "skipped" in measured:
                    continue
                for phase in ("memory", "rss"):
                    result = run_in_subprocess({**case, "phase": phase, "version": version}, args.timeout)
                    if "skipped" in result:
                        measured.setdefault("notes", []).append(f"{phase}: {result.pop('skipped')}")
                    measured.update(result)
        one, two = record["versions"].get("1", {}), record["versions"].get("2", {})
        if one.get("seconds") and two.get("seconds"):
            record["speedup"] = one["seconds"] / two["seconds"]
        cases.append(record)
    order = {_key(r): r for r in cases}
    cases = [order[key] for key in sorted(order, key=lambda k: (k[2] > 1, k[0] != "dense", k[1], k[2]))]
    exponents = growth_exponents(cases, args.versions)
    result = {
        "cases": cases,
        "exponents": exponents,
        "machine": machine,
        "config": "GGNDConfig() defaults (16 channels, lmax 1, 4 heads, 3 Euler steps) per version",
    }
    from ggnd_plugin.safe_io import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print_table(cases, exponents)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
