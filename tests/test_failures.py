"""Failure frames and causes: the classes on constructed frames, the ring buffer on real runs, outputs.

Runs use the bonded Morse control potential on the package's own 3BPA frames (27 atoms, 28 reference
bonds): it breaks bonds at a few thousand kelvin within tens of femtoseconds, so replicas really fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.data import atomic_masses, covalent_radii
from ase.io import read

from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md import failures
from ggnd_plugin.md.failure_frames import FailureFrames
from ggnd_plugin.md.metrics import reference_bonds
from ggnd_plugin.md.reference_models import bonded_morse_model
from ggnd_plugin.md.stability import Batching, StabilityProtocol, run_stability

DATA = Path(__file__).resolve().parents[1] / "ggnd_plugin" / "default_data" / "3bpa"


@pytest.fixture(scope="module")
def reference():
    return read(DATA / "3bpa_300K_train.xyz", index=":50")


@pytest.fixture(scope="module")
def start():
    return read(DATA / "3bpa_300K_test.xyz", index=":20")


@pytest.fixture(scope="module")
def bonds(reference):
    return reference_bonds(reference)


@pytest.fixture(scope="module")
def context(bonds):
    return failures.FailureContext("bonds", 0.5, *bonds)


def _frames(atoms, positions, momenta=None, forces=None, energy=None):
    """A replica's frames dict (as the run keeps them) from a list of positions, the last one failing."""
    n = len(positions)
    shape = (n, len(atoms), 3)
    return {
        "steps": np.arange(n) * 10,
        "positions": np.asarray(positions, dtype=float),
        "momenta": np.zeros(shape) if momenta is None else np.asarray(momenta, dtype=float),
        "forces": np.ones(shape) if forces is None else np.asarray(forces, dtype=float),
        "energy": np.zeros(n) if energy is None else np.asarray(energy, dtype=float),
        "numbers": atoms.get_atomic_numbers(),
        "cell": np.asarray(atoms.cell.array, dtype=float),
        "pbc": np.asarray(atoms.pbc, dtype=bool),
    }


def _terminal_hydrogen_bond(atoms, pairs):
    numbers = atoms.get_atomic_numbers()
    for k, (i, j) in enumerate(pairs):
        if numbers[j] == 1 and numbers[i] == 6:
            return k, int(i), int(j)
    raise AssertionError("3BPA has C-H bonds")


# -------------------------------------------------------------------------------------------------
# Causes, on constructed frames
# -------------------------------------------------------------------------------------------------


def test_two_hydrogens_driven_together_are_a_close_contact(reference, context):
    atoms = reference[0]
    positions = atoms.get_positions()
    hydrogens = np.flatnonzero(atoms.numbers == 1)
    a, b = int(hydrogens[2]), int(hydrogens[5])
    moved = positions.copy()
    moved[b] = moved[a] + np.array([0.28, 0.0, 0.0])
    forces = np.ones((2, len(atoms), 3))
    forces[1, a] = [500.0, 0, 0]
    cause = failures.classify(_frames(atoms, [positions, moved], forces=forces), "bonds", context)
    assert cause["cause"] == "close-contact" and sorted(cause["atoms"]) == sorted([a, b])
    assert cause["values"]["distance_A"] == pytest.approx(0.28, abs=1e-12)
    # the closest pair relative to covalent radii, by brute force over all pairs
    distances = np.linalg.norm(moved[:, None] - moved[None], axis=-1)
    radii = covalent_radii[atoms.numbers]
    ratio = distances / (radii[:, None] + radii[None]) + np.eye(len(atoms)) * 10
    assert cause["values"]["covalent_ratio"] == pytest.approx(ratio.min(), abs=1e-12)
    assert cause["max_force_eV_A"] == pytest.approx(500.0) and cause[
        "previous_max_force_eV_A"
    ] == pytest.approx(3**0.5)
    assert "H" in cause["detail"] and "0.28 Å" in cause["detail"]


def test_untouched_3bpa_frames_have_no_close_contact(reference):
    """The 0.7 threshold has a margin: no pair of the xTB data at 300 K or 1200 K comes below 0.8."""
    hot = read(DATA / "3bpa_1200K.xyz", index=":")
    for atoms in [*reference[:20], *hot]:
        assert failures.close_contact(_frames(atoms, [atoms.get_positions()]), 0, factor=0.8) is None


def test_a_hydrogen_leaving_its_carbon_is_fragmentation(reference, bonds, context):
    atoms = reference[0]
    k, carbon, hydrogen = _terminal_hydrogen_bond(atoms, bonds[0])
    positions = atoms.get_positions()
    axis = positions[hydrogen] - positions[carbon]
    axis /= np.linalg.norm(axis)
    moved = positions.copy()
    moved[hydrogen] = positions[carbon] + (bonds[1][k] + 0.6) * axis
    momenta = np.zeros((2, len(atoms), 3))
    momenta[1, hydrogen] = atomic_masses[1] * 0.1 / units.fs * axis  # 0.1 Å/fs outwards
    cause = failures.classify(_frames(atoms, [positions, moved], momenta=momenta), "bonds", context)
    assert cause["cause"] == "fragmentation" and cause["atoms"] == [hydrogen]
    assert cause["values"]["broken_bonds"] == [[carbon, hydrogen]]
    assert f"C{carbon}-H{hydrogen}" in cause["detail"] and "lengthening at +0.100 Å/fs" in cause["detail"]


def test_the_rate_uses_the_run_s_masses(reference, bonds, context):
    """A deuterium leaving at 0.1 Å/fs: with the run's masses (2.014 amu) in the frames the rate is
    0.1 Å/fs; ASE's default hydrogen mass would make it twice that."""
    atoms = reference[0]
    k, carbon, hydrogen = _terminal_hydrogen_bond(atoms, bonds[0])
    positions = atoms.get_positions()
    axis = (positions[hydrogen] - positions[carbon]) / np.linalg.norm(positions[hydrogen] - positions[carbon])
    moved = positions.copy()
    moved[hydrogen] = positions[carbon] + (bonds[1][k] + 0.6) * axis
    masses = atoms.get_masses()
    masses[hydrogen] = 2.014
    momenta = np.zeros((2, len(atoms), 3))
    momenta[1, hydrogen] = 2.014 * 0.1 / units.fs * axis
    frames = {**_frames(atoms, [positions, moved], momenta=momenta), "masses": masses}
    assert "lengthening at +0.100 Å/fs" in failures.classify(frames, "bonds", context)["detail"]
    del frames["masses"]  # frames kept before masses were recorded: ASE's defaults
    assert "lengthening at +0.200 Å/fs" in failures.classify(frames, "bonds", context)["detail"]


def test_in_a_cluster_only_the_piece_that_left_its_molecule_is_named():
    """Water and ammonia, apart: the bond graph has two pieces before anything breaks; one O-H of the
    water stretched to 2 Å: only that hydrogen left (neither the rest of the water nor the ammonia)."""
    from ase.build import molecule

    water, ammonia = molecule("H2O"), molecule("NH3")
    ammonia.translate([6.0, 0, 0])
    cluster = water + ammonia
    pairs, lengths = reference_bonds([cluster])
    context = failures.FailureContext("bonds", 0.5, pairs, lengths)
    positions = cluster.get_positions()
    axis = (positions[1] - positions[0]) / np.linalg.norm(positions[1] - positions[0])
    moved = positions.copy()
    moved[1] = positions[0] + 2.0 * axis
    cause = failures.classify(_frames(cluster, [positions, moved]), "bonds", context)
    assert cause["cause"] == "fragmentation" and cause["atoms"] == [1] and cause["values"]["fragments"] == 1
    assert cause["detail"].startswith("H (H1) left: O0-H1 at 2.00 Å")


def test_a_bond_failure_at_the_threshold_still_names_its_bond(reference, bonds, context):
    """The criterion runs in the model's dtype; a float32 deviation just beyond Δ can come out at Δ in
    float64: the failure still names the bond of largest deviation."""
    atoms = reference[0]
    pairs, lengths = bonds
    positions = atoms.get_positions()
    k, carbon, hydrogen = _terminal_hydrogen_bond(atoms, pairs)
    axis = (positions[hydrogen] - positions[carbon]) / np.linalg.norm(positions[hydrogen] - positions[carbon])
    moved = positions.copy()
    moved[hydrogen] = positions[carbon] + (lengths[k] + 0.49) * axis
    cause = failures.classify(_frames(atoms, [positions, moved]), "bonds", context)
    deviation = np.abs(np.linalg.norm(moved[pairs[:, 1]] - moved[pairs[:, 0]], axis=-1) - lengths)
    assert cause["cause"] == "bond-stretch"
    assert cause["atoms"] == [int(a) for a in pairs[np.argmax(deviation)]] == [carbon, hydrogen]


def test_a_ring_bond_stretched_is_bond_stretch(reference, bonds, context):
    """A ring bond beyond the threshold leaves the molecule in one piece."""
    atoms = reference[0]
    pairs, lengths = bonds
    numbers = atoms.get_atomic_numbers()
    positions = atoms.get_positions()
    for k, (i, j) in enumerate(pairs):
        others = np.delete(pairs, k, axis=0)
        if numbers[i] == 6 and numbers[j] == 6 and len(np.unique(failures._components(27, others))) == 1:
            break
    i, j = int(pairs[k, 0]), int(pairs[k, 1])
    axis = (positions[j] - positions[i]) / np.linalg.norm(positions[j] - positions[i])
    moved = positions.copy()
    moved[j] += 0.7 * axis
    cause = failures.classify(_frames(atoms, [positions, moved]), "bonds", context)
    deviation = np.abs(np.linalg.norm(moved[pairs[:, 1]] - moved[pairs[:, 0]], axis=-1) - lengths)
    assert cause["cause"] == "bond-stretch" and cause["atoms"] == [
        int(a) for a in pairs[np.argmax(deviation)]
    ]
    assert cause["values"]["bond_type"] == "C-C"
    assert cause["values"]["length_A"] - cause["values"]["reference_A"] == pytest.approx(deviation.max())


def test_non_finite_names_the_atoms_and_what_the_last_finite_geometry_shows(reference, context):
    atoms = reference[0]
    positions = atoms.get_positions()
    hydrogens = np.flatnonzero(atoms.numbers == 1)
    moved = positions.copy()
    moved[hydrogens[1]] = moved[hydrogens[0]] + [0.3, 0, 0]
    forces = np.ones((2, len(atoms), 3))
    forces[1, [3, 8]] = np.nan
    cause = failures.classify(_frames(atoms, [positions, moved], forces=forces), "non-finite", context)
    assert cause["cause"] == "non-finite" and cause["atoms"] == [3, 8]
    assert cause["geometry"]["cause"] == "close-contact" and cause["geometry"]["step"] == 10
    energy_only = failures.classify(
        _frames(atoms, [positions, positions], energy=[0.0, np.nan]), "non-finite", context
    )
    assert energy_only["detail"].startswith("non-finite energy") and energy_only["geometry"] is None


def test_a_failure_without_a_finite_frame_is_named_but_writes_no_frames_or_plot(reference, context, tmp_path):
    """--failure-frames 0 (or a resume from before frames were kept) and a failing step whose positions
    already overflowed: the cause is named, no frame file or plot is promised, nothing raises."""
    from ggnd_plugin.md.failure_report import markdown_lines, write_failures
    from ggnd_plugin.md.protocol import StabilityResult
    from ggnd_plugin.md.report import public_rows

    atoms = reference[0]
    positions = atoms.get_positions()
    positions[3] = np.nan
    forces = np.ones((1, len(atoms), 3))
    forces[0, 3] = np.nan
    frames = _frames(atoms, [positions], forces=forces, energy=[np.nan])
    row = dict(model="m", temperature_K=1200.0, replica=0, seed=0, start_frame=0, stability_ps=0.007)
    row.update(failed=True, failure="non-finite", failure_step=7, max_deviation=None)
    result = StabilityResult(
        protocol={"timestep_fs": 1.0, "monitor": {"criterion": "bonds"}},
        rows=[row],
        failures={failures.failure_key(row): {"frames": frames}},
    )
    failures.name_causes(result, context)
    assert row["cause"] == "non-finite" and row["cause_atoms"] == [3]
    assert write_failures(result, tmp_path, plots=True) == {}
    assert not (tmp_path / "failures").exists()
    assert public_rows(result)[0]["failure_frames"] is None
    assert not any(".png" in line for line in markdown_lines(result, plots=True))


def test_periodic_failures_are_rdf_unless_two_atoms_meet_across_the_cell():
    crystal = Atoms(
        "Ar4",
        scaled_positions=[[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
        cell=[5.3] * 3,
        pbc=True,
    )
    rdf = failures.FailureContext("rdf", 1.0)
    cause = failures.classify(_frames(crystal, [crystal.get_positions()]), "rdf", rdf, max_deviation=1.7)
    assert cause["cause"] == "rdf" and "1.70 > 1" in cause["detail"]
    positions = crystal.get_positions()
    positions[1] = [5.25, 0.0, 0.3]  # 0.05 Å from atom 0 in x through the boundary: 0.30 Å apart
    cause = failures.classify(_frames(crystal, [positions]), "rdf", rdf, max_deviation=1.7)
    crystal.set_positions(positions)
    assert cause["cause"] == "close-contact" and cause["atoms"] == [0, 1]
    assert cause["values"]["distance_A"] == pytest.approx(crystal.get_distance(0, 1, mic=True), abs=1e-12)


# -------------------------------------------------------------------------------------------------
# Frames of real failures
# -------------------------------------------------------------------------------------------------
HOT = StabilityProtocol(temperatures=(3000.0,), replicas=6, time_ps=0.3, checkpoint_every_steps=50)


def _morse(bonds):
    return bonded_morse_model(*bonds, depth_eV=2.5)


def test_failed_replicas_keep_their_last_frames(bonds, start, reference):
    every = run_stability(
        {"m": _morse(bonds)}, start, reference, HOT, progress=False, failure_frames=FailureFrames(400, 1)
    )
    sparse = run_stability(
        {"m": _morse(bonds)}, start, reference, HOT, progress=False, failure_frames=FailureFrames(3, 4)
    )
    alone = run_stability(
        {"m": _morse(bonds)},
        start,
        reference,
        HOT,
        progress=False,
        failure_frames=FailureFrames(3, 4),
        batching=Batching("binning", 27),  # one replica per batch
    )

    # keeping frames changes nothing else (the force on "the frame before" depends on the spacing)
    def without_forces(rows):
        return [{**row, "cause_detail": (row["cause_detail"] or "").split("; max force")[0]} for row in rows]

    assert without_forces(sparse.rows) == without_forces(every.rows)
    failed = [row for row in sparse.rows if row["failed"]]
    assert len(failed) >= 3 and {row["cause"] for row in failed} >= {"fragmentation", "close-contact"}
    pairs, lengths = bonds
    for row in failed:
        key = failures.failure_key(row)
        step = row["failure_step"]
        kept = sparse.failures[key]["frames"]
        assert kept["steps"].tolist() == [*list(range(0, step, 4))[-3:], step]
        # the same states as the run that kept every step
        full = every.failures[key]["frames"]
        assert full["steps"].tolist() == list(range(step + 1))
        for name in ("positions", "momenta", "forces", "energy"):
            assert np.array_equal(kept[name], full[name][kept["steps"]]), name
            assert np.allclose(alone.failures[key]["frames"][name], kept[name], rtol=1e-9, atol=1e-9), name
        # the last frame is the failing step's state: the criterion is beyond Δ there, at its recorded value
        last = kept["positions"][-1]
        deviation = np.abs(np.linalg.norm(last[pairs[:, 1]] - last[pairs[:, 0]], axis=-1) - lengths).max()
        assert deviation == pytest.approx(row["max_deviation"], abs=1e-12) and deviation > 0.5
        assert sparse.failures[key]["cause"]["cause"] == row["cause"]


class _Stop(Exception):
    pass


def test_resume_keeps_the_frames_of_replicas_in_flight(bonds, start, reference, tmp_path):
    settings = FailureFrames(5, 7)
    whole = run_stability(
        {"m": _morse(bonds)}, start, reference, HOT, tmp_path / "a", progress=False, failure_frames=settings
    )
    stopping = _morse(bonds)
    forward = stopping.forward

    def forward_then_stop(state, **kwargs):
        if stopping.calls == 110:
            raise _Stop
        return forward(state, **kwargs)

    stopping.forward = forward_then_stop
    with pytest.raises(_Stop):
        run_stability(
            {"m": stopping}, start, reference, HOT, tmp_path / "b", progress=False, failure_frames=settings
        )
    with pytest.raises(GGNDError, match="other failure-frame settings"):
        run_stability(
            {"m": _morse(bonds)}, start, reference, HOT, tmp_path / "b", resume=True, progress=False
        )
    resumed = run_stability(
        {"m": _morse(bonds)},
        start,
        reference,
        HOT,
        tmp_path / "b",
        resume=True,
        progress=False,
        failure_frames=settings,
    )
    late = [row for row in whole.rows if row["failed"] and row["failure_step"] > 100]
    assert late, "the test needs a replica that fails after the stop"
    assert resumed.rows == whole.rows
    assert set(resumed.failures) == set(whole.failures)
    for key, entry in whole.failures.items():
        for name, values in entry["frames"].items():
            assert np.array_equal(resumed.failures[key]["frames"][name], values), (key, name)


def test_a_checkpoint_from_before_failure_frames_still_resumes(bonds, start, reference, tmp_path):
    """Version-2 checkpoints written before failure frames: no settings, no rings; they resume."""
    stopping = _morse(bonds)
    forward = stopping.forward

    def forward_then_stop(state, **kwargs):
        if stopping.calls == 60:
            raise _Stop
        return forward(state, **kwargs)

    stopping.forward = forward_then_stop
    with pytest.raises(_Stop):
        run_stability({"m": stopping}, start, reference, HOT, tmp_path, progress=False)
    path = tmp_path / "checkpoints" / "m.pt"
    payload = torch.load(path, weights_only=False)
    del payload["failure_frames"]
    for entry in payload["entries"].values():
        entry.pop("frames", None)
        entry.pop("failure_frames", None)
    from ggnd_plugin.safe_io import atomic_torch_save

    atomic_torch_save(payload, path)
    resumed = run_stability(
        {"m": _morse(bonds)}, start, reference, HOT, tmp_path, resume=True, progress=False
    )
    whole = run_stability({"m": _morse(bonds)}, start, reference, HOT, progress=False)
    assert [row["failure_step"] for row in resumed.rows] == [row["failure_step"] for row in whole.rows]
    for row in resumed.rows:
        if row["failed"] and row["failure_step"] > 50:  # in flight at the stop: frames from the resume on
            steps = resumed.failures[failures.failure_key(row)]["frames"]["steps"]
            assert steps[-1] == row["failure_step"] and steps[0] >= 50


# -------------------------------------------------------------------------------------------------
# Outputs
# -------------------------------------------------------------------------------------------------


def test_every_output_names_the_failures(bonds, start, reference, tmp_path):
    from ggnd_plugin.md.report import write_results

    result = run_stability({"m": _morse(bonds)}, start, reference, HOT, progress=False)
    paths = write_results(result, tmp_path)
    failed = [row for row in result.rows if row["failed"]]
    record = json.loads(paths["results.json"].read_text())
    assert record["protocol"]["failure_frames"] == {"count": 10, "every_steps": 10}
    for row, public in zip(result.rows, record["replicas"], strict=True):
        assert public["cause"] == row["cause"] and public["cause_detail"] == row["cause_detail"]
        assert (public["failure_frames"] is not None) == row["failed"]
    counts = record["failure_causes"][0]
    assert sum(counts[cause] for cause in failures.CAUSES) == counts["failed"] == len(failed)
    csv_rows = paths["results.csv"].read_text().splitlines()
    assert "cause,cause_atoms,cause_detail,failure_frames" in csv_rows[0]
    summary = paths["summary.md"].read_text()
    assert "## Failure causes" in summary and all(row["cause_detail"] in summary for row in failed)
    for row in failed:
        frames = read(tmp_path / f"failures/m/3000K/replica_{row['replica']}.extxyz", index=":")
        kept = result.failures[failures.failure_key(row)]["frames"]
        assert [a.info["step"] for a in frames] == kept["steps"].tolist()
        assert frames[-1].info["failing"] and not frames[0].info["failing"]
        assert frames[-1].info["time_ps"] == pytest.approx(row["stability_ps"])
        for key in ("model", "temperature_K", "replica", "seed", "start_frame", "cause"):
            assert frames[-1].info[key] == row[key]
        assert np.allclose(frames[-1].get_positions(), kept["positions"][-1], atol=1e-7)
        assert np.allclose(frames[-1].arrays["model_forces"], kept["forces"][-1], atol=1e-7)
        assert frames[-1].calc is None  # no model prediction stored as a label
    for cause in {row["cause"] for row in failed}:
        assert (tmp_path / "failures" / f"{cause}.png").stat().st_size > 5000
    # a later write of a run without those failures leaves none of their files behind
    result.rows = [dict(row, failed=False) for row in result.rows]
    write_results(result, tmp_path)
    assert not list((tmp_path / "failures").rglob("*.extxyz")) and not list(
        (tmp_path / "failures").glob("*.png")
    )
