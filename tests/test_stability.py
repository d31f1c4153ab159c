"""Stability tooling: the criteria on hand-made trajectories, the batched MD loop, resume, outputs, CLI.

The MD tests use a bonded Morse potential on the package's 3BPA frames (27 atoms, the 28 reference
bonds): smooth, cheap, strictly per system, and it dissociates at high temperature, so replicas really
fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import read

from ggnd_plugin.default_data import default_data_path
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md import metrics
from ggnd_plugin.md.reference_models import bonded_morse_model
from ggnd_plugin.md.stability import StabilityProtocol, _ModelRun, build_monitor, plan_replicas, run_stability

TRAIN = default_data_path("3bpa_300K_train")
TEST = default_data_path("3bpa_300K_test")


@pytest.fixture(scope="module")
def reference():
    return read(TRAIN, index=":100")


@pytest.fixture(scope="module")
def start():
    return read(TEST, index=":40")


def BondedMorse(pairs, lengths):  # noqa: N802 - reads as the model it builds
    return bonded_morse_model(pairs, lengths)


@pytest.fixture(scope="module")
def bonds(reference):
    return metrics.reference_bonds(reference)


@pytest.fixture
def morse(bonds):
    return BondedMorse(*bonds)


# -------------------------------------------------------------------------------------------------
# Criteria
# -------------------------------------------------------------------------------------------------


def test_3bpa_has_28_reference_bonds_with_mean_lengths(reference):
    pairs, lengths = metrics.reference_bonds(reference)
    assert len(pairs) == 28
    distances = np.stack([a.get_all_distances() for a in reference])
    assert np.allclose(lengths, distances[:, pairs[:, 0], pairs[:, 1]].mean(0), atol=1e-12)
    assert (distances[:, pairs[:, 0], pairs[:, 1]] < 1.8).all()
    natural, _ = metrics.natural_bonds(reference)
    # covalent radii find the same chemical graph on 3BPA
    assert {tuple(p) for p in natural} == {tuple(p) for p in pairs}


def test_reference_of_mixed_systems_is_refused(reference):
    mixed = [reference[0], Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]])]
    with pytest.raises(GGNDError, match="frame 1 has different atoms"):
        metrics.reference_bonds(mixed)


def _stretched_trajectory(frame, pairs, n_steps=60):
    """Three copies of a frame; copy 0 gets a bond stretched by 1 Å from step 47, copy 1 NaN at step 12."""
    base = torch.as_tensor(frame.get_positions())
    trajectory = base.expand(n_steps, 3, -1, 3).clone()
    i, j = (int(x) for x in pairs[0])
    direction = (base[j] - base[i]) / torch.linalg.vector_norm(base[j] - base[i])
    trajectory[30:47, 0, j] += 0.25 * direction  # below the threshold: must not count
    trajectory[47:, 0, j] += 1.0 * direction
    trajectory[12:, 1, 5] = float("nan")
    return trajectory


def test_bond_criterion_gives_the_exact_failure_step(reference, bonds):
    trajectory = _stretched_trajectory(reference[0], bonds[0])
    monitor = metrics.BondMonitor(*bonds, threshold=0.5)
    assert metrics.first_failures(monitor, trajectory) == [47, 12, None]
    # the deviation itself equals a direct numpy evaluation
    positions = trajectory[50].numpy()
    pairs, lengths = bonds
    direct = np.abs(
        np.linalg.norm(positions[:, pairs[:, 1]] - positions[:, pairs[:, 0]], axis=-1) - lengths
    ).max(-1)
    deviation, decided = monitor.update(50, trajectory[50], None)
    assert decided.all() and np.allclose(deviation[[0, 2]].numpy(), direct[[0, 2]], atol=1e-12)


def _periodic_box(seed=0, n=32, length=7.0):
    generator = np.random.default_rng(seed)
    cell = np.diag([length, length * 1.1, length * 0.95]) + generator.normal(0, 0.3, (3, 3))
    # a jittered lattice: a crystal-like RDF that a scramble visibly changes
    grid = np.stack(np.meshgrid(*[np.arange(4) / 4] * 3, indexing="ij"), -1).reshape(-1, 3)[::2][:n]
    fractional = grid + generator.normal(0, 0.01, grid.shape)
    return Atoms("Ar" * n, scaled_positions=fractional, cell=cell, pbc=True)


def test_rdf_agrees_with_ase():
    from ase.geometry.rdf import get_rdf

    atoms = _periodic_box()
    r_max = metrics.max_rdf_radius(atoms.cell.array) * 0.99
    ours = metrics.rdf(
        torch.as_tensor(atoms.get_positions())[None], torch.as_tensor(atoms.cell.array)[None], r_max, 40
    )[0].numpy()
    ase_rdf, _ = get_rdf(atoms, r_max, 40)
    assert np.allclose(ours, ase_rdf, atol=1e-10)


def test_rdf_criterion_gives_the_failure_sample_of_a_windowed_reference_implementation():
    from ase.geometry.rdf import get_rdf

    atoms = _periodic_box()
    reference = [atoms.copy() for _ in range(3)]
    for k, frame in enumerate(reference):
        frame.rattle(0.02, seed=k)
    every, window, n_bins = 2, 4, 30
    reference_rdf, r_max = metrics.reference_rdf(reference, n_bins=n_bins)
    generator = np.random.default_rng(1)
    frames = []
    for step in range(40):
        frame = atoms.copy()
        frame.rattle(0.02, seed=100 + step)
        if step >= 21:  # melts: atoms scattered uniformly over the cell
            frame.set_scaled_positions(generator.random((len(atoms), 3)))
        frames.append(frame)
    trajectory = torch.as_tensor(np.stack([f.get_positions() for f in frames]))[:, None]
    cell = torch.as_tensor(atoms.cell.array)[None]
    monitor = metrics.RDFMonitor(reference_rdf, r_max, threshold=1.0, every=every, window_samples=window)
    (ours,) = metrics.first_failures(monitor, trajectory, cell)

    # independent: ASE RDFs, mean over the last `window` samples, ∫|Δg| dr, first sample above 1.0
    samples, expected = [], None
    for step in range(0, 40, every):
        samples.append(get_rdf(frames[step], r_max, n_bins)[0])
        if len(samples) >= window:
            distance = np.abs(np.mean(samples[-window:], 0) - reference_rdf).sum() * r_max / n_bins
            if distance > 1.0:
                expected = step
                break
    assert expected is not None and expected > 21
    assert ours == expected


# -------------------------------------------------------------------------------------------------
# The batched MD loop
# -------------------------------------------------------------------------------------------------


def _nve_energy(model, start, reference, timestep_fs, time_ps):
    protocol = StabilityProtocol(
        temperatures=(300.0, 600.0), replicas=2, time_ps=time_ps, timestep_fs=timestep_fs, ensemble="nve"
    )
    result = run_stability({"morse": model}, start, reference, protocol, progress=False)
    assert not any(row["failed"] for row in result.rows)
    n_atoms = len(start[0])
    drifts = [
        abs(np.polyfit(s["time_ps"], s["total_energy_eV"], 1)[0]) / n_atoms for s in result.series.values()
    ]
    spreads = [s["total_energy_eV"].std() / n_atoms for s in result.series.values()]
    return max(drifts), max(spreads)


def test_nve_energy_drift_is_small_and_shrinks_with_the_step(morse, start, reference):
    # measured on the package's 3BPA frames with 1 fs: drift <= 1.4e-5 eV/atom/ps (0.4 meV per molecule
    # per ps), fluctuation of 10 fs window means <= 2.5e-5 eV/atom; with 0.5 fs the fluctuation is 2.2x
    # smaller
    drift, spread = _nve_energy(morse, start, reference, 1.0, 2.0)
    assert drift < 5e-5, f"NVE drift {drift:.2e} eV/atom/ps"
    assert spread < 1e-4
    _, spread_half = _nve_energy(morse, start, reference, 0.5, 1.0)
    assert spread_half < spread / 2, (spread, spread_half)


# Nose-Hoover chains cost ~5x a Langevin step in TorchSim (a Python loop of small ops): marked slow
@pytest.mark.parametrize(
    "ensemble", ["nvt-langevin", pytest.param("nvt-nose-hoover", marks=pytest.mark.slow)]
)
def test_thermostat_reaches_each_replicas_temperature(ensemble, morse, start, reference):
    protocol = StabilityProtocol(
        temperatures=(300.0, 600.0), replicas=6, time_ps=2.0, ensemble=ensemble, nose_hoover_tau_fs=40.0
    )
    result = run_stability({"morse": morse}, start, reference, protocol, progress=False)
    for temperature in protocol.temperatures:
        means = [
            series["temperature_K"][series["time_ps"] > 0.5].mean()
            for key, series in result.series.items()
            if key.split("/")[1] == f"{temperature:g}K"
        ]
        error = abs(np.mean(means) - temperature) / temperature
        assert error < 0.05, f"{ensemble} at {temperature} K: mean {np.mean(means):.1f} K"


def _run_plan(model, plan, start, reference, protocol, checkpoint=None):
    monitor = build_monitor(protocol, reference, start[0])
    run = _ModelRun(
        "m", model, plan, lambda spec: start[spec.start_frame], monitor, protocol, checkpoint, False
    )
    run.start()
    run.run()
    return run


@pytest.mark.parametrize("ensemble", ["nve", pytest.param("nvt-nose-hoover", marks=pytest.mark.slow)])
def test_a_batch_gives_the_same_trajectories_as_each_replica_alone(ensemble, morse, start, reference):
    # 4000 K: some replicas fail on the way, so removal from the batch is part of what is compared
    protocol = StabilityProtocol(temperatures=(300.0, 4000.0), replicas=2, time_ps=0.5, ensemble=ensemble)
    plan = plan_replicas(protocol, {t: len(start) for t in protocol.temperatures})
    batched = _run_plan(morse, plan, start, reference, protocol)
    assert any(row["failed"] for row in batched.rows()), "the test needs a failing replica"
    for index, spec in enumerate(plan):
        alone = _run_plan(morse, [spec], start, reference, protocol)
        assert alone.rows()[0]["failure_step"] == batched.rows()[index]["failure_step"]
        for name in ("max_deviation", "total_energy_eV", "temperature_K"):
            assert np.allclose(alone.series[0][name], batched.series[index][name], rtol=1e-9, atol=1e-9), name


def test_a_nan_in_one_replica_leaves_the_others_untouched(bonds, start, reference):
    protocol = StabilityProtocol(temperatures=(300.0,), replicas=3, time_ps=0.1, ensemble="nvt-langevin")
    clean = run_stability({"m": BondedMorse(*bonds)}, start, reference, protocol, progress=False)

    poisoned = BondedMorse(*bonds)
    forward = poisoned.forward

    def forward_with_nan(state, **kwargs):
        output = forward(state, **kwargs)
        if poisoned.calls == 41:  # call 0 is the initial force evaluation: this is step 40
            atoms = state.system_idx == 1
            output["forces"][atoms] = float("nan")
        return output

    poisoned.forward = forward_with_nan
    hit = run_stability({"m": poisoned}, start, reference, protocol, progress=False)
    assert (
        hit.rows[1]["failed"] and hit.rows[1]["failure"] == "non-finite" and hit.rows[1]["failure_step"] == 40
    )
    # Langevin noise is one stream for the batch, so the others match only while the batch is whole:
    # up to step 40 exactly, and they go on stable and finite afterwards
    for index in (0, 2):
        assert not hit.rows[index]["failed"]
        key = f"m/300K/{index}"
        for name in ("max_deviation", "total_energy_eV"):
            assert np.array_equal(hit.series[key][name][:4], clean.series[key][name][:4])
            assert np.isfinite(hit.series[key][name]).all()


def test_a_nan_in_one_nve_replica_leaves_the_others_bit_identical(bonds, start, reference):
    protocol = StabilityProtocol(temperatures=(300.0,), replicas=3, time_ps=0.1, ensemble="nve")
    clean = run_stability({"m": BondedMorse(*bonds)}, start, reference, protocol, progress=False)
    poisoned = BondedMorse(*bonds)
    forward = poisoned.forward

    def forward_with_nan(state, **kwargs):
        output = forward(state, **kwargs)
        if poisoned.calls == 41:
            output["energy"][0] = float("nan")
        return output

    poisoned.forward = forward_with_nan
    hit = run_stability({"m": poisoned}, start, reference, protocol, progress=False)
    assert hit.rows[0]["failure"] == "non-finite" and hit.rows[0]["failure_step"] == 40
    assert hit.rows[0]["stability_ps"] == pytest.approx(0.04)
    for index in (1, 2):
        key = f"m/300K/{index}"
        for name in ("max_deviation", "total_energy_eV", "temperature_K"):
            assert np.allclose(hit.series[key][name], clean.series[key][name], rtol=1e-12, atol=1e-12)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("ensemble", ["nvt-langevin", "nvt-nose-hoover"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(ensemble, bonds, start, reference, tmp_path):
    protocol = StabilityProtocol(
        temperatures=(300.0, 4000.0), replicas=3, time_ps=0.6, ensemble=ensemble, checkpoint_every_steps=100
    )
    whole = run_stability(
        {"m": BondedMorse(*bonds)}, start, reference, protocol, tmp_path / "a", progress=False
    )

    stopping = BondedMorse(*bonds)
    forward = stopping.forward

    def forward_then_stop(state, **kwargs):
        if stopping.calls == 350:
            raise _Stop
        return forward(state, **kwargs)

    stopping.forward = forward_then_stop
    with pytest.raises(_Stop):
        run_stability({"m": stopping}, start, reference, protocol, tmp_path / "b", progress=False)
    checkpoint = torch.load(tmp_path / "b" / "checkpoints" / "m.pt", weights_only=False)
    assert checkpoint["step"] == 300 and not checkpoint["finished"]
    with pytest.raises(GGNDError, match="--resume"):
        run_stability({"m": BondedMorse(*bonds)}, start, reference, protocol, tmp_path / "b", progress=False)
    changed = StabilityProtocol(**{**protocol.__dict__, "threshold": 0.4})
    with pytest.raises(GGNDError, match="different protocol"):
        run_stability(
            {"m": BondedMorse(*bonds)}, start, reference, changed, tmp_path / "b", resume=True, progress=False
        )

    resumed = run_stability(
        {"m": BondedMorse(*bonds)}, start, reference, protocol, tmp_path / "b", resume=True, progress=False
    )
    assert any(row["failed"] for row in whole.rows)
    assert resumed.rows == whole.rows
    for key, series in whole.series.items():
        for name, values in series.items():
            assert np.array_equal(resumed.series[key][name], values), (key, name)


def test_failed_replicas_leave_the_batch(bonds, start, reference):
    model = BondedMorse(*bonds)
    sizes = []
    forward = model.forward

    def recording_forward(state, **kwargs):
        sizes.append(state.n_systems)
        return forward(state, **kwargs)

    model.forward = recording_forward
    protocol = StabilityProtocol(temperatures=(300.0, 4000.0), replicas=2, time_ps=0.5)
    result = run_stability({"m": model}, start, reference, protocol, progress=False)
    failures = sorted(row["failure_step"] for row in result.rows if row["failed"])
    assert failures, "the test needs a failing replica"
    # the model sees one system fewer right after each failure step, never the failed replica again
    for step in failures:
        assert sizes[step + 1] < sizes[step]
    assert sum(sizes[1:]) == sum(
        row["failure_step"] if row["failed"] else protocol.n_steps for row in result.rows
    )


def test_periodic_runs_use_the_rdf_criterion(start, reference):
    from ase.build import bulk
    from torch_sim.models.lennard_jones import LennardJonesModel

    crystal = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)  # 32 atoms, r_max = 5.26 Å
    frames = []
    for seed in range(8):
        frame = crystal.copy()
        frame.rattle(0.08, seed=seed)
        frames.append(frame)
    model = LennardJonesModel(
        sigma=3.405, epsilon=0.0104, cutoff=5.0, dtype=torch.float64, compute_stress=False
    )
    protocol = StabilityProtocol(
        temperatures=(20.0, 3000.0),
        replicas=2,
        time_ps=0.4,
        timestep_fs=2.0,
        rdf_window_ps=0.1,
        rdf_every_steps=5,
        rdf_bins=30,
    )
    result = run_stability({"lj": model}, frames, frames, protocol, progress=False)
    assert (
        result.protocol["monitor"]["criterion"] == "rdf"
        and result.protocol["monitor"]["window_samples"] == 10
    )
    cold, hot = result.rows[:2], result.rows[2:]
    assert not any(row["failed"] for row in cold) and all(row["max_deviation"] < 1.0 for row in cold)
    # argon at 3000 K melts at once: decided at the first full window (10 samples, steps 0..45)
    assert all(row["failure"] == "rdf" and row["failure_step"] == 45 for row in hot)
    with pytest.raises(GGNDError, match="bond criterion is for molecules"):
        run_stability(
            {"lj": model}, frames, frames, StabilityProtocol(criterion="bonds", time_ps=0.01), progress=False
        )


# -------------------------------------------------------------------------------------------------
# Outputs and command line
# -------------------------------------------------------------------------------------------------


def test_outputs_are_written_and_consistent(morse, start, reference, tmp_path):
    from ggnd_plugin.md.report import load_timeseries, write_results

    protocol = StabilityProtocol(temperatures=(300.0, 4000.0), replicas=2, time_ps=0.3)
    result = run_stability(
        {"morse": morse}, start, reference, protocol, progress=False, sources={"start": "test_300K"}
    )
    paths = write_results(result, tmp_path)
    record = json.loads(paths["results.json"].read_text())
    assert record["protocol"]["ensemble"] == "nve" and record["protocol"]["monitor"]["n_bonds"] == 28
    assert "torch-sim-atomistic" in record["protocol"]["versions"]
    assert len(record["replicas"]) == 4
    for row in record["replicas"]:
        assert set(row) >= {
            "model",
            "temperature_K",
            "replica",
            "seed",
            "stability_ps",
            "failed",
            "max_deviation_A",
        }
        assert (row["stability_ps"] < 0.3) == row["failed"]
    csv_rows = paths["results.csv"].read_text().strip().splitlines()
    assert len(csv_rows) == 5 and csv_rows[0].endswith("max_deviation_A")
    assert "NVE, 1.0 fs step, 0.3 ps horizon" in paths["summary.md"].read_text()
    series = load_timeseries(paths["timeseries.npz"])
    assert set(series) == set(result.series)
    for name in ("max_bond_deviation.png", "survival.png"):
        assert paths[name].stat().st_size > 5000


def test_same_seed_same_plan_different_seed_different_plan():
    protocol = StabilityProtocol(temperatures=(300.0, 600.0), replicas=4, seed=3)
    plan = plan_replicas(protocol, {300.0: 100, 600.0: 100})
    assert plan == plan_replicas(protocol, {300.0: 100, 600.0: 100})
    assert len({spec.seed for spec in plan}) == 8
    # adding a temperature leaves the others' replicas as they were
    wider = plan_replicas(
        StabilityProtocol(temperatures=(300.0, 600.0, 1200.0), replicas=4, seed=3),
        {300.0: 100, 600.0: 100, 1200.0: 100},
    )
    assert wider[:8] == plan
    other = plan_replicas(
        StabilityProtocol(temperatures=(300.0, 600.0), replicas=4, seed=4), {300.0: 100, 600.0: 100}
    )
    assert [s.seed for s in other] != [s.seed for s in plan]


class _MorseAdapter:
    """Just enough of a host adapter for the command line: a file holding the Morse parameters."""

    name = "morse"

    def load(self, path, device="cpu"):
        return torch.load(path, weights_only=False)

    def check_structures(self, model, structures, source):
        pass

    def torchsim_model(self, model, device="cpu", dtype=torch.float64):
        return BondedMorse(model["pairs"], model["lengths"])


def test_command_line_end_to_end(bonds, tmp_path, monkeypatch, capsys):
    from ggnd_plugin import registry
    from ggnd_plugin.cli import main

    monkeypatch.setattr(registry, "resolve", lambda host, path: _MorseAdapter())
    model_file = tmp_path / "bonded.pt"
    torch.save({"pairs": bonds[0], "lengths": bonds[1]}, model_file)
    arguments = [
        "stability",
        str(model_file),
        "--start",
        str(TEST),
        "--reference",
        str(TRAIN),
        "--temperature",
        "300",
        "3000",
        "--replicas",
        "2",
        "--time-ps",
        "0.2",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--checkpoint-every",
        "100",
    ]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "MD stability" in out and "bonded" in out
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["protocol"]["model_files"] == {"bonded": str(model_file)}
    assert len(record["replicas"]) == 4
    # a second run into the same directory must be asked for explicitly
    assert main(arguments) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*arguments, "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["replicas"] == record["replicas"]
    # bad input: one error line, exit 2
    assert main([*arguments[:4], str(TEST), str(default_data_path("3bpa_600K")), *arguments[4:]]) == 2
    assert "one file or one per temperature" in capsys.readouterr().err


def test_runs_a_real_mace_host_through_its_torchsim_wrapper(start, reference):
    """MACE's own TorchSim model (what the MACE adapter hands over) runs in the batched loop."""
    pytest.importorskip("mace")
    from torch_sim.models.mace import MaceModel

    from ggnd_plugin.testing import tiny_mace

    host = tiny_mace(
        num_interactions=1,
        atomic_energies=np.zeros(4),
        avg_num_neighbors=10.0,
        correlation=1,
        atomic_inter_scale=0.01,
    )
    model = MaceModel(host.double(), device=torch.device("cpu"), dtype=torch.float64, compute_stress=False)
    protocol = StabilityProtocol(temperatures=(300.0, 600.0), replicas=2, time_ps=0.01)
    result = run_stability({"mace": model}, start, reference, protocol, progress=False)
    assert len(result.rows) == 4
    for series in result.series.values():
        assert len(series["time_ps"]) == 1 and np.isfinite(series["total_energy_eV"]).all()


def test_survival_plot_draws_only_the_models_run_at_each_temperature(tmp_path, monkeypatch):
    """A model run at 1200 K only gets no curve at 300 K (not a line at zero), and each curve is the
    fraction of its replicas that had not failed by then."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from ggnd_plugin.md import plots
    from ggnd_plugin.md.stability import StabilityResult

    rows = [
        {"model": "a", "temperature_K": 300.0, "replica": i, "stability_ps": 2.0, "failed": False}
        for i in range(4)
    ]
    rows += [
        {"model": m, "temperature_K": 1200.0, "replica": i, "stability_ps": t, "failed": t < 2.0}
        for m, times in (("a", (0.5, 1.5, 2.0, 2.0)), ("b", (1.0, 2.0, 2.0, 2.0)))
        for i, t in enumerate(times)
    ]
    result = StabilityResult(protocol={"time_ps": 2.0}, rows=rows, series={})
    captured = {}
    original = plt.Figure.savefig

    def keep(figure, *args, **kwargs):
        captured["figure"] = figure
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    plots.plot_survival(result, tmp_path / "survival.png")
    axis300, axis1200 = captured["figure"].axes
    assert [line.get_label() for line in axis300.get_lines()] == ["a"]
    curves = {line.get_label(): line for line in axis1200.get_lines()}
    assert set(curves) == {"a", "b"}
    times, alive = curves["a"].get_data()
    assert np.interp(1.0, times, alive) == pytest.approx(0.75)  # one of four failed at 0.5 ps
    assert np.interp(1.9, times, alive) == pytest.approx(0.5)
    assert curves["a"].get_color() == axis300.get_lines()[0].get_color()
    assert (tmp_path / "survival.png").stat().st_size > 0
