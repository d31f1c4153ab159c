"""Replica-steps per second: batched TorchSim stability runs against ASE stepping replicas one by one.

For 1, 4, 16 and 64 replicas of 3BPA (27 atoms, start frames from test_300K.xyz), the same MACE model
runs (a) through ``ggnd_plugin.md.run_stability`` (all replicas in one TorchSim state, bond criterion
evaluated every step) and (b) in ASE VelocityVerlet with MACE's own calculator, one replica after the
other, side by side in one process. Both for the host alone and, when the MACE adapter is installed,
for the host with a GGND block attached (the default ``GGNDConfig()`` and the demo's 8 channels,
2 heads, 2 steps), giving the GGND overhead on MD time.

The MACE model is built with ``mace.modules`` (random weights, scaled down so a few femtoseconds of MD
stay gentle): throughput does not depend on the weights. Usage::

    .venv/bin/python benchmarks/replica_throughput.py [--steps 20] [--threads 1] [--sizes 1 4 16 64]

Writes benchmarks/results/replica_throughput.json. Two more sections are measured on their own and
added to that file (the rest of it is kept):

* ``--section autobatching``: replica-steps per second of one ``run_stability`` with every replica in one
  batch, with fixed memory-sized batches (TorchSim's ``BinningAutoBatcher``: each bin runs until its
  last replica ends) and with TorchSim's ``InFlightAutoBatcher`` (waiting replicas take the place of
  those that fail or finish), at the same emulated memory limit (``--max-batch-atoms``: this CPU has no
  device memory to measure, see docs/scale.md). Two systems: 200 replicas of 3BPA (a small MACE with
  Morse bonds added, so replicas fail at temperature-dependent times) and periodic fcc argon
  (Lennard-Jones, 108 atoms, RDF criterion; hot replicas melt).
* ``--section scaling``: ``ggnd stability`` under ``torchrun`` with 1 and 2 CPU ranks (gloo), the same
  replicas; MD replica-steps per second (start-up removed by differencing two horizons) and the
  parallel efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "3bpa"
RESULT = ROOT / "benchmarks" / "results" / "replica_throughput.json"


def _ggnd_configs():
    from ggnd_plugin.block import GGNDConfig

    return {
        "MACE+GGND": GGNDConfig(),  # the block's defaults: 16 channels, 4 heads, 3 steps
        "MACE+GGND (8 ch, 2 heads, 2 steps)": GGNDConfig(channels=8, heads=2, steps=2),  # ggnd demo's
    }


def build_mace(dtype=torch.float64):
    """A small MACE (2 layers, 32x0e+32x1o, max_ell 2, correlation 2).

    Production 3BPA MACEs are larger (e.g. 64x0e+64x1o, L=3, ν=3: 114 ms per force call for one
    replica on this CPU, ~85 ms per replica in a batch of 16): on a CPU the host's arithmetic, not
    per-step overhead, dominates such models, so batching gains less there than it does on a GPU.
    """
    from ggnd_plugin.testing import tiny_mace

    model = tiny_mace(
        r_max=5.0,
        num_bessel=8,
        max_ell=2,
        hidden_irreps="32x0e+32x1o",
        MLP_irreps="16x0e",
        atomic_energies=np.zeros(4),
        avg_num_neighbors=12.0,
        atomic_inter_scale=0.01,  # random weights: keep forces small so the short runs stay physical
    )
    return model.to(dtype)


def mace_adapter():
    """The registered MACE adapter, or (None, why not)."""
    from ggnd_plugin.errors import GGNDError
    from ggnd_plugin.registry import get

    try:
        adapter = get("mace")
        adapter.require()
        return adapter, None
    except GGNDError as error:
        return None, str(error)


def torchsim_rate(ts_model, start, reference, n_replicas: int, steps: int) -> float:
    from ggnd_plugin.md.stability import StabilityProtocol, run_stability

    def run(n_steps):
        protocol = StabilityProtocol(
            temperatures=(300.0,), replicas=n_replicas, time_ps=n_steps * 1e-3, threshold=100.0, seed=1
        )
        began = time.perf_counter()
        result = run_stability({"m": ts_model}, start, reference, protocol, progress=False)
        assert not any(row["failed"] for row in result.rows)
        return time.perf_counter() - began

    # the difference of two run lengths removes set-up (state building, first force call)
    short, long = run(2), run(2 + steps)
    return n_replicas * steps / (long - short)


def ase_rate(calculator, start, n_replicas: int, steps: int) -> float:
    from ase import units
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    def run(n_steps):
        elapsed = 0.0
        for replica in range(n_replicas):
            atoms = start[replica % len(start)].copy()
            atoms.calc = calculator
            thermalize_momenta(atoms, temperature_K=300.0, rng=np.random.default_rng(replica))
            dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
            atoms.get_forces()
            began = time.perf_counter()
            dynamics.run(n_steps)
            elapsed += time.perf_counter() - began
        return elapsed

    short, long = run(1), run(1 + steps)
    return n_replicas * steps / (long - short)


def measure(label, ts_model, calculator, start, reference, sizes, steps):
    rows = []
    for n_replicas in sizes:
        ts_rate = torchsim_rate(ts_model, start, reference, n_replicas, steps)
        ase_steps = max(5, steps // 2) if n_replicas >= 16 else steps
        ase = ase_rate(calculator, start, n_replicas, ase_steps)
        rows.append(
            {
                "model": label,
                "replicas": n_replicas,
                "torchsim_replica_steps_per_s": round(ts_rate, 2),
                "ase_sequential_replica_steps_per_s": round(ase, 2),
                "speedup": round(ts_rate / ase, 2),
                "torchsim_ms_per_step": round(1000 * n_replicas / ts_rate, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------
# --section autobatching
# ---------------------------------------------------------------------------------------------------
def build_small_mace(dtype=torch.float64):
    """MACE with 16x0e+16x1o, max_ell 1, 2 layers (random weights): ~180 replica-steps/s here."""
    from ggnd_plugin.testing import tiny_mace

    model = tiny_mace(
        r_max=5.0,
        num_bessel=8,
        hidden_irreps="16x0e+16x1o",
        MLP_irreps="16x0e",
        atomic_energies=np.zeros(4),
        avg_num_neighbors=12.0,
        atomic_inter_scale=0.01,
    )
    return model.to(dtype)


def summed(*models):
    """A TorchSim model whose energy and forces are those of ``models`` added; ``.sizes`` records the
    number of systems of each call (the batch occupancy)."""
    from torch_sim.models.interface import ModelInterface

    class Summed(ModelInterface):
        def __init__(self):
            super().__init__()
            self.parts = torch.nn.ModuleList(models)
            self._device, self._dtype = models[0].device, models[0].dtype
            self._compute_forces, self._compute_stress = True, False
            self.sizes: list[int] = []

        def forward(self, state, **_):
            self.sizes.append(state.n_systems)
            outputs = [part(state) for part in self.parts]
            return {
                "energy": sum(o["energy"].detach() for o in outputs),
                "forces": sum(o["forces"].detach() for o in outputs),
            }

    return Summed()


def _batching_runs(make_model, start, reference, protocol, max_atoms, label):
    from ggnd_plugin.md.stability import Batching, run_stability

    rows, reference_rows = [], None
    for mode, name in (
        ("off", "one batch (all replicas)"),
        ("binning", "fixed batches (BinningAutoBatcher)"),
        ("in-flight", "autobatched (InFlightAutoBatcher)"),
    ):
        model = make_model()
        batching = Batching(mode, None if mode == "off" else max_atoms)
        result = run_stability({"m": model}, start, reference, protocol, progress=False, batching=batching)
        times = [row["stability_ps"] for row in result.rows]
        reference_rows = reference_rows or times
        steps, seconds = result.execution["replica_steps"], result.execution["seconds"]
        sizes = model.sizes[1:] if mode == "off" else model.sizes
        rows.append(
            {
                "system": label,
                "batching": name,
                "max_batch_atoms": None if mode == "off" else max_atoms,
                "largest_batch_replicas": max(sizes),
                "force_calls": len(sizes),
                "mean_replicas_per_force_call": round(float(np.mean(sizes)), 2),
                "replica_steps": steps,
                "seconds": round(seconds, 2),
                "replica_steps_per_s": round(steps / seconds, 2),
                "failed": sum(row["failed"] for row in result.rows),
                "same_stability_times_as_one_batch": times == reference_rows,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def autobatching_section(args) -> dict:
    from ase.build import bulk
    from ase.io import read
    from torch_sim.models.lennard_jones import LennardJonesModel
    from torch_sim.models.mace import MaceModel

    from ggnd_plugin.md.metrics import reference_bonds
    from ggnd_plugin.md.reference_models import bonded_morse_model
    from ggnd_plugin.md.stability import StabilityProtocol

    torch.set_num_threads(args.threads)
    start = read(DATA / "test_300K.xyz", index=":200")
    reference = read(DATA / "train_300K.xyz", index=":100")
    bonds = reference_bonds(reference)
    host = build_small_mace()
    molecule = StabilityProtocol(
        temperatures=(300.0, 2000.0, 3500.0, 5000.0),
        replicas=args.molecule_replicas // 4,
        time_ps=0.2,
        seed=0,
    )
    molecule_rows = _batching_runs(
        lambda: summed(
            MaceModel(host, device=torch.device("cpu"), dtype=torch.float64, compute_stress=False),
            bonded_morse_model(*bonds),
        ),
        start,
        reference,
        molecule,
        args.molecule_batch * 27,
        f"3BPA, {molecule.replicas * 4} replicas",
    )

    crystal = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(3)  # 108 atoms

    def rattled(n, amplitude, first_seed):
        frames = []
        for seed in range(n):
            frame = crystal.copy()
            frame.rattle(amplitude, seed=first_seed + seed)
            frames.append(frame)
        return frames

    argon = StabilityProtocol(
        temperatures=(120.0, 200.0, 300.0, 400.0),
        replicas=args.crystal_replicas // 4,
        time_ps=1.0,
        timestep_fs=4.0,
        rdf_window_ps=0.2,
        rdf_every_steps=5,
        rdf_bins=30,
        seed=0,
    )

    def lennard_jones():
        return summed(
            LennardJonesModel(
                sigma=3.405, epsilon=0.0104, cutoff=6.0, dtype=torch.float64, compute_stress=False
            )
        )

    crystal_rows = _batching_runs(
        lennard_jones,
        rattled(12, 0.02, 0),
        rattled(20, 0.12, 100),  # reference g(r) broadened as a crystal near 100 K
        argon,
        args.crystal_batch * 108,
        f"fcc argon 3x3x3 (108 atoms, periodic), {argon.replicas * 4} replicas",
    )
    return {
        "what": "replica-steps per second of one run_stability: every replica in one batch, fixed memory-sized "
        "batches run one after another (BinningAutoBatcher), and a batch refilled as replicas fail or "
        "finish (InFlightAutoBatcher), at the same memory limit",
        "memory_limit": "emulated: max_batch_atoms (TorchSim's max_memory_scaler with memory_scales_with="
        "'n_atoms'); TorchSim measures a device's memory only on CUDA, and this machine has no GPU",
        "systems": {
            "3BPA": "MACE 16x0e+16x1o, L=1, 2 layers, random weights (scaled down) plus Morse bonds (4 eV) on the "
            "28 reference bonds, so replicas fail at temperature-dependent times; NVE 1 fs, 0.2 ps, "
            f"300/2000/3500/5000 K, bond criterion; batches of at most {args.molecule_batch} replicas",
            "argon": "TorchSim LennardJonesModel (sigma 3.405 Å, epsilon 0.0104 eV, cutoff 6 Å), fcc 3x3x3, NVE 4 fs, "
            "1 ps, 120/200/300/400 K, RDF criterion (30 bins, 0.2 ps window, reference rattled by 0.12 Å); "
            f"batches of at most {args.crystal_batch} replicas",
        },
        "device": "CPU, 1 thread, float64 (no GPU lent)",
        "load_average_during": list(os.getloadavg()),
        "results": molecule_rows + crystal_rows,
    }


# ---------------------------------------------------------------------------------------------------
# --section scaling
# ---------------------------------------------------------------------------------------------------
def _torchrun_stability(model_file, out, ranks, replicas, steps) -> tuple[float, float]:
    """(wall seconds, CPU seconds of torchrun and its ranks) of one ``ggnd stability`` job."""
    import resource
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    command += ["--", "-m", "ggnd_plugin.cli", "stability", str(model_file)]
    command += ["--start", str(DATA / "test_300K.xyz"), "--reference", str(DATA / "train_300K.xyz")]
    command += [
        "--temperature",
        "300",
        "600",
        "--replicas",
        str(replicas // 2),
        "--time-ps",
        str(steps / 1000),
    ]
    command += ["--threshold", "100", "--no-plots", "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def cpu():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant
        return usage.ru_utime + usage.ru_stime

    cpu_before, began = cpu(), time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed, cpu_seconds = time.perf_counter() - began, cpu() - cpu_before
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return elapsed, cpu_seconds


def scaling_section(args) -> dict:
    import tempfile

    from ggnd_plugin.registry import get

    adapter = get("mace")
    rows = []
    short, long = 20, 20 + args.scaling_steps
    with tempfile.TemporaryDirectory() as folder:
        model_file = adapter.save(build_small_mace(), Path(folder) / "small.model")
        for repeat in range(args.repeats):
            rates, cpu_costs = {}, {}
            for ranks in (1, 2):
                (wall_short, cpu_short), (wall_long, cpu_long) = (
                    _torchrun_stability(
                        model_file, Path(folder) / f"{repeat}-{ranks}-{n}", ranks, args.scaling_replicas, n
                    )
                    for n in (short, long)
                )
                replica_steps = args.scaling_replicas * args.scaling_steps
                rates[ranks] = replica_steps / (wall_long - wall_short)
                cpu_costs[ranks] = 1000 * (cpu_long - cpu_short) / replica_steps
                rows.append(
                    {
                        "repeat": repeat,
                        "ranks": ranks,
                        "replicas": args.scaling_replicas,
                        "command_seconds_short_long": [round(wall_short, 1), round(wall_long, 1)],
                        "md_replica_steps_per_s": round(rates[ranks], 2),
                        "efficiency": round(rates[ranks] / (ranks * rates[1]), 3),
                        "md_cpu_ms_per_replica_step": round(cpu_costs[ranks], 3),
                        "cpu_efficiency": round(cpu_costs[1] / cpu_costs[ranks], 3),
                        "load_average_after": round(os.getloadavg()[0], 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)

    def median(key, ranks):
        return float(np.median([r[key] for r in rows if r["ranks"] == ranks]))

    rate = {ranks: median("md_replica_steps_per_s", ranks) for ranks in (1, 2)}
    cost = {ranks: median("md_cpu_ms_per_replica_step", ranks) for ranks in (1, 2)}
    return {
        "what": "ggnd stability under torchrun --standalone --nproc-per-node N (gloo, one thread per rank): "
        "the replicas sharded over the ranks; MD replica-steps per second from the difference of two horizons "
        f"({short} and {long} steps: start-up, model loading and result writing cancel), efficiency = rate(N) "
        "/ (N rate(1)) within a repeat. CPU milliseconds per replica-step (user + system time of torchrun and "
        "its ranks, same differencing) measure the work the ranks add, which other jobs on the shared cores "
        "do not change much; cpu_efficiency = cost(1) / cost(N)",
        "system": "3BPA, 300 and 600 K, NVE 1 fs, no failures (threshold 100 Å: every replica runs the horizon)",
        "host_model": "MACE 16x0e+16x1o, L=1, 2 layers, random weights, float64, loaded from a .model file "
        "through the MACE adapter",
        "machine": f"{os.cpu_count()} CPU cores shared with other developers' jobs (load averages recorded); "
        "no GPU lent",
        "results": rows,
        "median_md_replica_steps_per_s": rate,
        "median_efficiency_2_ranks": round(rate[2] / (2 * rate[1]), 3),
        "median_md_cpu_ms_per_replica_step": cost,
        "median_cpu_efficiency_2_ranks": round(cost[1] / cost[2], 3),
    }


def add_section(path: Path, name: str, section: dict) -> None:
    """Add (or replace) one top-level key of the results file, keeping everything else in it."""
    from ggnd_plugin.safe_io import atomic_write_text

    record = json.loads(path.read_text()) if path.exists() else {}
    record[name] = section
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    print(f"wrote section '{name}' of {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=10, help="timed MD steps per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out (or the --section) if it exists"
    )
    parser.add_argument(
        "--section",
        choices=("batched-vs-ase", "autobatching", "scaling"),
        default="batched-vs-ase",
        help="what to measure: batched-vs-ase writes the file; the others add their section to it",
    )
    parser.add_argument("--molecule-replicas", type=int, default=200)
    parser.add_argument("--molecule-batch", type=int, default=32, help="replicas per batch (memory limit)")
    parser.add_argument("--crystal-replicas", type=int, default=16)
    parser.add_argument("--crystal-batch", type=int, default=4, help="replicas per batch (memory limit)")
    parser.add_argument("--scaling-replicas", type=int, default=32)
    parser.add_argument("--scaling-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="scaling: measurements of 1 and 2 ranks")
    args = parser.parse_args(argv)
    if args.section != "batched-vs-ase":
        key = {"autobatching": "autobatching", "scaling": "rank_scaling"}[args.section]
        if args.out.exists() and key in json.loads(args.out.read_text()) and not args.overwrite:
            parser.error(f"{args.out} already has a '{key}' section; pass --overwrite to replace it")
        torch.set_default_dtype(torch.float64)
        section = autobatching_section(args) if args.section == "autobatching" else scaling_section(args)
        add_section(args.out, key, section)
        return
    if args.out.exists() and not args.overwrite:  # before the imports and the measuring
        parser.error(f"{args.out} already exists; pass --overwrite to replace it")

    from ase.io import read
    from mace.calculators import MACECalculator
    from torch_sim.models.mace import MaceModel

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    start = read(DATA / "test_300K.xyz", index=":64")
    reference = read(DATA / "train_300K.xyz", index=":100")

    host = build_mace()
    rows = measure(
        "MACE",
        MaceModel(host, device=torch.device("cpu"), dtype=torch.float64, compute_stress=False),
        MACECalculator(models=host, device="cpu", default_dtype="float64"),
        start,
        reference,
        args.sizes,
        args.steps,
    )
    adapter, why_not = mace_adapter()
    ggnd_configs = _ggnd_configs() if adapter is not None else {}
    ggnd_rows, overhead = [], None
    if adapter is not None:
        overhead = []
        for label, config in ggnd_configs.items():
            torch.manual_seed(0)
            upgraded = adapter.attach(host, config)
            config_rows = measure(
                label,
                adapter.torchsim_model(upgraded, device="cpu", dtype=torch.float64),
                adapter.ase_calculator(upgraded, device="cpu"),
                start,
                reference,
                args.sizes,
                args.steps,
            )
            ggnd_rows += config_rows
            overhead += [
                {
                    "model": label,
                    "ggnd_config": config.to_dict(),
                    "replicas": plain["replicas"],
                    "torchsim_md_time_ratio": round(
                        plain["torchsim_replica_steps_per_s"] / ggnd["torchsim_replica_steps_per_s"], 3
                    ),
                    "ase_md_time_ratio": round(
                        plain["ase_sequential_replica_steps_per_s"]
                        / ggnd["ase_sequential_replica_steps_per_s"],
                        3,
                    ),
                }
                for plain, ggnd in zip(rows, config_rows, strict=True)
            ]

    by_size = {row["replicas"]: row for row in rows}
    record = {
        "benchmark": "replica throughput: batched TorchSim stability run vs ASE VelocityVerlet one replica at a time",
        "system": "3BPA, 27 atoms, start frames test_300K.xyz; NVE 1 fs; bond criterion evaluated every step (TorchSim)",
        "host_model": "MACE (mace.modules.ScaleShiftMACE, 2 layers, 32x0e+32x1o, max_ell 2, correlation 2, r_max 5 Å, random weights), float64",
        "timed_steps": args.steps,
        "torch_threads": args.threads,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "note": "shared with other jobs while measured; absolute rates are noisy, ratios less so",
        },
        "versions": __import__("ggnd_plugin.md.stability", fromlist=["x"]).package_versions(),
        "results": rows + ggnd_rows,
        "speedup_at_16": by_size.get(16, {}).get("speedup"),
        "target": "TorchSim >= 8x ASE sequential at 16 replicas; GGND <= +15 % MD time at 27 atoms",
        "speedup_target_met": (by_size.get(16, {}).get("speedup") or 0) >= 8,
        "ggnd_target_met": None
        if overhead is None
        else {
            label: all(e["torchsim_md_time_ratio"] <= 1.15 for e in overhead if e["model"] == label)
            for label in ggnd_configs
        },
        "ggnd_overhead": overhead
        if overhead is not None
        else f"not measured: the MACE adapter is not ready ({why_not})",
    }
    from ggnd_plugin.safe_io import atomic_write_text

    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
