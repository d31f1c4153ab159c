"""``ggnd stability`` under torchrun: 2 CPU ranks with gloo (docs/scale.md).

The model is the bonded Morse test potential (tests/distributed_driver.py): strictly per system, so a
replica's trajectory is bit-identical in any batch, and the 2-rank results must equal the 1-rank
results exactly. Each torchrun start costs ~10-20 s on a busy 2-core machine: the file runs three.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ggnd_plugin.cli import main
from ggnd_plugin.default_data import default_data_path

TESTS = Path(__file__).resolve().parent
DRIVER = TESTS / "distributed_driver.py"


def torchrun(arguments: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 300):
    """``torchrun --standalone --nproc-per-node N -- ARGUMENTS``: a free local port, one thread per rank.

    The ``--`` keeps torchrun's parser off our options (it would read ``--start`` as an abbreviation of
    its ``--start-method``).
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--",
        *arguments,
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    print(f"torchrun {nproc} ranks: {time.perf_counter() - started:.1f} s")
    return result


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from ase.io import read

    from ggnd_plugin.md.metrics import reference_bonds

    reference = read(default_data_path("3bpa_300K_train"), ":100")
    path = tmp_path_factory.mktemp("model") / "bonded.pt"
    torch.save(dict(zip(("pairs", "lengths"), reference_bonds(reference), strict=True)), path)
    return path


def _stability(model_file, out, *extra):
    return [
        "stability", str(model_file), "--start", str(default_data_path("3bpa_300K_test")),
        "--reference", str(default_data_path("3bpa_300K_train")), "--temperature", "300", "5000",
        "--replicas", "3", "--time-ps", "0.3", "--checkpoint-every", "50", "--no-progress",
        "--no-plots", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def single(model_file, tmp_path_factory, request):
    """The 1-process results of each ensemble (in this process)."""
    results = {}
    monkeypatch = pytest.MonkeyPatch()
    request.addfinalizer(monkeypatch.undo)
    monkeypatch.syspath_prepend(str(TESTS))
    import distributed_driver

    from ggnd_plugin import registry

    monkeypatch.setattr(registry, "resolve", lambda host, path: distributed_driver.CountingAdapter())
    for ensemble in ("nve", "nvt-langevin"):
        out = tmp_path_factory.mktemp("single") / ensemble
        assert main(_stability(model_file, out, "--ensemble", ensemble)) == 0
        results[ensemble] = out
    return results


def _assert_same_results(a: Path, b: Path) -> None:
    """Every file a single process writes, equal: JSON (rows, summary, statistics, protocol), CSV,
    summary.md and every time series, bit for bit."""
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())
    for name in ("results.csv", "summary.md"):
        assert (a / name).read_text() == (b / name).read_text(), name
    with np.load(a / "timeseries.npz") as x, np.load(b / "timeseries.npz") as y:
        assert x.files == y.files
        for key in x.files:
            assert np.array_equal(x[key], y[key], equal_nan=True), key
    # the failed replicas' frames, whichever rank ran them
    frames = sorted(p.relative_to(a) for p in (a / "failures").rglob("*.extxyz"))
    assert frames and frames == sorted(p.relative_to(b) for p in (b / "failures").rglob("*.extxyz"))
    for name in frames:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_two_ranks_write_what_one_process_writes(model_file, single, tmp_path):
    out = tmp_path / "two"
    result = torchrun([str(DRIVER), *_stability(model_file, out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 ranks)" in result.stdout
    _assert_same_results(single["nve"], out)
    rows = json.loads((out / "results.json").read_text())["replicas"]
    assert any(row["failed"] for row in rows) and not all(row["failed"] for row in rows)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "bonded.rank0-of-2.pt",
        "bonded.rank1-of-2.pt",
    ]
    # each rank ran 3 of the 6 replicas (round robin in plan order)
    owned = [
        torch.load(out / "checkpoints" / f"bonded.rank{r}-of-2.pt", weights_only=False)["owned"]
        for r in (0, 1)
    ]
    assert owned == [[0, 2, 4], [1, 3, 5]]


def test_a_rank_that_dies_is_reported_and_resume_finishes_only_its_replicas(model_file, single, tmp_path):
    """Langevin with --autobatch: rank 1 is SIGKILLed at its 120th force call; torchrun stops rank 0
    (SIGTERM), which saves its progress and reports what is unfinished; --resume on 2 ranks runs only
    the unfinished replicas and ends with the uninterrupted 1-process result."""
    out = tmp_path / "killed"
    arguments = [str(DRIVER), *_stability(model_file, out, "--ensemble", "nvt-langevin")]
    arguments += ["--autobatch", "--max-batch-atoms", "54"]
    killed = torchrun(arguments, env={"GGND_TEST_KILL_RANK": "1", "GGND_TEST_KILL_AFTER": "120"})
    assert killed.returncode != 0
    assert "Signal 9 (SIGKILL)" in killed.stderr or "SIGKILL" in killed.stderr
    report = json.loads((out / "unfinished.json").read_text())
    assert "--resume to finish only those" in report["message"]
    unfinished = report["replicas"]
    assert {item["rank"] for item in unfinished} >= {1}
    assert all(0 <= item["step"] < item["of_steps"] == 300 for item in unfinished)
    assert not (out / "results.json").exists()  # no results until every replica is finished

    log = tmp_path / "systems"
    resumed = torchrun([*arguments, "--resume"], env={"GGND_TEST_SYSTEMS_LOG": str(log)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / "unfinished.json").exists()
    _assert_same_results(single["nvt-langevin"], out)
    # replica-steps computed by the resumed job == the steps the unfinished replicas still needed
    rows = json.loads((out / "results.json").read_text())["replicas"]
    end = {
        (row["temperature_K"], row["replica"]): (300 if row["failure_step"] is None else row["failure_step"])
        for row in rows
    }
    needed = sum(end[(item["temperature_K"], item["replica"])] - item["step"] for item in unfinished)
    fresh = sum(item["step"] == 0 for item in unfinished)  # a replica never started gets a start evaluation
    computed = sum(
        int(line) for rank in (0, 1) for line in Path(f"{log}.rank{rank}").read_text().split() if line
    )
    assert computed == needed + fresh


def test_device_and_backend_checks():
    from ggnd_plugin.distributed import rank_device
    from ggnd_plugin.errors import GGNDError

    assert rank_device(torch.device("cpu"), 3) == torch.device("cpu")
    with pytest.raises(GGNDError, match="give --device cuda, and each rank uses cuda:LOCAL_RANK"):
        rank_device(torch.device("cuda", 1), 0)


def test_baseline_reaches_the_report(model_file, tmp_path, monkeypatch):
    """--baseline names the model the comparison table is made against (the report's baseline=)."""
    monkeypatch.syspath_prepend(str(TESTS))
    import distributed_driver

    from ggnd_plugin import registry

    monkeypatch.setattr(registry, "resolve", lambda host, path: distributed_driver.CountingAdapter())
    second = tmp_path / "other.pt"
    second.write_bytes(model_file.read_bytes())
    out = tmp_path / "run"
    arguments = _stability(model_file, out, "--time-ps", "0.05")
    arguments.insert(2, str(second))
    assert main([*arguments, "--baseline", "other"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["statistics"]["baseline"] == "other"
    assert {row["model"] for row in record["replicas"]} == {"bonded", "other"}
    assert main([*arguments, "--resume", "--baseline", "bonded"]) == 0
    assert json.loads((out / "results.json").read_text())["statistics"]["baseline"] == "bonded"
