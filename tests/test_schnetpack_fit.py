"""SchNetPackAdapter.fit: PaiNN (with and without GGND) trained from scratch by spktrain, and the demo."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("schnetpack")

from ase.io import write  # noqa: E402

from ggnd_plugin.adapters.host_trainer import FitRequest  # noqa: E402
from ggnd_plugin.adapters.schnetpack import FIT_LOG, SchNetPackAdapter, fit_command  # noqa: E402
from ggnd_plugin.block import GGNDConfig  # noqa: E402
from ggnd_plugin.data import read_labelled  # noqa: E402
from ggnd_plugin.default_data import default_data_path
from ggnd_plugin.errors import GGNDError  # noqa: E402

DATA = default_data_path("3bpa_300K_train")
ELEMENTS = [1, 6, 7, 8]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """16 training, 4 validation and 4 held-out frames of the packaged 300 K set."""
    frames = read_labelled(DATA, ":24")
    folder = tmp_path_factory.mktemp("data")
    write(folder / "train.xyz", frames[:16])
    write(folder / "valid.xyz", frames[16:20])
    return folder / "train.xyz", folder / "valid.xyz", frames[20:]


@pytest.mark.parametrize(
    "config", [None, GGNDConfig(channels=8, heads=2, steps=2)], ids=["painn", "painn-ggnd"]
)
def test_fit_trains_through_spktrain(split, tmp_path, config):
    train, valid, held_out = split
    adapter = SchNetPackAdapter()
    start = time.perf_counter()
    model = adapter.fit(train, valid, tmp_path / "work", config=config, epochs=2, seed=0, size="tiny")
    print(
        f"fit ({'ggnd' if config else 'plain'}, tiny, 2 epochs, 16 frames): {time.perf_counter() - start:.1f} s"
    )

    assert adapter.recognises_model(model)
    blocks = adapter.ggnd_blocks(model)
    if config is None:
        assert not blocks
    else:
        assert len(blocks) == 1 and blocks[0].config.channels == 8 and blocks[0].config.steps == 2
    assert model.representation.n_atom_basis == 16 and adapter.cutoff(model) == pytest.approx(5.0)
    assert adapter.atomic_numbers(model) == ELEMENTS and adapter.units(model) == ("eV", "Ang")

    prediction = adapter.predict(model, held_out)
    assert prediction.energy.shape == (len(held_out),)
    assert torch.isfinite(prediction.energy).all() and torch.isfinite(prediction.forces).all()

    # Both epochs ran on exactly the given partition, and the log says so.
    log = (tmp_path / "work" / FIT_LOG).read_text()
    assert "Epoch 0, global step 4:" in log and "Epoch 1, global step 8:" in log  # 16 frames / 4
    assert "max_epochs=2" in log and "Best model stored" in log

    # The saved model keeps what the adapter needs, away from the spktrain run folder.
    path = adapter.save(model, tmp_path / "saved" / f"model{adapter.file_suffixes[0]}")
    reloaded = adapter.load(path)
    assert adapter.atomic_numbers(reloaded) == ELEMENTS and bool(adapter.ggnd_blocks(reloaded)) == bool(
        blocks
    )
    again = adapter.predict(reloaded, held_out)
    assert torch.equal(again.energy, prediction.energy)


def test_fit_command_and_errors(split, tmp_path):
    train, valid, _ = split
    config = GGNDConfig(channels=8, heads=2, r_g=None)
    command, model_path = fit_command(
        FitRequest(train, valid, tmp_path, config, epochs=3, seed=7, size="small")
    )
    assert "experiment=ggnd_painn_3bpa" in command and "trainer.max_epochs=3" in command
    assert "++seed=7" in command and "data.num_train=16" in command and "data.num_val=4" in command
    assert "model.representation.n_atom_basis=32" in command and "++globals.ggnd.r_g=null" in command
    assert "globals.ggnd_atomic_numbers=[1,6,7,8]" in command
    assert model_path == tmp_path / "runs" / "ggnd_painn" / "best_model"
    assert "trainer.accelerator=cpu" in command
    on_gpu, _ = fit_command(FitRequest(train, valid, tmp_path, None, 3, 7, "small", device="cuda"))
    assert "trainer.accelerator=gpu" in on_gpu
    import numpy as np

    with np.load(tmp_path / "split.npz") as saved:
        assert saved["train_idx"].tolist() == list(range(16)) and saved["val_idx"].tolist() == list(
            range(16, 20)
        )

    adapter = SchNetPackAdapter()
    with pytest.raises(GGNDError, match="unknown model size"):
        adapter.fit(train, valid, tmp_path, size="huge")
    with pytest.raises(GGNDError, match="no such file"):
        adapter.fit(tmp_path / "missing.xyz", valid, tmp_path, size="tiny")
    # A failed training command comes back with the end of its log.
    from ggnd_plugin.adapters.schnetpack import run_fit

    failing = [sys.executable, "-c", "print('spktrain says: no such option'); raise SystemExit(3)"]
    with pytest.raises(GGNDError, match=r"(?s)spktrain failed \(exit 3\).*no such option"):
        run_fit(failing, tmp_path / "failed", epochs=1)


@pytest.mark.slow
def test_demo_quick_schnetpack(tmp_path):
    out = tmp_path / "demo"
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ggnd_plugin.cli",
            "demo",
            "--host",
            "schnetpack",
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    print(f"ggnd demo --host schnetpack --quick: {time.perf_counter() - start:.0f} s")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = (out / "report.md").read_text()
    for name in ("baseline", "ggnd-scratch", "ggnd-upgrade"):
        assert f"| {name} |" in report
