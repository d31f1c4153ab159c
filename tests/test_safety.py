"""Nothing the user has is lost: refused overwrites, atomic writes, locks, verified checkpoints, and the
shared validation layer that gives the library the command line's messages (issue 14).

The host is the third-party toy adapter of ``tests/thirdparty`` (milliseconds per model), so every
check here runs the real command line on real files in a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ggnd_plugin import safe_io
from ggnd_plugin import validation as v
from ggnd_plugin.cli import main
from ggnd_plugin.data import read_labelled, read_structures
from ggnd_plugin.default_data import default_data_path
from ggnd_plugin.errors import CorruptFileError, GGNDError, OutputExistsError, OutputLockedError

THIRDPARTY = Path(__file__).parent / "thirdparty"
DATA = default_data_path("3bpa_300K_train")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toyhost(monkeypatch):
    monkeypatch.syspath_prepend(str(THIRDPARTY))
    import toyhost_ggnd

    return toyhost_ggnd


@pytest.fixture
def frames():
    return read_labelled(DATA, index=":8")


@pytest.fixture
def files(toyhost, frames, tmp_path):
    from ase.io import write

    torch.manual_seed(0)
    model = toyhost.ToyPotential()
    with torch.no_grad():
        model.e0.fill_(float(np.mean([a.info["energy"] / len(a) for a in frames])))
    paths = {"model": toyhost.ToyAdapter().save(model, tmp_path / "tiny.toy")}
    paths["data"] = tmp_path / "ok.xyz"
    write(paths["data"], frames[:6])
    return paths


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# -------------------------------------------------------------------------------------------------
# The three commands of the issue
# -------------------------------------------------------------------------------------------------
def test_finetune_onto_its_training_data_is_refused_and_the_data_kept(files, capsys):
    before = files["data"].read_bytes()
    code = main(
        [
            "finetune",
            str(files["model"]),
            "--train",
            str(files["data"]),
            "--epochs",
            "1",
            "-o",
            str(files["data"]),
        ]
    )
    assert code == 2
    assert "is the --train input" in _one_error_line(capsys)
    assert files["data"].read_bytes() == before
    # the same file through another spelling of its path
    other = files["data"].parent / "." / ".." / files["data"].parent.name / files["data"].name
    assert main(["finetune", str(files["model"]), "--train", str(files["data"]), "-o", str(other)]) == 2
    assert files["data"].read_bytes() == before


def test_upgrade_onto_its_model_is_refused_even_with_overwrite(files, capsys):
    before = files["model"].read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["upgrade", str(files["model"]), "-o", str(files["model"]), *extra]) == 2
        assert "is the MODEL input" in _one_error_line(capsys)
    assert files["model"].read_bytes() == before
    link = files["model"].parent / "link.toy"
    link.symlink_to(files["model"])
    assert main(["upgrade", str(files["model"]), "-o", str(link), "--overwrite"]) == 2
    assert files["model"].read_bytes() == before


def test_negative_epochs_are_refused_before_anything_is_written(files, tmp_path, capsys):
    out = tmp_path / "y.toy"
    code = main(
        ["finetune", str(files["model"]), "--train", str(files["data"]), "--epochs", "-1", "-o", str(out)]
    )
    assert code == 2
    assert "argument --epochs: must be a positive integer, got -1" in _one_error_line(capsys)
    assert not out.exists() and not Path(str(out) + ".checkpoint.pt").exists()


# -------------------------------------------------------------------------------------------------
# Overwrites: refused unless asked for, and then atomic
# -------------------------------------------------------------------------------------------------
def test_existing_outputs_need_overwrite(files, tmp_path, capsys, toyhost):
    adapter = toyhost.ToyAdapter()
    target = tmp_path / "mine.toy"
    target.write_bytes(b"the user's own file")
    assert main(["upgrade", str(files["model"]), "-o", str(target)]) == 2
    assert "already exists; pass --overwrite" in _one_error_line(capsys)
    assert target.read_bytes() == b"the user's own file"
    assert main(["upgrade", str(files["model"]), "-o", str(target), "--overwrite"]) == 0
    assert adapter.ggnd_blocks(adapter.load(target))

    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}")
    assert main(["evaluate", str(files["model"]), "--data", str(files["data"]), "--json", str(metrics)]) == 2
    assert "--json" in _one_error_line(capsys) and metrics.read_text() == "{}"
    assert (
        main(
            [
                "evaluate",
                str(files["model"]),
                "--data",
                str(files["data"]),
                "--json",
                str(metrics),
                "--overwrite",
            ]
        )
        == 0
    )
    assert json.loads(metrics.read_text())["n_frames"] == 6

    # finetune: a file that is not a stopped run is not resumed, and needs --overwrite
    common = [
        "finetune",
        str(files["model"]),
        "--train",
        str(files["data"]),
        "--epochs",
        "1",
        "-o",
        str(target),
    ]
    capsys.readouterr()
    assert main(common) == 2
    assert "already exists" in _one_error_line(capsys)
    assert main([*common, "--resume"]) == 2
    assert "not a stopped `ggnd finetune` run" in _one_error_line(capsys)
    assert main([*common, "--resume", "--overwrite"]) == 2
    assert main([*common, "--overwrite"]) == 0
    assert Path(str(target) + ".checkpoint.pt").exists()
    capsys.readouterr()
    # now it is this command's own run: a new run must say what it wants
    assert main(common) == 2
    assert "pass --resume to continue it or --overwrite" in _one_error_line(capsys)
    assert main([*common, "--resume"]) == 0


def test_resume_before_any_checkpoint_starts_the_run(files, tmp_path):
    out = tmp_path / "fresh.toy"
    assert (
        main(
            [
                "finetune",
                str(files["model"]),
                "--train",
                str(files["data"]),
                "--epochs",
                "1",
                "-o",
                str(out),
                "--resume",
            ]
        )
        == 0
    )
    assert out.exists()


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), safe_io.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


def test_a_kill_mid_write_leaves_the_old_file_and_a_temporary_the_next_run_removes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    safe_io.atomic_torch_save({"step": 1}, path)
    code = textwrap.dedent(
        f"""
        from ggnd_plugin import safe_io
        safe_io.atomic_torch_save({{"step": 2, "big": list(range(10000))}}, {str(path)!r})
        """
    )
    env = dict(os.environ, **{safe_io.KILL_AT_WRITE_ENV: "1"})
    process = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert process.returncode == -9
    assert safe_io.verified_torch_load(path) == {"step": 1}
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(safe_io.TMP_PREFIX)]
    assert len(leftovers) == 1
    with pytest.raises(CorruptFileError, match="truncated"):
        safe_io.verify_torch_file(leftovers[0] / "checkpoint.pt")
    assert safe_io.remove_stale_temporaries(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_adapter_save_is_made_atomic_whatever_the_adapter_does(toyhost, tmp_path):
    class Failing(toyhost.ToyAdapter):
        def save(self, model, path):
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")

    target = tmp_path / "model.toy"
    target.write_bytes(b"previous")
    with pytest.raises(OSError):
        safe_io.save_model(Failing(), toyhost.ToyPotential(), target)
    assert target.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


# -------------------------------------------------------------------------------------------------
# Checkpoints: verified before they are loaded
# -------------------------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped bit in the middle of the largest record (tensor data or the pickle)
        with zipfile.ZipFile(path) as archive:
            info = max(archive.infolist(), key=lambda i: i.file_size)
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
        data[offset] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,expected", [("truncated", "truncated"), ("flipped", "fails its checksum")])
def test_a_damaged_finetune_checkpoint_is_reported_not_loaded(files, tmp_path, capsys, how, expected):
    out = tmp_path / "run.toy"
    common = ["finetune", str(files["model"]), "--train", str(files["data"]), "-o", str(out), "--lr", "0.01"]
    assert main([*common, "--epochs", "2"]) == 0
    checkpoint = Path(str(out) + ".checkpoint.pt")
    _damage(checkpoint, how)
    damaged = checkpoint.read_bytes()
    model_before = out.read_bytes()
    capsys.readouterr()
    assert main([*common, "--epochs", "3", "--resume"]) == 2
    err = _one_error_line(capsys)
    assert checkpoint.name in err and expected in err and "was not loaded" in err
    assert checkpoint.read_bytes() == damaged and out.read_bytes() == model_before


def test_a_damaged_stability_checkpoint_is_reported(tmp_path):
    from ggnd_plugin.md.metrics import reference_bonds
    from ggnd_plugin.md.reference_models import bonded_morse_model
    from ggnd_plugin.md.stability import StabilityProtocol, run_stability

    frames = read_structures(DATA, ":20")
    bonds = reference_bonds(frames)
    protocol = StabilityProtocol(temperatures=(300.0,), replicas=2, time_ps=0.02, checkpoint_every_steps=10)
    run_stability({"m": bonded_morse_model(*bonds)}, frames, frames, protocol, tmp_path, progress=False)
    checkpoint = tmp_path / "checkpoints" / "m.pt"
    _damage(checkpoint, "flipped")
    with pytest.raises(CorruptFileError, match=r"m\.pt: the stability checkpoint .* fails its checksum"):
        run_stability(
            {"m": bonded_morse_model(*bonds)}, frames, frames, protocol, tmp_path, resume=True, progress=False
        )


# -------------------------------------------------------------------------------------------------
# One run per output
# -------------------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from ggnd_plugin.safe_io import output_lock
with output_lock(sys.argv[1], folder=sys.argv[2] == "dir"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(target: Path, kind: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(target), kind], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_on_the_same_output_stops_with_the_holders_pid(files, tmp_path, capsys):
    out = tmp_path / "tuned.toy"
    holder = _holder(out, "file")
    try:
        code = main(
            ["finetune", str(files["model"]), "--train", str(files["data"]), "-o", str(out), "--epochs", "1"]
        )
        assert code == 2
        err = _one_error_line(capsys)
        assert f"pid {holder.pid}" in err and "in use by another run" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock of a killed process does not block: its file is still there, with its pid
    assert safe_io.lock_path(out, folder=False).exists()
    assert (
        main(
            ["finetune", str(files["model"]), "--train", str(files["data"]), "-o", str(out), "--epochs", "1"]
        )
        == 0
    )
    assert not safe_io.lock_path(out, folder=False).exists()


def test_a_stale_lock_file_from_a_dead_pid_does_not_block(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = safe_io.lock_path(tmp_path, folder=True)
    lock.write_text(json.dumps({"pid": dead.pid, "host": "here", "command": "ggnd stability"}))
    with safe_io.output_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with safe_io.output_lock(tmp_path):  # re-entrant within the process
            pass
        assert lock.exists()
    assert not lock.exists()


def test_a_held_folder_lock_refuses_the_library_too(tmp_path):
    from ggnd_plugin.md.stability import StabilityProtocol, run_stability

    holder = _holder(tmp_path / "run", "dir")
    try:
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            frames = read_structures(DATA, ":4")
            run_stability({"m": object()}, frames, frames, StabilityProtocol(time_ps=0.01), tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()


# -------------------------------------------------------------------------------------------------
# Output folders
# -------------------------------------------------------------------------------------------------
def test_stability_refuses_a_foreign_folder_and_an_input_among_its_outputs(tmp_path):
    from argparse import Namespace

    from ggnd_plugin.commands.stability import check_out

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.md").write_text("mine")
    args = Namespace(
        models=[tmp_path / "m.model"], start=[DATA], reference=DATA, out=folder, resume=False, overwrite=False
    )
    with pytest.raises(OutputExistsError, match="not empty \\(notes.md\\)"):
        check_out(args)
    args.resume = True
    with pytest.raises(OutputExistsError, match="holds no `ggnd stability` run"):
        check_out(args)
    args.resume, args.overwrite = False, True
    check_out(args)  # allowed: the user asked for it
    reference = folder / "summary.md"
    reference.write_text("")
    args.reference = reference
    with pytest.raises(OutputExistsError, match="is the --reference input"):
        check_out(args)


def test_demo_folder_of_another_run_or_program_is_refused(tmp_path):
    from ggnd_plugin.demo import DemoSettings, check_demo_output

    out = tmp_path / "demo"
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "demo.json").write_text(json.dumps({"host": "mace", "settings": {"seed": 0}}))
    with pytest.raises(OutputExistsError, match="other settings .*host: mace -> nequip"):
        check_demo_output(out, "nequip", DemoSettings(), overwrite=False)
    check_demo_output(out, "nequip", DemoSettings(), overwrite=True)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("")
    with pytest.raises(OutputExistsError, match="thesis.tex"):
        check_demo_output(foreign, "mace", DemoSettings(), overwrite=False)


def test_host_fit_folder_of_something_else_is_refused_and_an_earlier_fit_restarted(tmp_path):
    from ggnd_plugin.host_fit import RECORD, fit_status, fit_work_dir

    work = tmp_path / "work"
    work.mkdir()
    (work / "train.xyz").write_text("")  # an input inside the folder is fine
    with fit_work_dir(work, "toy", ["model.pt", "logs"], [work / "train.xyz"]):
        (work / "model.pt").write_text("half-trained")
        (work / "logs").mkdir()
        assert fit_status(work) == "running"
        # the process is killed here: the record still says running
        state = json.loads((work / RECORD).read_text())
    assert state["status"] == "running" and fit_status(work) == "done"
    with fit_work_dir(work, "toy", ["model.pt", "logs"], [work / "train.xyz"]):
        assert not (work / "model.pt").exists() and not (work / "logs").exists()
        assert (work / "train.xyz").exists()
    (work / "unrelated.txt").write_text("")
    os.remove(work / RECORD)
    with pytest.raises(OutputExistsError, match="unrelated.txt"), fit_work_dir(work, "toy", [], []):
        pass


def test_ggnd_mace_train_refuses_an_existing_model_and_a_model_that_is_an_input(tmp_path):
    from argparse import Namespace

    from ggnd_plugin.adapters.mace.training import check_model_output

    args = Namespace(
        name="x",
        work_dir=str(tmp_path),
        model_dir=None,
        train_file=str(tmp_path / "x.model"),
        config=None,
        restart_latest=False,
    )
    with pytest.raises(OutputExistsError, match="is the --train_file input"):
        check_model_output(args, overwrite=True)
    args.train_file = str(tmp_path / "train.xyz")
    (tmp_path / "x.model").write_bytes(b"fitted")
    with pytest.raises(OutputExistsError, match="x.model already exists; pass --overwrite"):
        check_model_output(args, overwrite=False)
    assert check_model_output(args, overwrite=True) == tmp_path / "x.model"
    args.restart_latest = True
    check_model_output(args, overwrite=False)


@pytest.mark.parametrize(
    "script,arguments",
    [
        ("block_scaling.py", ["--quick"]),
        ("replica_throughput.py", []),
        ("ggnd_overhead.py", ["a.model", "b.model", "--frames", "x.xyz"]),
    ],
)
def test_benchmarks_refuse_to_replace_results_before_measuring(tmp_path, script, arguments):
    out = tmp_path / "results.json"
    out.write_text("{}")
    flag = "--json" if script == "ggnd_overhead.py" else "--out"
    process = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *arguments, flag, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2, process.stderr
    assert "already exists; pass --overwrite" in process.stderr
    assert out.read_text() == "{}"


# -------------------------------------------------------------------------------------------------
# Item 4: the library rejects what the command line rejects, with the same words
# -------------------------------------------------------------------------------------------------
def _bad_frames(frames, problem):
    bad = [a.copy() for a in frames[:3]]
    if problem == "nan":
        positions = bad[2].get_positions()
        positions[4, 1] = np.nan
        bad[2].set_positions(positions)
    elif problem == "element":
        numbers = bad[1].get_atomic_numbers()
        numbers[0] = 16
        bad[1].set_atomic_numbers(numbers)
    elif problem == "empty":
        del bad[1][:]
    return bad


@pytest.mark.parametrize(
    "problem,message",
    [
        ("nan", "frame 2 has non-finite positions"),
        ("element", "frame 1 contains S, which the toyhost model does not know (it knows H, C, N, O)"),
        ("empty", "frame 1 has no atoms"),
    ],
)
def test_predict_rejects_what_the_cli_rejects_with_the_same_message(
    files, frames, toyhost, tmp_path, capsys, problem, message
):
    from ase.io import write

    adapter = toyhost.ToyAdapter()
    model = adapter.load(files["model"])
    with pytest.raises(GGNDError) as library:
        adapter.predict(model, _bad_frames(frames, problem))
    assert str(library.value) == f"structures: {message}"
    if problem == "empty":
        return  # extxyz cannot hold an empty frame next to others
    labelled = _bad_frames(frames, problem)
    for atoms, original in zip(labelled, frames, strict=False):
        atoms.info["energy"] = original.info["energy"]
        atoms.arrays["forces"] = original.arrays["forces"].copy()
    write(tmp_path / "bad.xyz", labelled)
    assert main(["evaluate", str(files["model"]), "--data", str(tmp_path / "bad.xyz")]) == 2
    assert _one_error_line(capsys).endswith(f"bad.xyz: {message}")


def test_predict_of_nothing_or_of_a_single_atoms_is_refused(files, frames, toyhost):
    adapter = toyhost.ToyAdapter()
    model = adapter.load(files["model"])
    with pytest.raises(GGNDError, match="structures: holds no frames"):
        adapter.predict(model, [])
    with pytest.raises(GGNDError, match="got a single Atoms"):
        adapter.predict(model, frames[0])
    with pytest.raises(GGNDError, match="frame 0 is a Tensor, not an ase.Atoms"):
        adapter.predict(model, [torch.zeros(3, 3)])


def test_run_stability_rejects_bad_frames_and_values_like_the_cli(frames):
    from ggnd_plugin.md.stability import StabilityProtocol, run_stability

    protocol = StabilityProtocol(temperatures=(300.0,), replicas=1, time_ps=0.01)
    with pytest.raises(GGNDError, match="^start frames: frame 2 has non-finite positions$"):
        run_stability({"m": object()}, _bad_frames(frames, "nan"), frames, protocol, progress=False)
    with pytest.raises(GGNDError, match="^reference frames: holds no frames$"):
        run_stability({"m": object()}, frames, [], protocol, progress=False)
    for name, value in (("replicas", 0), ("time_ps", -1.0), ("seed", -1), ("threshold", float("nan"))):
        bad = StabilityProtocol(**{**protocol.__dict__, name: value})
        with pytest.raises(GGNDError) as error:
            run_stability({"m": object()}, frames, frames, bad, progress=False)
        # the same words as `ggnd stability --replicas 0` ("argument --replicas: must be ...")
        check = {
            "replicas": v.positive_int,
            "time_ps": v.positive_float,
            "seed": v.seed,
            "threshold": v.positive_float,
        }[name]
        with pytest.raises(v._Problem) as problem:
            check(value)
        assert str(error.value) == f"{name}: {problem.value}"


def test_finetune_settings_refuse_what_the_cli_refuses():
    from ggnd_plugin.training import FinetuneSettings

    with pytest.raises(GGNDError, match="^epochs: must be a positive integer, got -1$"):
        FinetuneSettings(epochs=-1)
    with pytest.raises(GGNDError, match="^lr: must be a positive number"):
        FinetuneSettings(lr=0.0)
    with pytest.raises(GGNDError, match="both 0"):
        FinetuneSettings(energy_weight=0.0, forces_weight=0.0)


def test_ggnd_error_is_a_value_error():
    assert issubclass(GGNDError, ValueError)
    assert issubclass(OutputExistsError, GGNDError) and issubclass(CorruptFileError, GGNDError)


# -------------------------------------------------------------------------------------------------
# The GGND block's inputs (the block calls validate_block_inputs in its forward)
# -------------------------------------------------------------------------------------------------
def _block_inputs(n=5):
    positions = torch.randn(n, 3, dtype=torch.float64)
    species = torch.tensor([0, 1, 2, 1, 0])[:n]
    batch = torch.tensor([0, 0, 0, 1, 1])[:n]
    return positions, species, batch


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda p, s, b: (p[:0], s[:0], b[:0]), "the batch holds no atoms"),
        (
            lambda p, s, b: (p.index_fill(0, torch.tensor([3]), float("nan")), s, b),
            r"positions are not finite \(first at atom 3\)",
        ),
        (lambda p, s, b: (p.index_fill(0, torch.tensor([1]), float("inf")), s, b), "first at atom 1"),
        (lambda p, s, b: (p, s + 2, b), r"species indices must lie in 0\.\.2, got 2\.\.4"),
        (lambda p, s, b: (p, s - 1, b), r"species indices must lie in 0\.\.2, got -1\.\.1"),
        (lambda p, s, b: (p[:, :2], s, b), r"positions must have shape \(n_atoms, 3\), got \(5, 2\)"),
        (lambda p, s, b: (p, s[:4], b), r"species must have shape \(5,\), got \(4,\)"),
        (lambda p, s, b: (p, s.double(), b), "species must be an integer tensor, got a float64 tensor"),
        (lambda p, s, b: (p, s, b.flip(0)), "batch must be non-decreasing"),
        (lambda p, s, b: (p, s, b[:3]), r"batch must have shape \(5,\), got \(3,\)"),
        (lambda p, s, b: (p.long(), s, b), "positions must be a floating-point tensor, got a int64 tensor"),
    ],
)
def test_block_inputs_are_checked(change, message):
    positions, species, batch = change(*_block_inputs())
    with pytest.raises(GGNDError, match=message):
        v.validate_block_inputs(positions, species, batch, num_species=3)
    with pytest.raises(ValueError):  # what callers of the block caught before
        v.validate_block_inputs(positions, species, batch, num_species=3)
    v.validate_block_inputs(positions, species, batch, num_species=3, enabled=False)  # the caller's switch


def test_block_input_checks_accept_good_input_and_host_features():
    positions, species, batch = _block_inputs()
    v.validate_block_inputs(positions, species, batch, num_species=3, host=torch.zeros(5, 7), host_dim=7)
    with pytest.raises(GGNDError, match=r"host features must have shape \(5, 7\), got \(5, 6\)"):
        v.validate_block_inputs(positions, species, batch, num_species=3, host=torch.zeros(5, 6), host_dim=7)
    host = torch.zeros(5, 7)
    host[2, 3] = float("nan")
    with pytest.raises(GGNDError, match="host features are not finite"):
        v.validate_block_inputs(positions, species, batch, num_species=3, host=host, host_dim=7)


def test_block_input_checks_are_skipped_under_tracing():
    positions, species, batch = _block_inputs()

    def check(p):
        v.validate_block_inputs(p, species, batch, num_species=3)
        return p * 2

    traced = torch.jit.trace(check, (positions,))
    bad = positions.clone()
    bad[0, 0] = float("nan")
    assert torch.isnan(traced(bad)[0, 0])  # no check was recorded into the trace
    with pytest.raises(GGNDError):
        check(bad)


@pytest.mark.parametrize("command", ["stability", "data generate", "demo"])
def test_a_second_run_into_a_folder_in_use_stops_with_one_line(command, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    if command == "stability":
        monkeypatch.syspath_prepend(str(Path(__file__).parent))
        import fault_driver

        from ggnd_plugin import registry

        monkeypatch.setattr(registry, "resolve", lambda host, path: fault_driver.MorseAdapter())
        from ggnd_plugin.md.metrics import reference_bonds

        model = tmp_path / "bonded.pt"
        torch.save(
            dict(zip(("pairs", "lengths"), reference_bonds(read_structures(DATA, ":20")), strict=True)), model
        )
        argv = ["stability", str(model), "--start", str(DATA), "--reference", str(DATA), "--time-ps", "0.01"]
    elif command == "data generate":
        pytest.importorskip("tblite.ase")
        pytest.importorskip("rdkit")
        argv = [
            "data",
            "generate",
            "--smiles",
            "CO",
            "--temperature",
            "300",
            "--frames",
            "1",
            "--no-progress",
        ]
    else:
        pytest.importorskip("mace")
        argv = ["demo", "--quick"]
    holder = _holder(out, "dir")
    try:
        assert main([*argv, "--out", str(out)]) == 2
        err = _one_error_line(capsys)
        assert f"pid {holder.pid}" in err and "in use by another run" in err
        assert [p.name for p in out.iterdir()] == [safe_io.DIR_LOCK_NAME]  # nothing was written
    finally:
        holder.kill()
        holder.wait()
