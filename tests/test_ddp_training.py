"""Training GGND models data-parallel on 2 CPU processes with gloo, launched by torchrun (docs/scale.md).

* ``nequip-train`` and ``spktrain`` with Lightning's DDP strategy: the GGND block parameters of both ranks
  are identical after training (``GGNDParameterCheck`` gathers them) and differ from their start, and
  the trained model loads with ``ggnd evaluate``.
* ``ggnd finetune`` of a tiny MACE + GGND under torchrun: DistributedDataParallel, the global batch split
  over the ranks, so the 2-rank run follows the 1-process run (float64: parameters within 1e-9;
  measured 1.3e-11).

Tiny models, 16 or 4 frames, 1-2 epochs; each torchrun start costs ~15-25 s on a busy 2-core machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from ase.io import read, write

from ggnd_plugin.cli import main
from ggnd_plugin.default_data import default_data_path

TESTS = Path(__file__).resolve().parent
DATA = default_data_path("3bpa_300K_train")
CHECK = "ggnd_plugin.lightning_ddp.GGNDParameterCheck"


def torchrun(arguments: list[str], cwd: Path, env: dict | None = None, timeout: float = 600):
    """``torchrun --standalone --nproc-per-node 2 -- ARGUMENTS`` (the ``--`` keeps torchrun's parser
    off the trainer's options)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    started = time.perf_counter()
    result = subprocess.run(
        [*command, "--", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
    print(f"torchrun 2 ranks {arguments[:3]}: {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    structures = read(DATA, ":24")
    paths = {"train": folder / "train.xyz", "valid": folder / "valid.xyz"}
    write(paths["train"], structures[:16])
    write(paths["valid"], structures[16:24])
    return paths


def _trained_on_every_rank(folder: Path) -> None:
    """GGND parameters identical on both ranks after training, and changed by it."""
    records = [torch.load(folder / f"ggnd_parameters.rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    start, end = records[0]["start"], records[0]["end"]
    assert start.keys() == end.keys() == records[1]["end"].keys() and len(end) > 5
    for name in end:
        assert torch.equal(end[name], records[1]["end"][name]), name  # DDP: bit-identical replicas
        assert torch.equal(start[name], records[1]["start"][name]), name
    changed = [name for name in end if not torch.equal(start[name], end[name])]
    # the fusion readout starts at zero and must have moved; most of the block with it
    assert any("readout" in name for name in changed), changed
    assert len(changed) >= len(end) // 2, (len(changed), len(end))


def _evaluates(model: Path, data: Path, capsys, host: str = "auto") -> None:
    before = capsys.readouterr()
    assert main(["evaluate", str(model), "--data", str(data), "--host", host]) == 0
    assert "forces (meV/Å)" in capsys.readouterr().out
    with capsys.disabled():  # what the test printed before (timings) stays visible with -s
        print(before.out, end="")


def test_nequip_train_with_lightning_ddp(frames, tmp_path, capsys):
    pytest.importorskip("nequip")
    config = yaml.safe_load((TESTS / "data" / "nequip_ggnd_train.yaml").read_text())
    for key in ("data_dir", "train_file", "test_file"):
        config.pop(key)
    config.update(run=["train"], max_epochs=2)
    data = config["data"]
    for key in ("split_dataset", "test_file_path", "test_dataloader"):
        data.pop(key)
    data.update(train_file_path=str(frames["train"]), val_file_path=str(frames["valid"]))
    data["train_dataloader"]["batch_size"] = 2
    config["training_module"]["_target_"] = "nequip.train.NequIPLightningModule"
    config["training_module"].pop("test_metrics")
    # Lightning's DDP over the processes torchrun started (gloo on the CPU)
    config["trainer"].update(strategy="ddp", devices=2, num_nodes=1)
    config["trainer"]["callbacks"].append({"_target_": CHECK, "dirpath": "${hydra:runtime.output_dir}"})
    assert config["training_module"]["model"]["ggnd"]["version"] == 2
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    work = tmp_path / "work"
    result = torchrun(
        ["-m", "nequip.scripts.train", "-cp", str(tmp_path), "-cn", "ddp", f"hydra.run.dir={work}"], tmp_path
    )
    assert (
        "GGND parameters over 2 rank(s): largest difference between ranks 0" in result.stdout + result.stderr
    )
    _trained_on_every_rank(work)
    _evaluates(work / "best.ckpt", frames["valid"], capsys)


def test_spktrain_with_lightning_ddp(frames, tmp_path, capsys):
    pytest.importorskip("schnetpack")
    from ggnd_plugin.adapters.host_trainer import FitRequest
    from ggnd_plugin.adapters.schnetpack import fit_command
    from ggnd_plugin.block import GGNDConfig

    work = tmp_path / "work"
    config = GGNDConfig(channels=8, heads=2, steps=2)
    command, model = fit_command(FitRequest(frames["train"], frames["valid"], work, config, 2, 0, "tiny"))
    assert "++globals.ggnd.version=2" in command
    # command: python -m ggnd_plugin.host_fit schnetpack.cli:train SPKTRAIN OVERRIDES (atomic torch.save:
    # both ranks store best_model)
    arguments = ["-m", *command[2:], "++trainer.strategy=ddp", "++trainer.devices=2"]
    arguments += [f"+callbacks.ggnd_check._target_={CHECK}", f"+callbacks.ggnd_check.dirpath={work / 'ggnd'}"]
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PWD": str(work), "HYDRA_FULL_ERROR": "1"}
    result = torchrun(arguments, work, env=env)
    assert "largest difference between ranks 0" in result.stdout + result.stderr
    _trained_on_every_rank(work / "ggnd")
    _evaluates(model, frames["valid"], capsys, host="schnetpack")


def _tiny_mace_with_ggnd(path: Path) -> Path:
    from ggnd_plugin.adapters.mace import MACEAdapter
    from ggnd_plugin.block import GGNDConfig
    from ggnd_plugin.testing import tiny_mace

    adapter = MACEAdapter()
    model = adapter.attach(tiny_mace(), GGNDConfig(channels=8, heads=2, steps=2, version=2))
    return adapter.save(model, path)


def test_finetune_under_torchrun_follows_the_single_process_run(frames, tmp_path, capsys, monkeypatch):
    pytest.importorskip("mace")
    from ggnd_plugin.adapters.mace import MACEAdapter
    from ggnd_plugin.lightning_ddp import ggnd_parameters

    model = _tiny_mace_with_ggnd(tmp_path / "start.model")
    train = tmp_path / "train.xyz"
    write(train, read(frames["train"], ":5"))  # batches of 2, 2 and 1 frames: rank 1 idles on the last
    arguments = ["finetune", str(model), "--train", str(train), "--epochs", "2", "--batch-size", "2"]
    arguments += ["--lr", "0.01", "--seed", "3"]

    single = tmp_path / "single.model"
    started = time.perf_counter()
    assert main([*arguments, "-o", str(single)]) == 0
    print(f"finetune, 1 process: {time.perf_counter() - started:.1f} s")
    ddp = tmp_path / "ddp.model"
    result = torchrun(["-m", "ggnd_plugin.cli", *arguments, "-o", str(ddp)], tmp_path)
    assert "on 2 DDP ranks (parameters identical on every rank)" in result.stdout

    adapter = MACEAdapter()
    a, b, start = (adapter.load(path) for path in (single, ddp, model))
    ga, gb, g0 = (ggnd_parameters(m) for m in (a, b, start))
    assert any(not torch.equal(ga[n], g0[n]) for n in ga)  # GGND was trained
    worst = 0.0
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if pa.is_floating_point() and pa.numel():
            torch.testing.assert_close(pb, pa, rtol=0, atol=1e-9, msg=name)
            worst = max(worst, float((pb - pa).abs().max()))
    print(f"finetune: largest parameter difference, 2 DDP ranks against 1 process: {worst:.2g}")
    checkpoints = [torch.load(f"{p}.checkpoint.pt", weights_only=False) for p in (single, ddp)]
    for x, y in zip(checkpoints[0]["history"], checkpoints[1]["history"], strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-10)
    _evaluates(ddp, frames["valid"], capsys)
