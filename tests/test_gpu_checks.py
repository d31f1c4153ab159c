"""Correctness on a CUDA device (benchmarks/gpu_checks.py): float64 on the GPU equals the CPU to 1e-9
relative, the compiled block (TorchInductor, Triton kernels) equals the plain one, and the double
backward of force training gives the CPU's gradients.

Marked ``cuda``: without a CUDA device they skip, saying so. ``make gpu-pass`` runs them first on a GPU
(benchmarks/gpu_pass.py copies each test's record into its JSON).
``GGND_CHECK_DEVICE=cpu`` runs them against the CPU itself: the dry run of the GPU pass in ``make test``
(tests/test_gpu_pass.py) does that, to prove they still run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_checks  # noqa: E402

DEVICE = os.environ.get("GGND_CHECK_DEVICE", "cuda")
TINY = os.environ.get("GGND_CHECK_TINY") == "1"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="needs a CUDA device; make gpu-pass runs these on a GPU",
    ),
]


@pytest.fixture
def check(request):
    """Assert a check's record; keep it for the GPU pass (GGND_CHECK_RECORDS: one JSON line per test,
    appended as each test ends, so a pass stopped at its time cap keeps the finished ones)."""

    def assert_passed(record: dict) -> None:
        print(json.dumps(record, indent=1))
        if os.environ.get("GGND_CHECK_RECORDS"):
            with open(os.environ["GGND_CHECK_RECORDS"], "a") as handle:
                handle.write(json.dumps({"test": request.node.nodeid, "record": record}) + "\n")
        assert record["passed"], f"{record['what']}: largest relative difference {record['max_rel']:.3g}"

    return assert_passed


def test_block_on_the_device_equals_the_cpu(check):
    check(gpu_checks.block_device_vs_cpu(DEVICE, tiny=TINY))


@pytest.mark.parametrize("host", gpu_checks.HOSTS)
def test_host_with_ggnd_on_the_device_equals_the_cpu(host, check):
    check(gpu_checks.host_device_vs_cpu(host, DEVICE, tiny=TINY))


@pytest.mark.parametrize("host", gpu_checks.HOSTS)
def test_force_training_gradients_on_the_device_equal_the_cpu(host, check):
    check(gpu_checks.force_training_gradients(host, DEVICE, tiny=TINY))


# last: compiling is the slow part, so the cheap checks have their records if the section's cap comes
def test_compiled_block_equals_the_plain_block(check):
    check(gpu_checks.compiled_vs_eager(DEVICE, tiny=TINY))
