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

Writes benchmarks/results/replica_throughput.json.
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
    from e3nn import o3
    from mace import modules

    torch.manual_seed(0)
    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=5.0,
        num_bessel=8,
        num_polynomial_cutoff=5,
        max_ell=2,
        interaction_cls=interaction,
        interaction_cls_first=interaction,
        num_interactions=2,
        num_elements=4,
        hidden_irreps=o3.Irreps("32x0e+32x1o"),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(4),
        avg_num_neighbors=12.0,
        atomic_numbers=[1, 6, 7, 8],
        correlation=2,
        gate=torch.nn.functional.silu,
        atomic_inter_scale=0.01,  # random weights: keep forces small so the short runs stay physical
        atomic_inter_shift=0.0,
    )
    return model.to(dtype).eval()


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=10, help="timed MD steps per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
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
