"""Reference data the project makes itself (ggnd_plugin.reference, `ggnd data`) and the shipped 3BPA set.

The generation tests run GFN2-xTB MD of methanol (6 atoms) for a few hundred 0.5 fs steps, so labels,
determinism and resume are checked on real tblite output in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ggnd_plugin.data import read_labelled
from ggnd_plugin.errors import GGNDError

SMALL = dict(
    smiles="CO",
    temperatures_K=(300.0, 600.0),
    frames=(6, 4),
    name="meoh",
    spacing_fs=10.0,
    timestep_fs=0.5,
    equilibration_ps=0.02,
    split_train=4,
)
SMALL_FILES = ["meoh_300K_train.xyz", "meoh_300K_test.xyz", "meoh_600K.xyz"]


def _needs_xtb():
    pytest.importorskip("tblite.ase")
    pytest.importorskip("rdkit")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    _needs_xtb()
    from ggnd_plugin.reference import GenerationSettings, generate

    out = tmp_path_factory.mktemp("small") / "run"
    result = generate(GenerationSettings(**SMALL), out, show_progress=False)
    return result


def _plain_tblite():
    # tblite's own calculator, not ours, so the check does not share our code path.
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def test_files_are_labelled_extxyz_with_metadata(small_run):
    from ggnd_plugin.reference import package_versions

    assert [p.name for p in small_run.files] == SMALL_FILES
    assert small_run.frame_counts == {SMALL_FILES[0]: 4, SMALL_FILES[1]: 2, SMALL_FILES[2]: 4}
    times = []
    for path, temperature in zip(small_run.files, (300.0, 300.0, 600.0), strict=True):
        frames = read_labelled(path)
        assert len(frames) == small_run.frame_counts[path.name]
        for atoms in frames:
            assert atoms.get_chemical_formula() == "CH4O"
            assert atoms.info["temperature_K"] == temperature
            assert atoms.info["method"] == "GFN2-xTB"
            assert atoms.arrays["forces"].shape == (6, 3)
        times.append([a.info["time_fs"] for a in frames])
    # Equilibration (20 fs) is not written; frames follow every 10 fs; the split keeps the order.
    assert sorted(times[0] + times[1]) == [30.0, 40.0, 50.0, 60.0, 70.0, 80.0]
    assert times[0] == sorted(times[0]) and times[2] == [30.0, 40.0, 50.0, 60.0]
    readme = (small_run.out_dir / "README.md").read_text()
    assert "ggnd data generate --smiles CO --name meoh --temperature 300 600 --frames 6 4" in readme
    for package, version in package_versions().items():
        assert f"{package} {version}" in readme
    assert "eV/Å" in readme and "Seed 0" in readme
    record = json.loads((small_run.out_dir / "generation.json").read_text())
    assert record["files"][SMALL_FILES[2]]["frames"] == 4
    assert not (small_run.out_dir / ".checkpoint").exists()


def test_stored_labels_are_tblite_labels_of_the_stored_positions(small_run):
    for path in small_run.files:
        for atoms in read_labelled(path):
            check = atoms.copy()
            check.calc = _plain_tblite()
            # Positions are stored to 1e-8 Å; the SCF converges to ~1e-6 Eh.
            assert abs(check.get_potential_energy() - atoms.info["energy"]) < 1e-5
            assert np.abs(check.get_forces() - atoms.arrays["forces"]).max() < 1e-4


def test_stored_forces_are_minus_the_energy_gradient(small_run):
    atoms = read_labelled(small_run.files[2])[-1]
    probe = atoms.copy()
    probe.calc = _plain_tblite()
    step = 2e-3
    for index in (0, 1, 5):  # C, O, the hydroxyl H
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                positions = atoms.get_positions()
                positions[index, axis] += sign * step
                probe.set_positions(positions)
                energies.append(probe.get_potential_energy())
            numeric = -(energies[0] - energies[1]) / (2 * step)
            assert abs(numeric - atoms.arrays["forces"][index, axis]) < 5e-3, (index, axis)


def test_resume_after_interruptions_gives_the_same_files(small_run, tmp_path):
    from ggnd_plugin.reference import GenerationSettings, generate

    settings = GenerationSettings(**SMALL)
    out = tmp_path / "resumed"
    # Stops inside the 300 K run, then inside the 600 K run, then finishes.
    assert not generate(settings, out, show_progress=False, stop_after_frames=3).complete
    assert (out / ".checkpoint" / "300K.json").exists()
    assert not generate(settings, out, resume=True, show_progress=False, stop_after_frames=5).complete
    assert (out / ".checkpoint" / "600K.json").exists()
    result = generate(settings, out, resume=True, show_progress=False)
    assert result.complete
    for name in SMALL_FILES:
        assert (out / name).read_bytes() == (small_run.out_dir / name).read_bytes(), name


def test_resume_drops_a_frame_written_after_the_last_checkpoint(small_run, tmp_path):
    from ggnd_plugin.reference import GenerationSettings, generate

    settings = GenerationSettings(**SMALL)
    out = tmp_path / "torn"
    generate(settings, out, show_progress=False, stop_after_frames=2)
    partial = out / ".checkpoint" / "meoh_300K.xyz"
    partial.write_text(partial.read_text() + "6\ntorn frame from a kill mid-write\n")
    generate(settings, out, resume=True, show_progress=False)
    for name in SMALL_FILES:
        assert (out / name).read_bytes() == (small_run.out_dir / name).read_bytes(), name


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    _needs_xtb()
    from ggnd_plugin.reference import GenerationSettings, generate

    def run(seed, name):
        settings = GenerationSettings(
            smiles="CO",
            temperatures_K=(600.0,),
            frames=(3,),
            spacing_fs=10.0,
            equilibration_ps=0.01,
            seed=seed,
        )
        return (generate(settings, tmp_path / name, show_progress=False).files[0]).read_bytes()

    first = run(0, "a")
    assert run(0, "b") == first
    other = run(1, "c")
    assert other != first
    # Different trajectories, not just different metadata.
    assert other.splitlines()[2] != first.splitlines()[2]


def test_langevin_kinetic_temperature_matches_the_target(tmp_path):
    """Mean kinetic temperature over 200 frames (1 ps) within 15 % of 500 K.

    Methanol has 15 degrees of freedom (centre of mass fixed): one frame's kinetic temperature
    scatters by sqrt(2/15) = 37 %; with friction 0.05/fs frames 5 fs apart give ~50 independent
    samples over 1 ps, so the mean scatters by ~5 % and 15 % is three standard deviations.
    """
    _needs_xtb()
    from ggnd_plugin.reference import GenerationSettings, generate

    settings = GenerationSettings(
        smiles="CO",
        temperatures_K=(500.0,),
        frames=(200,),
        spacing_fs=5.0,
        timestep_fs=1.0,
        friction_per_fs=0.05,
        equilibration_ps=0.05,
        name="thermo",
    )
    frames = read_labelled(generate(settings, tmp_path / "t", show_progress=False).files[0])
    kinetic = np.array([a.info["kinetic_temperature_K"] for a in frames])
    assert abs(kinetic.mean() - 500.0) < 0.15 * 500.0, kinetic.mean()


def test_bad_input_gives_clear_errors(tmp_path, small_run, capsys):
    _needs_xtb()
    from ggnd_plugin.cli import main
    from ggnd_plugin.reference import GenerationSettings, generate

    with pytest.raises(GGNDError, match="cannot parse the SMILES 'C1CC'"):
        generate(GenerationSettings(smiles="C1CC", temperatures_K=(300.0,), frames=(2,)), tmp_path / "x")
    with pytest.raises(GGNDError, match="--split 6: must be between 1 and 5"):
        GenerationSettings(smiles="CO", temperatures_K=(300.0,), frames=(6,), split_train=6)
    with pytest.raises(GGNDError, match="one count or one per temperature"):
        GenerationSettings(smiles="CO", temperatures_K=(300.0, 600.0, 900.0), frames=(6, 4))
    with pytest.raises(GGNDError, match="whole number of time steps"):
        GenerationSettings(
            smiles="CO", temperatures_K=(300.0,), frames=(2,), spacing_fs=10.0, timestep_fs=3.0
        )
    with pytest.raises(GGNDError, match="already holds a finished generation"):
        generate(GenerationSettings(**SMALL), small_run.out_dir, show_progress=False)
    changed = dict(SMALL, seed=3)
    with pytest.raises(GGNDError, match="already holds a finished generation"):
        generate(GenerationSettings(**changed), small_run.out_dir, resume=True, show_progress=False)

    out = tmp_path / "stopped"
    generate(GenerationSettings(**SMALL), out, show_progress=False, stop_after_frames=1)
    with pytest.raises(GGNDError, match="unfinished generation; pass --resume"):
        generate(GenerationSettings(**SMALL), out, show_progress=False)
    with pytest.raises(GGNDError, match=r"settings differ .*seed \(0 -> 3\)"):
        generate(GenerationSettings(**changed), out, resume=True, show_progress=False)

    code = main(
        [
            "data",
            "generate",
            "--smiles",
            "C1CC",
            "--temperature",
            "300",
            "--frames",
            "2",
            "-o",
            str(tmp_path / "y"),
        ]
    )
    assert code == 2
    assert "cannot parse the SMILES" in capsys.readouterr().err


def test_missing_xtb_packages_name_the_extra(monkeypatch):
    import sys

    from ggnd_plugin.reference import require_xtb

    monkeypatch.setitem(sys.modules, "tblite.ase", None)  # makes `import tblite.ase` fail
    with pytest.raises(
        GGNDError, match=r"needs tblite, which is not installed: pip install 'ggnd-plugin\[xtb\]'"
    ):
        require_xtb()


# --- the 3BPA data shipped in the package ------------------------------------------------------------

DEFAULT_FILES = {
    "3bpa_300K_train": (300.0, 250),
    "3bpa_300K_test": (300.0, 100),
    "3bpa_600K": (600.0, 100),
    "3bpa_1200K": (1200.0, 100),
}


def test_default_3bpa_data_is_shipped_small_and_sane():
    from ggnd_plugin.default_data import default_data_info, default_data_path, list_default_data

    assert sorted(list_default_data()) == sorted(DEFAULT_FILES)
    directory = default_data_path("3bpa")
    total_bytes = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    assert total_bytes < 3 * 1024**2, total_bytes
    assert (directory / "README.md").exists()
    info = default_data_info("3bpa")
    assert info["settings"]["smiles"] == "Nc1ncccc1OCc1ccccc1" and info["settings"]["method"] == "GFN2-xTB"
    mean_energy = {}
    for name, (temperature, count) in DEFAULT_FILES.items():
        frames = read_labelled(default_data_path(name))
        assert len(frames) == count == info["files"][f"{name}.xyz"]["frames"]
        assert all(a.get_chemical_formula() == "C12H12N2O" for a in frames)
        assert all(a.info["temperature_K"] == temperature for a in frames)
        forces = np.stack([a.arrays["forces"] for a in frames])
        assert np.isfinite(forces).all() and np.abs(forces).max() < 25.0
        # Forces on a free molecule sum to ~zero (xTB is translation invariant).
        assert np.abs(forces.sum(axis=1)).max() < 1e-3
        kinetic = np.mean([a.info["kinetic_temperature_K"] for a in frames])
        # 78 degrees of freedom, ~100 frames: the mean scatters by a few per cent.
        assert abs(kinetic - temperature) < 0.1 * temperature, (name, kinetic)
        mean_energy[name] = np.mean([a.info["energy"] for a in frames])
    # Hotter MD samples higher potential energies (equipartition: ~ (3N-6)/2 kT more per degree).
    assert mean_energy["3bpa_300K_test"] < mean_energy["3bpa_600K"] < mean_energy["3bpa_1200K"]
    assert max(info["max_bond_stretch_A"].values()) < 0.5


def test_default_data_lookup_errors_and_cli_listing(capsys):
    from ggnd_plugin.cli import main
    from ggnd_plugin.default_data import default_data_path

    assert default_data_path("3bpa_600K.xyz") == default_data_path("3bpa_600K")
    with pytest.raises(GGNDError, match="no default data named 'nope'; shipped: 3bpa"):
        default_data_path("nope")
    assert main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in DEFAULT_FILES)


def test_an_xtb_failure_during_md_names_the_temperature_and_time(tmp_path, monkeypatch):
    _needs_xtb()
    from ase.calculators.calculator import CalculationFailed

    import ggnd_plugin.reference as reference

    real = reference.xtb_calculator

    def failing_after_a_few_calls(*args, **kwargs):
        calculator = real(*args, **kwargs)
        calls = {"n": 0}
        calculate = calculator.calculate

        def calculate_then_fail(*a, **k):
            calls["n"] += 1
            if calls["n"] > 3:  # the SCF of tblite diverging, as it does for atoms driven together
                raise CalculationFailed("SCF did not converge")
            return calculate(*a, **k)

        calculator.calculate = calculate_then_fail
        return calculator

    monkeypatch.setattr(reference, "xtb_calculator", failing_after_a_few_calls)
    settings = reference.GenerationSettings(**SMALL)
    with pytest.raises(GGNDError, match=r"xTB failed at 300 K after \d+ fs of MD \(SCF did not converge\)"):
        reference.generate(settings, tmp_path / "out", show_progress=False)
