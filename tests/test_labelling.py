"""``ggnd data label``: GFN2-xTB labels for any structures, against the labels shipped with the package.

The shipped 3BPA files were labelled by the same method with the same settings (generation.json:
GFN2-xTB, electronic temperature 300 K), so recomputing their frames must give their stored labels.
About 30 ms per frame.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.io import read, write

from ggnd_plugin.cli import main
from ggnd_plugin.errors import GGNDError, OutputExistsError
from ggnd_plugin.labelling import LabelSettings, checkpoint_path, label_files, partial_path

DATA = Path(__file__).resolve().parents[1] / "ggnd_plugin" / "default_data" / "3bpa"
pytest.importorskip("tblite")  # the [xtb] extra; installed by `make env`


def test_labels_reproduce_the_shipped_labels(tmp_path):
    record = json.loads((DATA / "generation.json").read_text())["settings"]
    assert (record["method"], record["electronic_temperature_K"]) == ("GFN2-xTB", 300.0)
    shipped = read(DATA / "3bpa_300K_test.xyz", index=":3")
    bare = []
    for atoms in shipped:
        frame = Atoms(numbers=atoms.numbers, positions=atoms.get_positions())
        frame.info["note"] = "kept"
        bare.append(frame)
    write(tmp_path / "bare.xyz", bare)
    result = label_files([tmp_path / "bare.xyz"], tmp_path / "labelled.xyz", progress=False)
    assert result.frames == result.labelled_now == 3
    labelled = read(tmp_path / "labelled.xyz", index=":")
    for ours, theirs in zip(labelled, shipped, strict=True):
        assert ours.get_potential_energy() == pytest.approx(theirs.get_potential_energy(), abs=1e-6)
        assert np.abs(ours.get_forces() - theirs.get_forces()).max() < 2e-6
        assert ours.info["note"] == "kept" and ours.info["label_method"] == "GFN2-xTB"
    assert [a.info["label_source"] for a in labelled] == ["bare.xyz:0", "bare.xyz:1", "bare.xyz:2"]
    assert not partial_path(tmp_path / "labelled.xyz").exists()
    assert not checkpoint_path(tmp_path / "labelled.xyz").exists()


def test_a_stopped_labelling_resumes_to_the_same_file(tmp_path):
    frames = read(DATA / "3bpa_600K.xyz", index=":4")
    write(tmp_path / "in.xyz", frames[:2])
    write(tmp_path / "more.xyz", frames[2:])
    inputs = [tmp_path / "in.xyz", tmp_path / "more.xyz"]
    label_files(inputs, tmp_path / "whole.xyz", progress=False)
    stopped = label_files(inputs, tmp_path / "part.xyz", progress=False, stop_after=3)
    assert not stopped.complete and not (tmp_path / "part.xyz").exists()
    # a frame written after the last checkpoint (a kill between the two) is dropped and redone
    with open(partial_path(tmp_path / "part.xyz"), "a") as handle:
        handle.write("27\ngarbage\n")
    with pytest.raises(OutputExistsError, match="pass --resume"):
        label_files(inputs, tmp_path / "part.xyz", progress=False)
    with pytest.raises(GGNDError, match="other inputs or settings"):
        label_files(inputs, tmp_path / "part.xyz", LabelSettings(electronic_temperature_K=0.0), resume=True)
    resumed = label_files(inputs, tmp_path / "part.xyz", resume=True, progress=False)
    assert resumed.labelled_now == 1 and resumed.frames == 4
    assert (tmp_path / "part.xyz").read_bytes() == (tmp_path / "whole.xyz").read_bytes()


def test_bad_frames_are_refused_before_any_label(tmp_path):
    good = read(DATA / "3bpa_600K.xyz", index="0")
    nan = good.copy()
    nan.positions[3] = np.nan
    write(tmp_path / "nan.xyz", [good, nan])
    with pytest.raises(GGNDError, match="nan.xyz: frame 1 has non-finite positions"):
        label_files([tmp_path / "nan.xyz"], tmp_path / "out.xyz", progress=False)
    assert not (tmp_path / "out.xyz").exists() and not partial_path(tmp_path / "out.xyz").exists()
    anion = good.copy()
    anion.info["charge"] = -1
    write(tmp_path / "anion.xyz", anion)
    electrons = int(good.numbers.sum()) + 1
    with pytest.raises(
        GGNDError, match=f"frame 0: {electrons} electrons with charge -1 cannot have 0 unpaired"
    ):
        label_files([tmp_path / "anion.xyz"], tmp_path / "out.xyz", progress=False)
    for key, value, shown in (("charge", "neutral", "'neutral'"), ("unpaired_electrons", 0.5, "0.5")):
        odd = good.copy()
        odd.info[key] = value
        write(tmp_path / f"odd_{key}.xyz", [good, odd])
        with pytest.raises(
            GGNDError, match=rf"odd_{key}.xyz: frame 1: info\['{key}'\] must be a whole number, got {shown}"
        ):
            label_files([tmp_path / f"odd_{key}.xyz"], tmp_path / "out.xyz", progress=False)
    radical = Atoms("CH3", positions=[[0, 0, 0], [1.08, 0, 0], [-0.54, 0.94, 0], [-0.54, -0.94, 0]])
    radical.info["unpaired_electrons"] = 1
    write(tmp_path / "radical.xyz", radical)
    label_files([tmp_path / "radical.xyz"], tmp_path / "radical_labelled.xyz", progress=False)
    assert np.isfinite(read(tmp_path / "radical_labelled.xyz").get_forces()).all()


def test_command_line(tmp_path, capsys):
    write(tmp_path / "two.xyz", read(DATA / "3bpa_300K_test.xyz", index=":2"))
    out = tmp_path / "labels.xyz"
    assert main(["data", "label", str(tmp_path / "two.xyz"), "-o", str(out), "--no-progress"]) == 0
    assert "2 frames labelled with GFN2-xTB" in capsys.readouterr().out
    assert main(["data", "label", str(tmp_path / "two.xyz"), "-o", str(out), "--no-progress"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    arguments = ["data", "label", str(tmp_path / "two.xyz"), "-o", str(out), "--no-progress", "--overwrite"]
    assert main([*arguments, "--method", "gfn1-xtb"]) == 0
    assert read(out).info["label_method"] == "GFN1-xTB"
