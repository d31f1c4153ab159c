"""The GPU pass's environment on a device machine that has no network (docs/scale.md, "The GPU pass").

The lent GPU machines run their own Python 3.12 (``python3``) with a CUDA build of torch, Triton, e3nn,
numpy, scipy, lightning, pytest and more (the device tool's KINDS.md lists them), but none of the hosts,
TorchSim or ASE, and nothing can be downloaded there. So:

- ``wheels`` (here, with network; ``make gpu-wheels``): download, as wheels for CPython 3.12 on x86-64
  Linux, the distributions that image lacks, at the versions requirements.lock pins, plus the build
  backend (hatchling) that installs this checkout; check they fit what travels with a device call;
- ``install`` (there; ``make gpu-pass``): install them, without an index, into a folder put on
  ``PYTHONPATH`` (the image's own packages stay as they are), then this checkout itself (its entry
  points name the host adapters); nothing is installed when the environment already has everything
  (a machine with this project's .venv and a GPU);
- ``check``: import what the pass imports and list the adapters, in the environment as it is.

Torch is the image's (2.11 when last read), not the lock's 2.13: a CUDA torch is far larger than what a
call may carry. The pass records the versions it ran with. TorchSim's neighbour lists from
nvalchemi-toolkit-ops need warp-lang (hundreds of MB): left out, TorchSim falls back to vesin (the pass
records which it used).

    .venv/bin/python benchmarks/gpu_env.py wheels --into .gpu-wheels
    python3 benchmarks/gpu_env.py install --wheels .gpu-wheels --site /tmp/ggnd-gpu-site
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# What the device image lacks among the distributions the pass imports (found by running the dry run in
# an environment of the image's packages: benchmarks/gpu_env.py check), pinned by requirements.lock.
CARRIED = (
    "ase",
    "e3nn",  # the image has one; the lock's version is the one the tests run
    "mace-torch",
    "nequip",
    "schnetpack",
    "torch-sim-atomistic",
    "matscipy",
    "vesin",
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "torch-ema",
    "lmdb",
    "orjson",
    "dirsync",
    "fasteners",
    "progressbar",
    "tables",
    "blosc2",
    "ndindex",
    "numexpr",
)
# Published as source only (pure Python): built into wheels here.
SOURCE_ONLY = ("antlr4-python3-runtime", "progressbar")
# The build backend of pyproject.toml and what it needs beyond the image, to install this checkout there.
BUILD = ("hatchling==1.33.0", "trove-classifiers==2026.9.21.13")
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
CARRY_LIMIT_MIB = 40  # of the 64 MiB a device call carries; the checkout takes about 10
# What the pass imports; ``check`` and ``install`` try them in a fresh interpreter.
PROBE = (
    "import torch, e3nn, ase, torch_sim, mace.modules, nequip.model, schnetpack, pytest\n"
    "from torch_sim import neighbors\n"
    "from ggnd_plugin.registry import list_adapters\n"
    "usable = [a['name'] for a in list_adapters() if a['usable']]\n"
    "assert usable == ['mace', 'nequip', 'schnetpack'], list_adapters()\n"
    "print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'e3nn', e3nn.__version__,"
    " 'neighbour list', neighbors.default_batched_nl.__name__, 'adapters', usable)\n"
)


def pinned(names) -> list[str]:
    versions = {}
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==")
            versions[name.lower()] = version
    missing = [n for n in names if n.lower() not in versions]
    if missing:
        raise SystemExit(f"not pinned by requirements.lock: {', '.join(missing)}")
    return [f"{n}=={versions[n.lower()]}" for n in names]


def download(into: Path) -> int:
    into.mkdir(parents=True, exist_ok=True)
    requirements = [*pinned(CARRIED), *BUILD]
    source_only = [r for r in requirements if r.split("==")[0] in SOURCE_ONLY]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into)]
    command += ["--python-version", "3.12", "--implementation", "cp"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run([*command, *[r for r in requirements if r not in source_only]], check=True)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary=:all:", "-w", str(into)]
    subprocess.run([*build, *source_only], check=True)
    source_names = {name.replace("-", "_") for name in SOURCE_ONLY}
    platform_bound = [w.name for w in into.glob("*.whl") if w.name.split("-")[0].lower() in source_names]
    platform_bound = [name for name in platform_bound if not name.endswith("-py3-none-any.whl")]
    if platform_bound:
        raise SystemExit(f"built for this machine only, not pure Python: {platform_bound}")
    wanted = {r.split("==")[0].lower().replace("-", "_") for r in requirements}
    stale = [w for w in into.glob("*.whl") if w.name.split("-")[0].lower() not in wanted]
    for wheel in stale:  # a wheel of an earlier list would be installed too
        wheel.unlink()
    size = sum(w.stat().st_size for w in into.glob("*.whl")) / 2**20
    print(f"{len(list(into.glob('*.whl')))} wheels, {size:.1f} MiB in {into}")
    if size > CARRY_LIMIT_MIB:
        raise SystemExit(
            f"{size:.1f} MiB of wheels: more than the {CARRY_LIMIT_MIB} MiB a device call can carry"
        )
    return 0


def probe(python: str, site: Path | None) -> subprocess.CompletedProcess:
    paths = [str(ROOT)] + ([str(site)] if site else [])
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    )
    return subprocess.run([python, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT)


def install(wheels: Path, site: Path) -> int:
    """Install the carried wheels and this checkout into ``site`` unless the environment has them."""
    if sys.version_info[:2] != (3, 12):
        raise SystemExit(f"the carried wheels are for Python 3.12; this is {sys.version.split()[0]}")
    ready = probe(sys.executable, None)
    if ready.returncode == 0:
        print(f"environment ready, nothing installed: {ready.stdout.strip()}")
        return 0
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(
            f"the environment lacks what the pass imports and {wheels} holds no wheels: run `make gpu-wheels` "
            f"where there is network and carry {wheels.name}\n{ready.stderr[-1500:]}"
        )
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--disable-pip-version-check", "--upgrade", "--target", str(site)]
    subprocess.run([*pip, *map(str, found)], check=True)
    # this checkout, built by hatchling from the carried wheels (the entry points name the adapters)
    env = dict(os.environ, PYTHONPATH=str(site))
    subprocess.run([*pip, "--no-build-isolation", str(ROOT)], check=True, env=env, cwd=ROOT)
    done = probe(sys.executable, site)
    if done.returncode != 0:
        raise SystemExit(f"installed into {site}, but the pass's imports fail:\n{done.stderr[-3000:]}")
    print(f"installed {len(found)} wheels and ggnd-plugin into {site}: {done.stdout.strip()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    wheels = commands.add_parser("wheels", help="download the wheels the device image lacks (needs network)")
    wheels.add_argument("--into", type=Path, default=ROOT / ".gpu-wheels")
    setup = commands.add_parser("install", help="install them and this checkout into --site (no network)")
    setup.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    setup.add_argument("--site", type=Path, default=Path("/tmp/ggnd-gpu-site"))
    check = commands.add_parser("check", help="import what the pass imports, here as it is")
    check.add_argument("--site", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "wheels":
        return download(args.into)
    if args.command == "install":
        return install(args.wheels, args.site)
    result = probe(sys.executable, args.site)
    print(result.stdout.strip() or result.stderr[-3000:])
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
