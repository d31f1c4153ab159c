"""The loop of docs/stability.md, end to end on the command line, at toy size:

stability -> failure frames -> ``ggnd data label`` (GFN2-xTB, the method of the package's own training
data) -> ``ggnd finetune`` on train + labelled failures, with and without GGND -> stability again.

The model is the third-party toy host (tests/thirdparty) with a TorchSim model given for the test
(tests/toyhost_torchsim.py): untrained, it fails within a few femtoseconds at 1200 K, which is all the
loop's machinery needs. The slow test runs the same loop with a tiny MACE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read, write

from ggnd_plugin.cli import main

TESTS = Path(__file__).resolve().parent
DATA = TESTS.parent / "ggnd_plugin" / "default_data" / "3bpa"
pytest.importorskip("tblite")  # the [xtb] extra; installed by `make env`


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(TESTS / "thirdparty"))
    monkeypatch.syspath_prepend(str(TESTS))
    import toyhost_ggnd
    from toyhost_torchsim import use_toy_torchsim

    use_toy_torchsim(monkeypatch)
    torch.manual_seed(0)
    return toyhost_ggnd.ToyAdapter().save(toyhost_ggnd.ToyPotential().double(), tmp_path / "toy.toy")


def _stability(model_files, out, *extra):
    return [
        "stability", *map(str, model_files), "--start", str(DATA / "3bpa_1200K.xyz"),
        "--reference", str(DATA / "3bpa_300K_train.xyz"), "--temperature", "1200", "--replicas", "3",
        "--time-ps", "0.05", "--failure-frames", "3", "--failure-frame-every", "2", "--no-progress",
        "--no-plots", "--out", str(out), *extra,
    ]  # fmt: skip


def test_the_loop_from_failures_back_to_training_data(toy, tmp_path, capsys):
    # 1. stability: every replica fails, and leaves its frames and a cause
    first = tmp_path / "round1"
    assert main(_stability([toy], first, "--scan-failed")) == 0
    record = json.loads((first / "results.json").read_text())
    failed = [row for row in record["replicas"] if row["failed"]]
    assert len(failed) == 3 and all(row["cause"] and row["cause_detail"] for row in failed)
    assert sum(row["failed"] for row in record["failure_causes"]) == 3
    files = sorted((first / "failures").rglob("*.extxyz"))
    assert [str(p.relative_to(first)) for p in files] == sorted(row["failure_frames"] for row in failed)
    if {row["cause"] for row in failed} & {"bond-stretch", "fragmentation"}:
        scans = json.loads((first / "bond_scans" / "scan.json").read_text())
        assert (
            scans["table"] and "## Bond scans of the failing bond types" in (first / "summary.md").read_text()
        )
    # 2. labels for those frames
    labelled = tmp_path / "failures_labelled.xyz"
    assert main(["data", "label", *map(str, files), "-o", str(labelled), "--no-progress"]) == 0
    frames = read(labelled, index=":")
    kept = sum(len(read(p, index=":")) for p in files)
    assert len(frames) == kept and all(np.isfinite(a.get_forces()).all() for a in frames)
    assert {a.info["model"] for a in frames} == {"toy"} and all("model_forces" in a.arrays for a in frames)
    # 3. train + labelled failures, with GGND (attached by finetune) and without
    train = tmp_path / "train_plus_failures.xyz"
    write(train, [*read(DATA / "3bpa_300K_train.xyz", index=":12"), *frames])
    arms = {}
    for name, extra in (("with_ggnd", []), ("without_ggnd", ["--no-ggnd"])):
        arms[name] = tmp_path / f"{name}.toy"
        finetune = ["finetune", str(toy), "--train", str(train), "--epochs", "1", "--batch-size", "8"]
        assert main([*finetune, "-o", str(arms[name]), *extra]) == 0
    assert f"on {12 + kept} frames" in capsys.readouterr().out
    # 4. stability again: the same replicas (same seed) for both arms, and the original for reference
    second = tmp_path / "round2"
    assert main(_stability([toy, arms["with_ggnd"], arms["without_ggnd"]], second, "--baseline", "toy")) == 0
    again = json.loads((second / "results.json").read_text())
    assert {row["model"] for row in again["replicas"]} == {"toy", "with_ggnd", "without_ggnd"}
    original = [row for row in again["replicas"] if row["model"] == "toy"]
    assert [(r["failure_step"], r["cause"]) for r in original] == [
        (r["failure_step"], r["cause"]) for r in record["replicas"]
    ]
    assert len(again["statistics"]["comparisons"]) == 2


def test_failure_folder_inputs_are_refused(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_stability([toy], out)) == 0
    frames = next((out / "failures").rglob("*.extxyz"))
    arguments = _stability([toy], out, "--overwrite")
    arguments[arguments.index("--start") + 1] = str(frames)
    assert main(arguments) == 2
    assert "which this run rewrites" in capsys.readouterr().err


@pytest.mark.slow
def test_the_loop_with_a_tiny_mace(tmp_path, capsys):
    """The same loop with a tiny MACE fitted for two epochs on 20 frames (a few minutes on 2 cores)."""
    pytest.importorskip("mace")
    from ggnd_plugin.registry import get
    from ggnd_plugin.safe_io import save_model

    adapter = get("mace")
    train = tmp_path / "train.xyz"
    valid = tmp_path / "valid.xyz"
    frames = read(DATA / "3bpa_300K_train.xyz", index=":25")
    write(train, frames[:20])
    write(valid, frames[20:])
    model = adapter.fit(train, valid, tmp_path / "fit", epochs=2, seed=0, size="tiny")
    model_file = save_model(adapter, model, tmp_path / "tiny.model")
    first = tmp_path / "round1"
    assert main(_stability([model_file], first)) == 0
    files = sorted((first / "failures").rglob("*.extxyz"))
    assert files, "a MACE fitted for two epochs fails at 1200 K within 50 fs"
    labelled = tmp_path / "labelled.xyz"
    assert main(["data", "label", *map(str, files), "-o", str(labelled), "--no-progress"]) == 0
    write(tmp_path / "plus.xyz", [*frames[:20], *read(labelled, index=":")])
    for name, extra in (("ggnd", []), ("plain", ["--no-ggnd"])):
        finetune = ["finetune", str(model_file), "--train", str(tmp_path / "plus.xyz"), "--epochs", "1"]
        assert main([*finetune, "-o", str(tmp_path / f"{name}.model"), *extra]) == 0
    second = tmp_path / "round2"
    models = [model_file, tmp_path / "ggnd.model", tmp_path / "plain.model"]
    assert main(_stability(models, second)) == 0
    assert len(json.loads((second / "results.json").read_text())["replicas"]) == 9
