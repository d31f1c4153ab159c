"""``make check-install``: every install route of the README, from a wheel built from this checkout.

Builds the sdist and the wheel (``uv build``: the wheel is built from the sdist, so both are checked),
checks that the wheel carries the package data and entry points, then for each route makes a fresh
venv with uv, installs the route from the wheel and runs in it, from the route's own folder (where the
checkout's sources are not importable):

- ``ggnd --version`` and ``ggnd --help`` (timed), ``ggnd config HOST`` and ``ggnd env overrides``;
- ``ggnd adapters --json`` (which hosts are usable must match the route) and ``ggnd adapters``;
- .ci/install_probe.py: ``import ggnd_plugin`` stays light, the block on a molecule, tiny host models;
- for each host of the route: ``ggnd upgrade`` of the tiny model and ``ggnd evaluate`` of the result;
- route-specific commands (``ggnd-mace-train --help``, ``ggnd data generate`` for xtb, hydra's help of
  ``spktrain`` and ``nequip-train`` for the search-path plugin).

The subprocesses get the caller's environment without VIRTUAL_ENV, PYTHONPATH and
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: the routes must work without any variable set.

Pins: ``--resolve lock`` (the default, what CI runs) constrains every install to the versions of
requirements.lock, so the check is reproducible and installs from uv's cache; the [mace] route is
constrained without the lock's e3nn line, since mace-torch's own pin (e3nn 0.4.4) is what a user of that
route gets. ``--resolve fresh`` constrains nothing: the routes resolve as a user's would today (it
downloads whatever is new on the registry).

Writes a table to stdout and the record to build/check-install.json; exits 1 when any route failed.
Venvs live under build/check-install/ and are deleted after their route unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "install_probe.py"
HOSTS = ("mace", "nequip", "schnetpack")
# Model file the probe writes per host (install_probe.TINY_MODELS), relative to the route's folder.
TINY_MODEL_FILES = {"mace": "tiny.model", "nequip": "tiny.nequip.zip", "schnetpack": "best_model"}
UPGRADED_FILES = {"mace": "upgraded.model", "nequip": "upgraded.nequip.zip", "schnetpack": "upgraded_model"}
TINY_GGND = "version: 2\nchannels: 8\nheads: 2\nsteps: 2\n"
RECORDED_DISTRIBUTIONS = (
    "torch",
    "e3nn",
    "numpy",
    "ase",
    "torch-sim-atomistic",
    "mace-torch",
    "nequip",
    "schnetpack",
    "tblite",
    "rdkit",
)
SCRUBBED_VARIABLES = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
# Files a wheel without its package data or entry points would miss.
WHEEL_MUST_HAVE = (
    "ggnd_plugin/configs/nequip_train.yaml",
    "ggnd_plugin/configs/nequip_finetune.yaml",
    "ggnd_plugin/configs/schnetpack_experiment.yaml",
    "ggnd_plugin/configs/mace_train.yaml",
    "ggnd_plugin/configs/all_hosts_overrides.txt",
    "ggnd_plugin/default_data/3bpa/3bpa_300K_test.xyz",
    "ggnd_plugin/adapters/nequip/fit.yaml",
    "ggnd_plugin/adapters/schnetpack/configs/experiment/ggnd_painn_3bpa.yaml",
    "ggnd_plugin/adapters/schnetpack/configs/ggnd/painn.yaml",
    "hydra_plugins/ggnd_plugin_searchpath/__init__.py",
)
ENTRY_POINTS_MUST_HAVE = (
    "ggnd = ggnd_plugin.cli:main",
    "ggnd-mace-train = ggnd_plugin.adapters.mace.training:main",
    "[ggnd_plugin.adapters]",
    "[ggnd_plugin.starter_configs]",
    "[nequip.extension]",
)


@dataclass
class Route:
    name: str
    extra: str | None  # the wheel's extra; None: the base install
    hosts: tuple[str, ...]  # hosts that must be usable after the route
    two_step: bool = False  # base first, then `ggnd env overrides` and the [all] extra with --override


ROUTES = {
    "base": Route("base", None, ()),
    "mace": Route("mace", "mace", ("mace",)),
    "nequip": Route("nequip", "nequip", ("nequip",)),
    "schnetpack": Route("schnetpack", "schnetpack", ("schnetpack",)),
    "xtb": Route("xtb", "xtb", ()),
    "all-hosts": Route("all-hosts", "all", HOSTS, two_step=True),
}


@dataclass
class Result:
    route: str
    ok: bool = True
    install_s: float = 0.0
    venv_mib: float = 0.0
    version_s: float | None = None
    help_s: float | None = None
    versions: dict = field(default_factory=dict)
    block: dict = field(default_factory=dict)
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class StepFailed(Exception):
    pass


def run(command: list[str], *, cwd: Path, env: dict[str, str], log: Path, timeout: float = 900) -> str:
    """Run ``command``; append it and its output to ``log``; raise StepFailed with its tail on failure."""
    started = time.perf_counter()
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        stdout, output, code = result.stdout, result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as error:
        stdout, output, code = (
            "",
            f"{error.stdout or ''}{error.stderr or ''}\ntimed out after {timeout} s",
            -1,
        )
    elapsed = time.perf_counter() - started
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}   ({elapsed:.1f} s, exit {code})\n{output}\n")
    if code != 0:
        tail = "\n".join(output.strip().splitlines()[-12:])
        raise StepFailed(
            f"`{' '.join(Path(c).name if c.startswith('/') else c for c in command)}` exited {code}:\n{tail}"
        )
    return stdout


def base_python() -> str:
    """The Python 3.12 that this script's venv was made from (uv must not download one)."""
    return getattr(sys, "_base_executable", sys.executable)


def build(source: Path, dist: Path, uv: list[str], env: dict[str, str], log: Path) -> tuple[Path, Path]:
    run(
        [
            *uv,
            "build",
            "--no-python-downloads",
            "--python",
            base_python(),
            "--out-dir",
            str(dist),
            str(source),
        ],
        cwd=source,
        env=env,
        log=log,
    )
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise StepFailed(
            f"uv build wrote {[p.name for p in dist.iterdir()]}, expected one wheel and one sdist"
        )
    return wheels[0], sdists[0]


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(
            (archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), ""
        )
    missing = [name for name in WHEEL_MUST_HAVE if name not in names]
    missing += [f"entry point {line!r}" for line in ENTRY_POINTS_MUST_HAVE if line not in entry_points]
    if missing:
        raise StepFailed(f"{wheel.name} lacks {missing}")


def venv_mebibytes(path: Path) -> float:
    # du counts every file of the venv once: what the venv costs on a disk without uv's hard links.
    output = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(output.split()[0]) / 1024


def installed_versions(venv: Path, uv: list[str], env, log) -> dict[str, str]:
    listing = run(
        [*uv, "pip", "list", "--python", str(venv / "bin" / "python"), "--format", "json"],
        cwd=venv,
        env=env,
        log=log,
    )
    installed = {package["name"].lower(): package["version"] for package in json.loads(listing)}
    return {name: installed[name] for name in RECORDED_DISTRIBUTIONS if name in installed}


def constraints_for(route: Route, resolve: str, folder: Path) -> list[str]:
    if resolve == "fresh":
        return []
    lock = (REPO / "requirements.lock").read_text().splitlines()
    if route.name == "mace":
        lock = [line for line in lock if not line.startswith("e3nn==")]
    path = folder / "constraints.txt"
    path.write_text("\n".join(lock) + "\n")
    return ["--constraint", str(path)]


def install(
    route: Route, wheel: Path, venv: Path, folder: Path, uv: list[str], env, log, resolve: str
) -> None:
    python = str(venv / "bin" / "python")
    constraints = constraints_for(route, resolve, folder)
    run(
        [*uv, "venv", "--no-python-downloads", "--python", base_python(), str(venv)],
        cwd=folder,
        env=env,
        log=log,
    )
    if route.two_step:
        # The README's all-hosts route: the package prints its own override file.
        run(
            [*uv, "pip", "install", "--python", python, *constraints, str(wheel)],
            cwd=folder,
            env=env,
            log=log,
        )
        overrides = run([str(venv / "bin" / "ggnd"), "env", "overrides"], cwd=folder, env=env, log=log)
        (folder / "ggnd-overrides.txt").write_text(overrides)
        extra = ["--override", str(folder / "ggnd-overrides.txt")]
    else:
        extra = []
    requirement = f"{wheel}[{route.extra}]" if route.extra else str(wheel)
    # --compile-bytecode, as pip does on install: without .pyc files (and PYTHONDONTWRITEBYTECODE is
    # common in containers) every later `import torch` would compile torch again.
    command = [*uv, "pip", "install", "--compile-bytecode", "--python", python, *constraints, *extra]
    run([*command, requirement], cwd=folder, env=env, log=log)


def timed(command: list[str], *, cwd: Path, env, log) -> float:
    started = time.perf_counter()
    run(command, cwd=cwd, env=env, log=log)
    return time.perf_counter() - started


def check_route(route: Route, venv: Path, folder: Path, env, log, result: Result) -> None:
    bin_dir = venv / "bin"
    ggnd = str(bin_dir / "ggnd")

    def step(name: str, action) -> None:
        try:
            action()
        except StepFailed as error:
            result.ok = False
            result.failed.append(f"{name}: {error}")
        else:
            result.passed.append(name)

    def cli_startup() -> None:
        run([ggnd, "--version"], cwd=folder, env=env, log=log)  # first run: compiles bytecode
        result.version_s = timed([ggnd, "--version"], cwd=folder, env=env, log=log)
        result.help_s = timed([ggnd, "--help"], cwd=folder, env=env, log=log)
        for host in ("mace", "nequip", "nequip-finetune", "schnetpack"):
            if "version: 2" not in run([ggnd, "config", host], cwd=folder, env=env, log=log):
                raise StepFailed(f"`ggnd config {host}` printed no `version: 2`")
        if "e3nn>=0.6" not in run([ggnd, "env", "overrides"], cwd=folder, env=env, log=log):
            raise StepFailed("`ggnd env overrides` printed no e3nn override")

    def adapters() -> None:
        records = json.loads(run([ggnd, "adapters", "--json"], cwd=folder, env=env, log=log))
        usable = sorted(r["name"] for r in records if r["usable"])
        if usable != sorted(route.hosts):
            reasons = {r["name"]: r.get("reason") for r in records if not r["usable"]}
            raise StepFailed(
                f"usable adapters {usable}, expected {sorted(route.hosts)}; not usable: {reasons}"
            )
        # Wide enough that rich keeps each note on one line; every note must be shown as it is (the
        # install hints contain "[mace]", which rich drops as markup unless escaped).
        table = run([ggnd, "adapters"], cwd=folder, env={**env, "COLUMNS": "400"}, log=log)
        for record in records:
            if not record["usable"] and record["reason"] not in table:
                raise StepFailed(f"`ggnd adapters` does not show the note {record['reason']!r} as it is")

    def probe() -> None:
        output = run(
            [str(bin_dir / "python"), str(PROBE), str(folder), "--hosts", *route.hosts],
            cwd=folder,
            env=env,
            log=log,
        )
        record = json.loads(output.strip().splitlines()[-1])
        result.block = {k: v for k, v in record.items() if k.startswith("block_")}

    def upgrade_and_evaluate(host: str) -> None:
        config = folder / "ggnd-tiny.yaml"
        config.write_text(TINY_GGND)
        upgraded = folder / host / UPGRADED_FILES[host]
        run(
            [
                ggnd,
                "upgrade",
                str(folder / host / TINY_MODEL_FILES[host]),
                "-o",
                str(upgraded),
                "--host",
                host,
                "--config",
                str(config),
            ],
            cwd=folder,
            env=env,
            log=log,
        )
        metrics_file = folder / host / "metrics.json"
        run(
            [
                ggnd,
                "evaluate",
                str(upgraded),
                "--data",
                str(folder / "frames.xyz"),
                "--json",
                str(metrics_file),
            ],
            cwd=folder,
            env=env,
            log=log,
        )  # --host auto: the upgraded file must be recognised
        metrics = json.loads(metrics_file.read_text())
        values = [metrics[key] for key in ("energy_mae", "forces_mae")]
        if metrics.get("n_frames") != 2 or not all(v == v and abs(v) < float("inf") for v in values):
            raise StepFailed(f"ggnd evaluate gave {metrics}")

    def mace_train_help() -> None:
        if "--ggnd_channels" not in run(
            [str(bin_dir / "ggnd-mace-train"), "--help"], cwd=folder, env=env, log=log
        ):
            raise StepFailed("ggnd-mace-train --help lists no --ggnd_channels")

    def xtb_data() -> None:
        out = folder / "xtb-data"
        run(
            [
                ggnd,
                "data",
                "generate",
                "--smiles",
                "O",
                "--temperature",
                "300",
                "--frames",
                "2",
                "--spacing-fs",
                "1",
                "--equilibration-ps",
                "0",
                "-o",
                str(out),
            ],
            cwd=folder,
            env=env,
            log=log,
        )
        frames = sorted(out.glob("*.xyz"))
        if not frames or "energy" not in frames[0].read_text():
            raise StepFailed(f"ggnd data generate wrote {[p.name for p in out.iterdir()]}")

    def hydra_groups() -> None:
        spk = run([str(bin_dir / "spktrain"), "--help"], cwd=folder, env=env, log=log)
        if "ggnd_painn_3bpa" not in spk:
            raise StepFailed("spktrain --help does not list experiment ggnd_painn_3bpa")
        # nequip-train's help needs a config: the starter config, as a user would run it. Its folder
        # holds nothing else: hydra lists every folder under the config path as a config group.
        config_dir = folder / "nequip-config"
        config_dir.mkdir()
        (config_dir / "ggnd_nequip.yaml").write_text(
            run([ggnd, "config", "nequip"], cwd=folder, env=env, log=log)
        )
        nequip_help = [str(bin_dir / "nequip-train"), "-cp", str(config_dir), "-cn", "ggnd_nequip", "--help"]
        nequip = run(nequip_help, cwd=folder, env=env, log=log)
        if "ggnd_painn_3bpa" in nequip or "provider=ggnd-plugin" in nequip:
            raise StepFailed("nequip-train --help lists ggnd-plugin's SchNetPack config groups")

    step("cli startup, config, env", cli_startup)
    step("ggnd adapters", adapters)
    step("block on a molecule + tiny host models", probe)
    if "block on a molecule + tiny host models" in result.passed:
        for host in route.hosts:
            step(f"upgrade + evaluate ({host})", lambda host=host: upgrade_and_evaluate(host))
    if route.name == "mace":
        step("ggnd-mace-train --help", mace_train_help)
    if route.name == "xtb":
        step("ggnd data generate (xtb)", xtb_data)
    if {"nequip", "schnetpack"} <= set(route.hosts):
        step("hydra groups only for spktrain", hydra_groups)


def print_table(results: list[Result]) -> None:
    print(
        f"\n{'route':11s} {'result':6s} {'install':>8s} {'venv':>8s} {'--version':>9s} {'--help':>7s}  torch / e3nn"
    )
    for r in results:
        version = f"{r.version_s:.2f} s" if r.version_s is not None else "-"
        help_time = f"{r.help_s:.2f} s" if r.help_s is not None else "-"
        print(
            f"{r.route:11s} {'ok' if r.ok else 'FAILED':6s} {r.install_s:6.1f} s {r.venv_mib / 1024:5.2f} GiB "
            f"{version:>9s} {help_time:>7s}  {r.versions.get('torch')} / {r.versions.get('e3nn')}"
        )
    for r in results:
        for failure in r.failed:
            print(f"\n[{r.route}] FAILED {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install every README route from a freshly built wheel.")
    parser.add_argument("--routes", nargs="+", choices=list(ROUTES), default=list(ROUTES))
    parser.add_argument("--resolve", choices=("lock", "fresh"), default="lock")
    parser.add_argument("--source", type=Path, default=REPO, help="the checkout to build (default: this one)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "check-install")
    parser.add_argument("--json", type=Path, default=REPO / "build" / "check-install.json")
    parser.add_argument("--keep", action="store_true", help="keep the venvs")
    args = parser.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_VARIABLES}
    uv = [sys.executable, "-m", "uv"]
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    log = args.work / "check-install.log"
    print(f"building {args.source} (log: {log.relative_to(REPO) if log.is_relative_to(REPO) else log})")
    started = time.perf_counter()
    try:
        wheel, sdist = build(args.source.resolve(), args.work / "dist", uv, env, log)
    except StepFailed as error:
        print(f"build FAILED: {error}")
        return 1
    build_s = time.perf_counter() - started
    print(f"built {wheel.name} and {sdist.name} in {build_s:.1f} s")
    wheel_problem = None
    try:
        check_wheel(wheel)
    except StepFailed as error:  # the routes still run: they show what the missing files break
        wheel_problem = str(error)
        print(f"wheel FAILED: {wheel_problem}")

    results = []
    for name in args.routes:
        route = ROUTES[name]
        folder = args.work / name
        folder.mkdir()
        venv = folder / "venv"
        result = Result(name)
        route_log = folder / "route.log"
        print(f"== {name}: installing", flush=True)
        started = time.perf_counter()
        try:
            install(route, wheel, venv, folder, uv, env, route_log, args.resolve)
        except StepFailed as error:
            result.ok = False
            result.failed.append(f"install: {error}")
        result.install_s = time.perf_counter() - started
        if venv.exists():
            result.venv_mib = venv_mebibytes(venv)
            result.versions = installed_versions(venv, uv, env, route_log)
        if result.ok:
            check_route(route, venv, folder, env, route_log, result)
        print(
            f"== {name}: {'ok' if result.ok else 'FAILED'} ({len(result.passed)} checks passed, "
            f"{len(result.failed)} failed)",
            flush=True,
        )
        results.append(result)
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)

    print_table(results)
    record = {
        "wheel": wheel.name,
        "sdist": sdist.name,
        "build_s": round(build_s, 1),
        "wheel_problem": wheel_problem,
        "resolve": args.resolve,
        "python": sys.version.split()[0],
        "routes": [
            {**vars(r), "install_s": round(r.install_s, 1), "venv_mib": round(r.venv_mib)} for r in results
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    failed = [r.route for r in results if not r.ok] + (["wheel contents"] if wheel_problem else [])
    if failed:
        print(f"\ncheck-install FAILED: {' '.join(failed)}")
    else:
        print(f"\ncheck-install: all {len(results)} routes work")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
