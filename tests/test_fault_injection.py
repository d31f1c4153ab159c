"""Fault injection: SIGKILL ``ggnd finetune``, ``ggnd stability``, ``ggnd data generate`` and each host's
``fit`` at random points, resume, and compare with an uninterrupted run (issue 14).

Two kinds of kill point, drawn from seeds:

* ``write``: ``GGND_KILL_AT_WRITE=N`` makes the process SIGKILL itself half-way through its N-th atomic
  write (the temporary file truncated, the rename not done): the worst moment for a crash, on purpose.
* ``time``: the test SIGKILLs the process at a random time after it took its output lock (it is
  working), anywhere in its run: during MD, an epoch, an SCF, or a write.

After every kill each file in the output folder is checked (checkpoints and models against their CRCs,
JSON parsed, trajectories read) and the inputs are checked unchanged; the run is then resumed with the
same command plus ``--resume`` (a kill may hit the resumed run too). The final result must equal the
uninterrupted run bit for bit (finetune, stability, data generate, MACE and NequIP fits; SchNetPack's
float32 training is not bit-reproducible even between two clean runs, so its tolerance is stated there).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import zipfile
from contextlib import nullcontext as _nothing
from pathlib import Path

import numpy as np
import pytest
import torch

from ggnd_plugin import safe_io
from ggnd_plugin.cli import main
from ggnd_plugin.default_data import default_data_path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
THIRDPARTY = TESTS / "thirdparty"
DATA = default_data_path("3bpa_300K_train")
START = default_data_path("3bpa_300K_test")
SEEDS = (0, 1, 2, 3)  # even seeds: a write point; odd seeds: a random time

# Totals over the tests of this file (printed after them; the README quotes them).
TALLY = {"kills": 0, "runs": 0, "files_checked": 0, "files_lost": 0}


# -------------------------------------------------------------------------------------------------
# The harness
# -------------------------------------------------------------------------------------------------
def _digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def kill_plan(seed: int, writes: int, seconds: float) -> tuple[str, float]:
    """A kill point for ``seed``: the N-th write (1..writes) or a time in (0, seconds) after the lock."""
    rng = random.Random(seed)
    if seed % 2 == 0:
        return "write", rng.randint(1, writes)
    return "time", rng.uniform(0.05, 1.0) * seconds


def run_until_killed(command: list[str], lock: Path, plan: tuple[str, float], env=None) -> bool:
    """Run ``command``; kill it at ``plan``. True when it was killed (it may finish first)."""
    kind, value = plan
    env = dict(os.environ if env is None else env)
    env.pop(safe_io.KILL_AT_WRITE_ENV, None)
    if kind == "write":
        env[safe_io.KILL_AT_WRITE_ENV] = str(int(value))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    TALLY["runs"] += 1
    if kind == "time":
        deadline = time.monotonic() + 120
        while process.poll() is None and not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(value)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=600)
    if process.returncode == -signal.SIGKILL:
        TALLY["kills"] += 1
        return True
    assert process.returncode == 0, err[-3000:]
    return False


def check_files(folder: Path, inputs: dict[str, str]) -> None:
    """Every file in ``folder`` is whole, and no input changed. Temporary folders are the killed
    writer's own and are skipped (the next run removes them)."""
    assert _digest(inputs) == inputs, "an input file changed"
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(safe_io.TMP_PREFIX) for part in path.parts):
            continue
        if path.name.endswith(".ggnd.lock") or path.name == safe_io.DIR_LOCK_NAME:
            continue
        TALLY["files_checked"] += 1
        try:
            _check_file(path)
        except Exception:
            TALLY["files_lost"] += 1
            raise


def _check_file(path: Path) -> None:
    name = path.name
    if zipfile.is_zipfile(path) or name.endswith((".pt", ".toy", ".ckpt", ".model")) or name == "best_model":
        safe_io.verify_torch_file(path, "file")
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".xyz") and ".checkpoint" not in path.parts:
        from ase.io import read

        assert read(path, ":")
    elif name.endswith(".xyz"):
        # the partial trajectory: an append-only file whose whole frames are counted by its checkpoint
        state = path.parent / f"{path.stem.rsplit('_', 1)[-1]}.json"
        if state.exists():
            assert path.stat().st_size >= json.loads(state.read_text())["partial_bytes"]
    elif name.endswith(".npz"):
        with np.load(path) as data:
            [data[key] for key in data.files]
    elif name.endswith(".png"):
        from matplotlib.image import imread

        imread(path)


def no_leftovers(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if p.name.startswith(safe_io.TMP_PREFIX) or "ggnd.lock" in p.name]
    assert not left, left


def _env_with_toyhost() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(THIRDPARTY), os.environ.get("PYTHONPATH", "")]))


# -------------------------------------------------------------------------------------------------
# ggnd finetune
# -------------------------------------------------------------------------------------------------
@pytest.fixture
def toyhost(monkeypatch):
    monkeypatch.syspath_prepend(str(THIRDPARTY))
    import toyhost_ggnd

    return toyhost_ggnd


def test_finetune_killed_anywhere_resumes_to_the_uninterrupted_model(toyhost, tmp_path):
    from ase.io import write

    from ggnd_plugin.data import read_labelled

    # The killed runs are fresh processes with torch's default float32 (conftest sets float64 here)
    torch.set_default_dtype(torch.float32)
    frames = read_labelled(DATA, ":10")
    torch.manual_seed(0)
    model = toyhost.ToyPotential()
    with torch.no_grad():
        model.e0.fill_(float(np.mean([a.info["energy"] / len(a) for a in frames])))
    adapter = toyhost.ToyAdapter()
    files = {"model": adapter.save(model, tmp_path / "fitted.toy"), "train": tmp_path / "train.xyz"}
    files["valid"] = tmp_path / "valid.xyz"
    write(files["train"], frames[:8])
    write(files["valid"], frames[8:])
    inputs = _digest(files.values())

    def command(out):
        return [
            "finetune", str(files["model"]), "--train", str(files["train"]), "--valid", str(files["valid"]),
            "-o", str(out), "--epochs", "6", "--lr", "0.01", "--batch-size", "3", "--seed", "5",
        ]  # fmt: skip

    clean = tmp_path / "clean" / "tuned.toy"
    started = time.perf_counter()
    assert main(command(clean)) == 0
    seconds = time.perf_counter() - started

    out = tmp_path / "killed" / "tuned.toy"
    lock = safe_io.lock_path(out, folder=False)
    cli = [sys.executable, "-m", "ggnd_plugin.cli"]
    kills = 0
    for seed in SEEDS:
        # 13 atomic writes: the epoch-0 checkpoint, then per epoch the best model (when it improves)
        # and the checkpoint
        resume = ["--resume"] if seed else []
        kills += run_until_killed(
            [*cli, *command(out), *resume], lock, kill_plan(seed, 13, seconds), _env_with_toyhost()
        )
        check_files(out.parent, inputs)
    assert kills >= 3
    assert main([*command(out), "--resume"]) == 0
    no_leftovers(out.parent)

    a, b = adapter.load(clean), adapter.load(out)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    ca = torch.load(str(clean) + ".checkpoint.pt", weights_only=False)
    cb = torch.load(str(out) + ".checkpoint.pt", weights_only=False)
    assert ca["history"] == cb["history"] and ca["epoch"] == cb["epoch"] == 6
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key


# -------------------------------------------------------------------------------------------------
# ggnd stability
# -------------------------------------------------------------------------------------------------
def test_stability_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from ggnd_plugin import registry
    from ggnd_plugin.data import read_structures
    from ggnd_plugin.md.metrics import reference_bonds

    monkeypatch.syspath_prepend(str(TESTS))
    import fault_driver

    monkeypatch.setattr(registry, "resolve", lambda host, path: fault_driver.MorseAdapter())
    reference = read_structures(DATA, ":100")
    model_file = tmp_path / "bonded.pt"
    torch.save(dict(zip(("pairs", "lengths"), reference_bonds(reference), strict=True)), model_file)
    inputs = _digest([model_file, DATA, START])

    def command(out):
        return [
            "stability", str(model_file), "--start", str(START), "--reference", str(DATA),
            "--temperature", "300", "6000", "--replicas", "2", "--time-ps", "0.4", "--out", str(out),
            "--checkpoint-every", "40", "--record-every", "10", "--ensemble", "nvt-langevin", "--no-progress",
        ]  # fmt: skip

    clean = tmp_path / "clean"
    started = time.perf_counter()
    assert main(command(clean)) == 0
    seconds = time.perf_counter() - started

    out = tmp_path / "killed"
    lock = safe_io.lock_path(out, folder=True)
    driver = [sys.executable, str(TESTS / "fault_driver.py")]
    kills = 0
    for seed in SEEDS:
        # 10 checkpoints (every 40 of 400 steps, the last one finished) and 6 result files
        resume = ["--resume"] if seed else []
        kills += run_until_killed([*driver, *command(out), *resume], lock, kill_plan(seed, 16, seconds))
        check_files(out, inputs)
    assert kills >= 3
    assert main([*command(out), "--resume"]) == 0
    no_leftovers(out)

    a, b = (json.loads((folder / "results.json").read_text()) for folder in (clean, out))
    assert a == b and any(row["failed"] for row in a["replicas"])
    assert (clean / "summary.md").read_text() == (out / "summary.md").read_text()
    with np.load(clean / "timeseries.npz") as x, np.load(out / "timeseries.npz") as y:
        assert x.files == y.files
        for key in x.files:
            assert np.array_equal(x[key], y[key], equal_nan=True), key


# -------------------------------------------------------------------------------------------------
# ggnd data generate
# -------------------------------------------------------------------------------------------------
def test_data_generate_killed_anywhere_resumes_to_the_same_files(tmp_path):
    pytest.importorskip("tblite.ase")
    pytest.importorskip("rdkit")

    def command(out):
        return [
            "data", "generate", "--smiles", "CO", "--name", "meoh", "--temperature", "300", "600",
            "--frames", "5", "4", "--spacing-fs", "10", "--timestep-fs", "0.5", "--equilibration-ps", "0.02",
            "--split", "3", "-o", str(out), "--no-progress",
        ]  # fmt: skip

    clean = tmp_path / "clean"
    started = time.perf_counter()
    assert main(command(clean)) == 0
    seconds = time.perf_counter() - started

    out = tmp_path / "killed"
    lock = safe_io.lock_path(out, folder=True)
    cli = [sys.executable, "-m", "ggnd_plugin.cli"]
    kills = 0
    for seed in SEEDS:
        # 13 MD segments, each a checkpoint (plus the bond-stretch records, the split, README, record)
        resume = ["--resume"] if seed else []
        kills += run_until_killed([*cli, *command(out), *resume], lock, kill_plan(seed, 22, seconds))
        check_files(out, {})
    assert kills >= 3
    assert main([*command(out), "--resume"]) == 0
    no_leftovers(out)

    names = sorted(p.name for p in clean.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    assert names == [
        "README.md",
        "generation.json",
        "meoh_300K_test.xyz",
        "meoh_300K_train.xyz",
        "meoh_600K.xyz",
    ]
    for name in names:
        assert (clean / name).read_text().replace(str(clean), "OUT") == (out / name).read_text().replace(
            str(out), "OUT"
        ), name


# -------------------------------------------------------------------------------------------------
# Host fits: killed, then restarted from scratch in the same folder
# -------------------------------------------------------------------------------------------------
FIT_PARENT = """
import sys
from pathlib import Path
from ggnd_plugin.registry import get
host, train, valid, work = sys.argv[1:]
get(host).fit(Path(train), Path(valid), Path(work), config=None, epochs=2, seed=0, size="tiny")
"""


def _trainers_of(work: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(work) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes have used so far, from /proc/PID/stat."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15 of stat
    return total / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("host", ["mace", "nequip", "schnetpack"])
def test_host_fit_killed_restarts_from_scratch_to_the_clean_model(host, tmp_path):
    from ase.io import write

    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.host_fit import fit_status
    from ggnd_plugin.registry import get

    pytest.importorskip({"mace": "mace", "nequip": "nequip", "schnetpack": "schnetpack"}[host])
    adapter = get(host)
    frames = read_labelled(DATA, ":14")
    train, valid = tmp_path / "train.xyz", tmp_path / "valid.xyz"
    write(train, frames[:8])
    write(valid, frames[8:10])
    inputs = _digest([train, valid])

    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    clean = adapter.fit(train, valid, tmp_path / "clean", config=None, epochs=2, seed=0, size="tiny")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    fit_cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime

    # The process that called fit() is SIGKILLed mid-fit; its trainer must die with it.
    work = tmp_path / "killed"
    rng = random.Random(f"{host}-0")
    parent = subprocess.Popen(
        [sys.executable, "-c", FIT_PARENT, host, str(train), str(valid), str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    TALLY["runs"] += 1
    # Killed once it has done a random share of the clean fit's work: measured in CPU time, not wall time,
    # so a busy machine moves the kill point no more than an idle one.
    share = rng.uniform(0.35, 0.85) * fit_cpu
    while parent.poll() is None and _cpu_seconds(_trainers_of(work)) < share:
        time.sleep(0.05)
    assert parent.poll() is None, "the fit finished before the kill: lengthen the run"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    TALLY["kills"] += 1
    deadline = time.monotonic() + 20
    while _trainers_of(work) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _trainers_of(work), "the trainer outlived the process that started it"
    assert fit_status(work) == "running"
    check_files(work, inputs)

    restarted = adapter.fit(train, valid, work, config=None, epochs=2, seed=0, size="tiny")
    assert fit_status(work) == "done"
    check_files(work, inputs)
    no_leftovers(work)
    held_out = frames[10:]
    p, q = adapter.predict(clean, held_out), adapter.predict(restarted, held_out)
    if host == "schnetpack":
        # float32 PaiNN: two clean fits differ by ~1e-6 relative (threaded reductions), so does this
        torch.testing.assert_close(q.energy, p.energy, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(q.forces, p.forces, rtol=1e-4, atol=1e-4)
    else:
        for key, value in clean.state_dict().items():
            assert torch.equal(value, restarted.state_dict()[key]), key
        assert torch.equal(p.energy, q.energy) and torch.equal(p.forces, q.forces)


@pytest.fixture(scope="module", autouse=True)
def _print_tally(request):
    """The totals of this file's kill tests, printed after them (the README quotes them)."""
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else _nothing():
        print(f"\nfault injection totals: {TALLY}")
