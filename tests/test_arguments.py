"""Every option of every ``ggnd`` command, fed bad values: one error line naming the argument, exit 2.

The table below has rows (command, option, bad value, words the error must contain). The parsers are
introspected, so an option added without a row here fails ``test_every_option_has_a_row``. Flags (no
value) cannot be given a bad value and need no row. Most rows fail in argparse (``type=`` checks from
:mod:`ggnd_plugin.validation`, before any work); ``runtime`` rows fail in the command's first checks,
and the test checks they still fail fast and with one line.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from ggnd_plugin.cli import build_parser, main
from ggnd_plugin.default_data import default_data_path

THIRDPARTY = Path(__file__).parent / "thirdparty"
DATA = default_data_path("3bpa_300K_train")
# Commands that still print argparse's usage block (none: every command reports one line).
USAGE_BLOCK_COMMANDS: set[str] = set()


def _actions(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, (*path, name))
        elif isinstance(action, argparse._HelpAction | argparse._VersionAction) or action.nargs == 0:
            continue
        else:
            yield (
                " ".join(path),
                (action.option_strings[-1] if action.option_strings else action.dest),
                action,
            )


def _options(parser: argparse.ArgumentParser):
    for command, option, _ in _actions(parser):
        yield command, option


def _shown_as(command: str, option: str) -> str:
    """How argparse names the argument in its errors: ``-o/--output``, or a positional's metavar."""
    for c, o, action in _actions(build_parser()):
        if (c, o) == (command, option):
            return (
                "/".join(action.option_strings) if action.option_strings else (action.metavar or action.dest)
            )
    raise KeyError((command, option))


# -------------------------------------------------------------------------------------------------
# Files the rows refer to by name
# -------------------------------------------------------------------------------------------------
@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(THIRDPARTY))
    import toyhost_ggnd
    from ase.io import read, write

    frames = read(DATA, ":6")
    files = {
        "model": toyhost_ggnd.ToyAdapter().save(toyhost_ggnd.ToyPotential(), tmp_path / "tiny.toy"),
        "data": tmp_path / "ok.xyz",
        "unlabelled": tmp_path / "positions.xyz",
        "empty": tmp_path / "empty.xyz",
        "folder": tmp_path / "folder",
        "foreign": tmp_path / "project",
        "existing": tmp_path / "existing.out",
        "archive": tmp_path / "weights.pt",
        "garbage": tmp_path / "weights.bin",
        "bad_yaml": tmp_path / "bad.yaml",
        "text": tmp_path / "options.txt",
        "new": tmp_path / "new.out",
        "new_dir": tmp_path / "new_dir",
        "results": tmp_path / "results.json",
        "uranium_plus": tmp_path / "fermium.xyz",
        "odd": tmp_path / "odd.xyz",
        "charged": tmp_path / "charged.xyz",
    }
    write(files["data"], frames)
    bare = [a.copy() for a in frames]
    for atoms in bare:
        atoms.calc = None
        atoms.info.pop("energy", None)
        atoms.arrays.pop("forces", None)
    write(files["unlabelled"], bare)
    files["empty"].write_text("")
    files["folder"].mkdir()
    files["foreign"].mkdir()
    (files["foreign"] / "thesis.tex").write_text("mine")
    files["existing"].write_text("the user's file")
    torch.save({"weights": torch.zeros(3)}, files["archive"])
    files["garbage"].write_bytes(b"not a model at all")
    files["bad_yaml"].write_text("no_such_option: 3\n")
    files["text"].write_text("channels: 8\n")
    replicas = [
        {"model": model, "temperature_K": 1200.0, "replica": k, "start_frame": k, "seed": k,
         "stability_ps": 1.0, "failed": k == 0}
        for model in ("t", "c") for k in range(2)
    ]  # fmt: skip
    files["results"].write_text(json.dumps({"protocol": {"time_ps": 1.0}, "replicas": replicas}))
    from ase import Atoms

    write(files["uranium_plus"], Atoms("FmH", positions=[[0, 0, 0], [0, 0, 2.0]]))
    write(files["odd"], [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]), Atoms("H", positions=[[0, 0, 0]])])
    half = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"charge": 0.5})
    write(files["charged"], half)

    return {name: str(path) for name, path in files.items()}


# -------------------------------------------------------------------------------------------------
# Valid arguments per command; a row replaces one of them (or adds it) and puts it first
# -------------------------------------------------------------------------------------------------
def _valid(command: str, p: dict[str, str]) -> dict[str, list[str]]:
    model = {"model": [p["model"]]}
    return {
        "upgrade": {**model, "--output": [p["new"]]},
        "finetune": {**model, "--train": [p["data"]], "--output": [p["new"]], "--epochs": ["1"]},
        "evaluate": {**model, "--data": [p["data"]]},
        "stability": {
            "models": [p["model"]],
            "--start": [p["data"]],
            "--reference": [p["data"]],
            "--out": [p["new_dir"]],
            "--time-ps": ["0.01"],
        },
        "data generate": {
            "--smiles": ["CO"],
            "--temperature": ["300"],
            "--frames": ["2"],
            "--out": [p["new_dir"]],
        },
        "data reorder": {"input": [p["data"]], "--like": [p["data"]], "--output": [p["new"]]},
        "data label": {"frames": [p["data"]], "--output": [p["new"]]},
        "data list": {},
        "demo": {"--out": [p["new_dir"]]},
        "config": {"host": ["mace"]},
        "compare": {"results": [p["results"]], "--pair": ["t=c"], "--temperature": ["1200"]},
        "scan": {"models": [p["model"]], "--structure": [p["data"]], "--out": [p["new_dir"]]},
        "adapters": {},
    }[command]


def _argv(command: str, option: str, values: list[str], p) -> list[str]:
    """Positionals first (an option taking several values would swallow them), then the option under
    test, then the other valid options."""
    arguments = dict(_valid(command, p))
    arguments[option] = values
    positionals = [(n, v) for n, v in arguments.items() if not n.startswith("-")]
    tested = [] if not option.startswith("-") else [(option, values)]
    others = [(n, v) for n, v in arguments.items() if n.startswith("-") and n != option]
    words = command.split()
    for name, given in [*positionals, *tested, *others]:
        words += given if not name.startswith("-") else [name, *given]
    return words


A = "argparse"  # fails in argparse, naming the argument
R = "runtime"  # fails in the command's own first checks

ROWS = [
    # upgrade
    ("upgrade", "model", "missing.model", A, "missing.model: no such file"),
    ("upgrade", "model", "{folder}", A, "is a folder, not a file"),
    ("upgrade", "model", "{empty}", A, "is empty"),
    ("upgrade", "model", "{data}", A, "is a structure file (.xyz), not a model file"),
    ("upgrade", "model", "{garbage}", R, "weights.bin: not a model file of any known host"),
    ("upgrade", "--output", "{folder}", A, "is a folder; give a file name"),
    ("upgrade", "--output", "{model}", R, "is the MODEL input"),
    ("upgrade", "--output", "{existing}", R, "already exists; pass --overwrite"),
    ("upgrade", "--host", "nope", A, "no adapter named 'nope'"),
    ("upgrade", "--host", "", A, "must not be empty"),
    ("upgrade", "--config", "missing.yaml", A, "missing.yaml: no such file"),
    ("upgrade", "--config", "{text}", A, "is not a YAML file"),
    ("upgrade", "--config", "{bad_yaml}", R, "unknown GGND option"),
    ("upgrade", "--seed", "-1", A, "must be an integer from 0 to 4294967295, got -1"),
    ("upgrade", "--seed", "4294967296", A, "got 4294967296"),
    ("upgrade", "--seed", "1.5", A, "got '1.5'"),
    # finetune
    ("finetune", "model", "missing.model", A, "no such file"),
    ("finetune", "model", "{data}", A, "not a model file"),
    ("finetune", "--train", "missing.xyz", A, "no such file"),
    ("finetune", "--train", "{empty}", A, "is empty: it holds no structures"),
    ("finetune", "--train", "{archive}", A, "is a model or archive file"),
    ("finetune", "--train", "{folder}", A, "is a folder"),
    ("finetune", "--train", "{unlabelled}", R, "frame 0 has no energy"),
    ("finetune", "--valid", "missing.xyz", A, "no such file"),
    ("finetune", "--valid", "{archive}", A, "is a model or archive file"),
    ("finetune", "--output", "{folder}", A, "is a folder"),
    ("finetune", "--output", "{data}", R, "is the --train input"),
    ("finetune", "--output", "{model}", R, "is the MODEL input"),
    ("finetune", "--output", "{existing}", R, "already exists; pass --overwrite"),
    ("finetune", "--host", "nope", A, "no adapter named 'nope'"),
    ("finetune", "--config", "missing.yaml", A, "no such file"),
    ("finetune", "--config", "{bad_yaml}", R, "unknown GGND option"),
    ("finetune", "--epochs", "-1", A, "must be a positive integer, got -1"),
    ("finetune", "--epochs", "0", A, "must be a positive integer, got 0"),
    ("finetune", "--epochs", "2.5", A, "must be a positive integer, got '2.5'"),
    ("finetune", "--epochs", "ten", A, "got 'ten'"),
    ("finetune", "--lr", "0", A, "must be a positive number, got 0"),
    ("finetune", "--lr", "-0.001", A, "must be a positive number"),
    ("finetune", "--lr", "-1e-3", A, "expected one argument"),  # argparse reads it as an option
    ("finetune", "--lr", "nan", A, "got 'nan'"),
    ("finetune", "--lr", "inf", A, "got 'inf'"),
    ("finetune", "--batch-size", "0", A, "must be a positive integer, got 0"),
    ("finetune", "--energy-weight", "-1", A, "must be a number >= 0, got -1"),
    ("finetune", "--energy-weight", "nan", A, "got 'nan'"),
    ("finetune", "--forces-weight", "-0.5", A, "must be a number >= 0"),
    ("finetune", "--seed", "-3", A, "must be an integer from 0"),
    ("finetune", "--patience", "0", A, "must be a positive integer, got 0"),
    ("finetune", "--patience", "3", R, "--patience and --monitor forces follow the validation set"),
    ("finetune", "--monitor", "energy", A, "invalid choice: 'energy'"),
    ("finetune", "--monitor", "forces", R, "give --valid"),
    # compare
    ("compare", "results", "missing.json", A, "missing.json: no such file"),
    ("compare", "results", "{folder}", A, "is a folder, not a file"),
    ("compare", "results", "{data}", R, "not a results.json of `ggnd stability`"),
    ("compare", "--pair", "t", A, "a pair is TREATMENT=CONTROL"),
    ("compare", "--pair", "t=t", A, "two different model names"),
    ("compare", "--pair", "nope=c", R, "no replicas of model 'nope' at 1200 K"),
    ("compare", "--temperature", "0", A, "must be a positive number"),
    ("compare", "--temperature", "600", R, "no replicas of model 't' at 600 K"),
    ("compare", "--json", "{folder}", A, "is a folder"),
    ("compare", "--json", "{results}", R, "is the RESULTS input"),
    ("compare", "--json", "{existing}", R, "already exists; pass --overwrite"),
    # evaluate
    ("evaluate", "model", "missing.model", A, "no such file"),
    ("evaluate", "model", "{garbage}", R, "not a model file of any known host"),
    ("evaluate", "--data", "missing.xyz", A, "no such file"),
    ("evaluate", "--data", "{archive}", A, "is a model or archive file"),
    ("evaluate", "--data", "{unlabelled}", R, "frame 0 has no energy"),
    ("evaluate", "--host", "nope", A, "no adapter named"),
    ("evaluate", "--json", "{folder}", A, "is a folder"),
    ("evaluate", "--json", "{data}", R, "is the --data input"),
    ("evaluate", "--json", "{existing}", R, "already exists; pass --overwrite"),
    ("evaluate", "--batch-size", "-2", A, "must be a positive integer"),
    # stability
    ("stability", "models", "missing.model", A, "no such file"),
    ("stability", "models", "{data}", A, "not a model file"),
    ("stability", "models", "{garbage}", R, "not a model file of any known host"),
    ("stability", "--start", "missing.xyz", A, "no such file"),
    ("stability", "--start", "{empty}", A, "holds no structures"),
    ("stability", "--start", ["{data}", "{data}"], R, "one file or one per temperature"),
    ("stability", "--reference", "{archive}", A, "is a model or archive file"),
    ("stability", "--temperature", "0", A, "must be a positive number, got 0"),
    ("stability", "--temperature", "-300", A, "must be a positive number"),
    ("stability", "--temperature", ["300", "300"], R, "temperatures repeat"),
    ("stability", "--replicas", "0", A, "must be a positive integer"),
    ("stability", "--time-ps", "0", A, "must be a positive number"),
    ("stability", "--time-ps", "0.0001", R, "is shorter than one"),
    ("stability", "--timestep-fs", "-1", A, "must be a positive number"),
    ("stability", "--ensemble", "npt", A, "invalid choice: 'npt'"),
    ("stability", "--friction", "0", A, "must be a positive number"),
    ("stability", "--nose-hoover-tau-fs", "0", A, "must be a positive number"),
    ("stability", "--threshold", "-0.5", A, "must be a positive number"),
    ("stability", "--criterion", "energy", A, "invalid choice: 'energy'"),
    ("stability", "--bonds", "all", A, "invalid choice: 'all'"),
    ("stability", "--bond-cutoff", "0", A, "must be a positive number"),
    ("stability", "--rdf-window-ps", "0", A, "must be a positive number"),
    ("stability", "--rdf-bins", "0", A, "must be a positive integer"),
    ("stability", "--rdf-r-max", "-6", A, "must be a positive number"),
    ("stability", "--seed", "-1", A, "must be an integer from 0"),
    ("stability", "--device", "gpu", A, "must be cpu, cuda or cuda:N, got 'gpu'"),
    ("stability", "--device", "cpu:1", A, "must be cpu, cuda or cuda:N"),
    ("stability", "--device", "cuda:99", A, "cuda:99:"),
    ("stability", "--dtype", "float16", A, "invalid choice: 'float16'"),
    ("stability", "--record-every", "0", A, "must be a positive integer"),
    ("stability", "--checkpoint-every", "-5", A, "must be a positive integer"),
    ("stability", "--out", "{existing}", A, "is a file, not a folder"),
    ("stability", "--out", "{foreign}", R, "is not empty (thesis.tex)"),
    ("stability", "--host", "nope", A, "no adapter named"),
    ("stability", "--max-batch-atoms", "0", A, "must be a positive integer, got 0"),
    ("stability", "--max-batch-atoms", "64", R, "give --autobatch too"),
    ("stability", "--baseline", "", A, "must not be empty"),
    ("stability", "--baseline", "nope", R, "--baseline nope: not one of the models of this run (tiny)"),
    ("stability", "--failure-frames", "-1", A, "must be an integer >= 0, got -1"),
    ("stability", "--failure-frames", "2.5", A, "got '2.5'"),
    ("stability", "--failure-frame-every", "0", A, "must be a positive integer, got 0"),
    # scan
    ("scan", "models", "missing.model", A, "no such file"),
    ("scan", "models", "{data}", A, "not a model file"),
    ("scan", "--structure", "missing.xyz", A, "no such file"),
    ("scan", "--structure", "{archive}", A, "is a model or archive file"),
    ("scan", "--frame", "-1", A, "must be an integer >= 0"),
    ("scan", "--frame", "99", R, "--frame 99: "),
    ("scan", "--types", "", A, "must not be empty"),
    ("scan", "--types", "S-H", R, "bond type(s) S-H not in the structure"),
    ("scan", "--max-length", "0", A, "must be a positive number"),
    ("scan", "--max-length", "0.5", R, "is not beyond the"),
    ("scan", "--step", "-0.1", A, "must be a positive number"),
    ("scan", "--host", "nope", A, "no adapter named"),
    ("scan", "--out", "{existing}", A, "is a file, not a folder"),
    ("scan", "--out", "{foreign}", R, "is not empty (thesis.tex)"),
    # data generate
    ("data generate", "--smiles", "", A, "must not be empty"),
    ("data generate", "--temperature", "0", A, "must be a positive number"),
    ("data generate", "--temperature", "nan", A, "got 'nan'"),
    ("data generate", "--temperature", ["300", "300"], R, "lists a temperature twice"),
    ("data generate", "--frames", "0", A, "must be a positive integer"),
    ("data generate", "--frames", ["2", "3", "4"], R, "one count or one per temperature"),
    ("data generate", "--name", "a/b", A, "must be a plain file-name stem"),
    ("data generate", "--name", "a b", A, "must be a plain file-name stem"),
    ("data generate", "--spacing-fs", "0", A, "must be a positive number"),
    ("data generate", "--spacing-fs", "0.7", R, "whole number of time steps"),
    ("data generate", "--timestep-fs", "-0.5", A, "must be a positive number"),
    ("data generate", "--friction", "-0.01", A, "must be a number >= 0"),
    ("data generate", "--equilibration-ps", "-1", A, "must be a number >= 0"),
    ("data generate", "--method", "dft", A, "invalid choice: 'dft'"),
    ("data generate", "--electronic-temperature", "-300", A, "must be a number >= 0"),
    ("data generate", "--seed", "x", A, "got 'x'"),
    ("data generate", "--split", "0", A, "must be a positive integer"),
    ("data generate", "--split", "5", R, "--split 5: must be between 1 and 1"),
    ("data generate", "--split-temperature", "-1", A, "must be a positive number"),
    ("data generate", "--max-bond-stretch", "0", A, "must be a positive number"),
    ("data generate", "--out", "{existing}", A, "is a file, not a folder"),
    # data reorder
    ("data reorder", "input", "missing.xyz", A, "missing.xyz: no such file"),
    ("data reorder", "input", "{model}", A, "not a structure file"),
    ("data reorder", "--like", "{folder}", A, "is a folder, not a file"),
    ("data reorder", "--output", "{folder}", A, "is a folder; give a file name"),
    ("data reorder", "--output", "{data}", R, "is the INPUT input"),
    ("data reorder", "--output", "{existing}", R, "already exists; pass --overwrite"),
    # data label
    ("data label", "frames", "missing.xyz", A, "missing.xyz: no such file"),
    ("data label", "frames", "{model}", A, "not a structure file"),
    ("data label", "frames", "{empty}", A, "holds no structures"),
    ("data label", "frames", "{uranium_plus}", R, "frame 0: element(s) Fm (Z=100) beyond xTB's elements"),
    ("data label", "frames", "{odd}", R, "frame 1: 1 electrons with charge 0 cannot have 0 unpaired"),
    ("data label", "frames", "{charged}", R, "frame 0: info['charge'] must be a whole number, got 0.5"),
    ("data label", "--output", "{folder}", A, "is a folder; give a file name"),
    ("data label", "--output", "{data}", R, "is the FRAMES input"),
    ("data label", "--output", "{existing}", R, "already exists; pass --overwrite"),
    ("data label", "--method", "dft", A, "invalid choice: 'dft'"),
    ("data label", "--electronic-temperature", "-300", A, "must be a number >= 0"),
    # demo
    ("demo", "--out", "{existing}", A, "is a file, not a folder"),
    ("demo", "--out", "{foreign}", R, "is not empty (thesis.tex)"),
    ("demo", "--host", "auto", A, "no adapter named 'auto'"),
    ("demo", "--host", "nope", A, "no adapter named 'nope'"),
    ("demo", "--seed", "-1", A, "must be an integer from 0"),
    # commands owned elsewhere
    ("config", "host", "nope", A, "invalid choice: 'nope'"),
]


def test_every_option_has_a_row():
    covered = {(command, option) for command, option, *_ in ROWS}
    missing = [f"{c} {o}" for c, o in _options(build_parser()) if (c, o) not in covered]
    assert not missing, f"options without a bad-input row in tests/test_arguments.py: {missing}"


def _needs(command: str, option: str, kind: str):
    if command == "demo" and kind == R:
        pytest.importorskip("mace")  # the demo's host must be usable before its folder is looked at
    if command == "stability" and option == "models" and kind == R:
        pytest.importorskip("mace")  # detecting a file's host asks the installed hosts


@pytest.mark.parametrize(
    "command,option,value,kind,expected", ROWS, ids=lambda x: x if isinstance(x, str) else None
)
def test_a_bad_value_stops_with_one_line_naming_it(paths, capsys, command, option, value, kind, expected):
    _needs(command, option, kind)
    values = [value] if isinstance(value, str) else list(value)
    values = [v.format(**paths) for v in values]
    argv = _argv(command, option, values, paths)
    try:
        code = main(argv)
    except SystemExit as exit_:  # only the parsers of USAGE_BLOCK_COMMANDS exit from inside argparse
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    if command not in USAGE_BLOCK_COMMANDS:
        assert len(lines) == 1, err
    line = lines[-1]
    assert "error:" in line and expected in line, (argv, line)
    if kind == A:
        assert f"argument {_shown_as(command, option)}: " in line, line
    for name in ("new", "new_dir"):
        assert not Path(paths[name]).exists() or not any(Path(paths[name]).iterdir()), (
            "bad input wrote output"
        )
    for name in ("data", "model", "existing"):
        assert Path(paths[name]).exists()


def test_table_size(request):
    """How many bad inputs the table feeds to how many commands (the README quotes this)."""
    commands = {command for command, *_ in ROWS}
    options = {(command, option) for command, option, *_ in ROWS}
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else nullcontext():
        print(f"\nargument table: {len(commands)} commands, {len(options)} options, {len(ROWS)} bad inputs")
    assert len(ROWS) >= 100 and len(commands) >= 7
