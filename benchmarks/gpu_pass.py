"""The GPU pass: one prepared command that proves batched GPU MD on a device, inside a fixed time budget.

``make gpu-pass`` runs it on a GPU machine (docs/scale.md says how its environment is made there). Five
sections, in priority order; each has its own time cap and starts only if the budget has room for it:

1. ``correctness``: tests/test_gpu_checks.py (marked ``cuda``) in a subprocess: the block's energy,
   forces and stress on the device against the CPU (float64, 1e-9 relative), the same for MACE, NequIP
   and PaiNN with GGND, the compiled block (TorchInductor, Triton) against eager, the double backward of
   force training. Each test's record is copied into the JSON.
2. ``batched_stability``: 3BPA with the shipped MACE+GGND model (benchmarks/inputs/), hundreds of
   replicas in one batch and with autobatching, against one replica at a time on the device and against
   the CPU (measured here, and the figure in replica_throughput.json).
3. ``table5``: the paper's table 5 on the device: MD-step time and peak memory of host + GGND over the
   host, for MACE, NequIP and PaiNN at 1, 64 and 512 replicas, eager and compiled.
4. ``block``: the block alone, time and peak memory from 27 to 3,000 atoms, dense and chunked.
5. ``nccl``: ``ggnd stability`` under torchrun (nccl on CUDA; world size 1, and 2 where there are two
   GPUs) against the same run in one process.

Budget: ``--budget-s`` seconds (default 450, inside the 8 minutes of a device window) counted from
``GGND_GPU_PASS_T0`` (epoch seconds; ``make gpu-pass`` sets it before installing anything, so start-up
counts) or else from this process's start. A section that cannot get its minimum is recorded as skipped
("budget"); a running section checks its clock between sub-steps and records what it did not start. A
watchdog thread stops everything at the deadline: it kills the child processes, writes the JSON with
what it has (the running section marked "stopped") and exits with status 2; SIGTERM does the same.
The JSON is also written after every section, atomically.

    python benchmarks/gpu_pass.py --device cuda [--out benchmarks/results/gpu_pass.json] [--overwrite]
    python benchmarks/gpu_pass.py --device cpu --tiny --out build/gpu_pass_dry_run.json   # the dry run

Writes the JSON (device, versions, every figure with its unit in the key's suffix) and a markdown table
beside it (same name, ``.md``). Exit status: 0 every section that ran passed its checks, 1 a check
failed or a section raised, 2 stopped at the deadline or by SIGTERM.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

RESULT = ROOT / "benchmarks" / "results" / "gpu_pass.json"
DRY_RUN_RESULT = ROOT / "build" / "gpu_pass_dry_run.json"  # --tiny never writes the committed result
DEFAULT_BUDGET_S = 450.0  # of the 480 s window: the rest is the margin for teardown
RESERVE_S = 10.0  # before the deadline no section starts a sub-step; the JSON is written in it
# The section's alarm rings this long after its clock runs out, so a child process stopped at the clock
# (correctness, nccl) returns first and the section keeps what the child wrote before the cap.
ALARM_GRACE_S = 5.0
T0_VARIABLE = "GGND_GPU_PASS_T0"
# (name, cap in seconds on a GPU, the least it needs to start), in priority order. --tiny halves nothing:
# the dry run's sizes are small, and the caps only bound it.
SECTIONS = (
    ("correctness", 150.0, 60.0),
    ("batched_stability", 100.0, 30.0),
    ("table5", 110.0, 30.0),
    ("block", 45.0, 15.0),
    ("nccl", 60.0, 30.0),
)
UNITS = {
    "_s": "seconds (wall clock; CUDA synchronised around timed work)",
    "_ms": "milliseconds",
    "_mib": "MiB (2**20 bytes)",
    "_replica_steps_per_s": "replica-steps per second (replicas x MD steps / wall seconds)",
    "max_rel, max_abs": "largest difference relative to the reference's largest magnitude; absolute (eV, "
    "eV/Å, eV/Å^3 or the loss's units)",
    "ratio*": "dimensionless: with GGND over without, or against the named baseline",
}


class SectionCapReached(Exception):
    """Raised by SIGALRM in the main thread when a section's time is up."""


def _cap_reached(signum, frame):
    raise SectionCapReached


def _stopped_by_cap(error: BaseException) -> bool:
    """Whether the cap's alarm is behind ``error`` (TorchDynamo re-raises what interrupts a compilation
    as its own error, with the alarm's exception as ``inner_exception`` or in the chain)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SectionCapReached):
            return True
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return False


class SectionClock:
    """The time a section may still use: its cap or the pass's deadline, whichever comes first."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


class Pass:
    """The record being built, the children to stop, and the hard stop."""

    def __init__(self, args, started: float):
        self.args = args
        self.started = started
        self.deadline = started + args.budget_s
        self.lock = threading.RLock()
        self.children: set[subprocess.Popen] = set()
        self.current: str | None = None
        self.record: dict[str, Any] = {
            "what": "GPU pass of ggnd-plugin: correctness, batched stability, table 5, the block alone, nccl",
            "device_requested": args.device,
            "tiny": args.tiny,
            "budget_s": args.budget_s,
            "started_from": T0_VARIABLE if os.environ.get(T0_VARIABLE) else "process start",
            "units": UNITS,
            "machine": {},
            "sections": {name: {"status": "pending"} for name, _, _ in SECTIONS},
        }

    # ---- the record -------------------------------------------------------------------------------
    def put(self, section: str, key: str, value: Any) -> None:
        with self.lock:
            self.record["sections"][section].setdefault("results", {})[key] = value

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            record = copy.deepcopy(self.record)
        record["elapsed_s"] = round(time.time() - self.started, 1)
        return record

    def write(self) -> None:
        from gpu_pass_report import markdown

        from ggnd_plugin.safe_io import atomic_write_text

        record = json.loads(self.scrub(json.dumps(self.snapshot(), default=str)))
        atomic_write_text(self.args.out, json.dumps(record, indent=2) + "\n")
        atomic_write_text(self.args.out.with_suffix(".md"), markdown(record))

    def scrub(self, text: str) -> str:
        """The record names no folder of the machine it ran on (tracebacks, output tails): the checkout
        becomes a relative path, the scratch folder <work>, installed packages <site-packages>."""
        folders = [(str(ROOT) + os.sep, ""), (str(getattr(self, "work", "")) or "<none>", "<work>")]
        folders += [
            (p, "<site-packages>") for p in sys.path if p.endswith(("site-packages", "dist-packages"))
        ]
        folders += [(os.environ.get("GGND_GPU_SITE") or "<none>", "<site-packages>")]
        for folder, label in sorted(folders, key=lambda f: -len(f[0])):
            text = text.replace(json.dumps(folder)[1:-1], label)
        return text

    def say(self, message: str) -> None:
        print(f"[gpu-pass {time.time() - self.started:6.1f} s] {message}", file=sys.stderr, flush=True)

    # ---- children and the hard stop ---------------------------------------------------------------
    def run_child(self, command: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
        """Run ``command`` in its own process group (torchrun's ranks too), killed at ``timeout``.

        Returns (exit status, or None on timeout; the combined output's tail)."""
        with tempfile.TemporaryFile("w+") as output:
            child = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            )
            with self.lock:
                self.children.add(child)
            try:
                status = child.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                status = None
            finally:
                _kill_group(child)
                with self.lock:
                    self.children.discard(child)
            output.seek(0)
            return status, output.read()[-6000:]

    def hard_stop(self, why: str) -> None:
        """Kill the children, mark what was running and what was not, write, exit 2."""
        with self.lock:
            for child in list(self.children):
                _kill_group(child)
            for section in self.record["sections"].values():
                if section["status"] == "running":
                    section.update(status="stopped", reason=why)
                elif section["status"] == "pending":
                    section.update(status="skipped", reason=f"budget ({why})")
            self.record["hard_stop"] = why
        try:
            self.write()
            self.say(f"hard stop: {why}; wrote {self.args.out}")
            if getattr(self, "work", None):
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            os._exit(2)


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def machine_record(device: str) -> dict[str, Any]:
    import torch

    from ggnd_plugin.provenance import package_versions

    record: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "versions": package_versions(
            ("triton", "vesin", "nvalchemi-toolkit-ops"), hosts=True, missing="absent"
        ),
    }
    try:
        from torch_sim import neighbors

        record["torchsim_neighbour_list"] = neighbors.default_batched_nl.__name__
    except Exception as error:  # a missing optional neighbour list must not stop the pass
        record["torchsim_neighbour_list"] = f"unknown ({error})"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        record.update(
            device_name=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            device_memory_mib=round(props.total_memory / 2**20),
            multiprocessors=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
        )
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
            record["nvidia_smi"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            record["nvidia_smi"] = f"not read ({error})"
    else:
        record.update(device_name=f"CPU ({platform.processor() or platform.machine()})", device_count=0)
    return record


def section_functions() -> dict[str, Any]:
    import gpu_pass_sections as sections

    return {
        "correctness": sections.correctness,
        "batched_stability": sections.batched_stability,
        "table5": sections.table5,
        "block": sections.block_alone,
        "nccl": sections.nccl,
    }


def run_sections(run: Pass, functions: dict[str, Any] | None = None) -> int:
    """Run the sections in priority order within their caps and the budget; 0 if all that ran passed."""
    import gpu_pass_sections as sections

    functions = functions or section_functions()
    wanted = set(run.args.sections)
    status = 0
    for name, cap, least in SECTIONS:
        entry = run.record["sections"][name]
        if name not in wanted:
            with run.lock:
                entry.update(status="skipped", reason="not asked for (--sections)")
            continue
        left = run.deadline - RESERVE_S - time.time()
        if left < least:
            with run.lock:
                entry.update(
                    status="skipped", reason=f"budget: {max(left, 0):.0f} s left, needs {least:.0f} s"
                )
            run.say(f"{name}: skipped (budget)")
            run.write()
            continue
        clock = SectionClock(min(time.time() + cap, run.deadline - RESERVE_S))
        with run.lock:
            entry.update(status="running", cap_s=cap)
            run.current = name
        run.say(f"{name}: started (cap {cap:.0f} s, {left:.0f} s left)")
        run.write()
        began = time.time()
        # The section's cap, enforced: SIGALRM raises SectionCapReached in this thread between two Python
        # operations (the watchdog thread is the backstop for code stuck in one long native call).
        signal.setitimer(signal.ITIMER_REAL, max(clock.left(), 0.1) + ALARM_GRACE_S)
        try:
            if run.args.stall_in == name:
                sections.stall(run)
            passed = functions[name](run, clock)
            outcome = {"status": "done", "passed": passed}
        except SectionCapReached:
            outcome = {"status": "stopped", "reason": f"section cap reached ({cap:.0f} s or the deadline)"}
            passed = None
        except Exception as error:  # one broken section must not lose the others' figures
            if _stopped_by_cap(error) or clock.left() <= 0:  # e.g. inside torch.compile, which wraps it
                outcome = {
                    "status": "stopped",
                    "reason": f"section cap reached ({cap:.0f} s or the deadline)",
                }
                passed = None
            else:
                outcome = {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:2000]}
                outcome["traceback"] = traceback.format_exc()[-4000:]
                passed = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        with run.lock:
            entry.update(outcome, seconds=round(time.time() - began, 1))
            run.current = None
        if passed is False:
            status = 1
        run.say(
            f"{name}: {entry['status']} in {entry['seconds']} s"
            + ("" if passed is not False else " (FAILED)")
        )
        run.write()
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the pass) or cpu (the dry run)")
    parser.add_argument("--tiny", action="store_true", help="a few replicas and steps: the CPU dry run")
    parser.add_argument(
        "--out", type=Path, default=None, help="the JSON (default benchmarks/results/gpu_pass.json)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall seconds for everything"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=[name for name, _, _ in SECTIONS],
        choices=[name for name, _, _ in SECTIONS],
    )
    parser.add_argument("--stall-in", default=None, help=argparse.SUPPRESS)  # tests: a section that hangs
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--torchrun-child"]:  # the rest is ggnd's command line, not ours
        import gpu_pass_sections

        return gpu_pass_sections.torchrun_child(argv[1:])
    args = parser.parse_args(argv)
    started = float(os.environ.get(T0_VARIABLE) or time.time())
    args.out = (args.out or (DRY_RUN_RESULT if args.tiny else RESULT)).resolve()
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} already exists; pass --overwrite to replace it")  # before any work
    args.out.parent.mkdir(parents=True, exist_ok=True)

    run = Pass(args, started)
    signal.signal(signal.SIGTERM, lambda signum, frame: run.hard_stop("SIGTERM"))
    signal.signal(signal.SIGALRM, _cap_reached)
    watchdog = threading.Timer(
        max(run.deadline - time.time(), 0.0), run.hard_stop, args=("deadline reached",)
    )
    watchdog.daemon = True
    watchdog.start()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (use --device cpu --tiny for the dry run)")
    if args.tiny:
        torch.set_num_threads(1)  # the dry run shares a small machine, its child processes too
        os.environ["OMP_NUM_THREADS"] = "1"
        # TorchDynamo's graph capture without AOTAutograd or kernels: seconds instead of a minute per graph
        # on a small CPU (tests/test_compile.py covers aot_eager and inductor)
        os.environ.setdefault("GGND_COMPILE_BACKEND", "eager")
    machine = machine_record(args.device)
    with run.lock:
        run.record["machine"] = machine
    run.say(f"device: {run.record['machine']['device_name']}; budget {args.budget_s:.0f} s")
    with tempfile.TemporaryDirectory(prefix="ggnd-gpu-pass-") as work:
        run.work = Path(work)
        status = run_sections(run)
    watchdog.cancel()
    with run.lock:
        run.record["exit_status"] = status
    run.write()
    run.say(f"wrote {args.out} and {args.out.with_suffix('.md').name}")
    return status


if __name__ == "__main__":
    sys.exit(main())
