"""``ggnd`` under torchrun with the bonded Morse test model as its host (tests/test_distributed.py).

Like tests/fault_driver.py (whose adapter it uses), plus two hooks a subprocess needs:

* ``GGND_TEST_KILL_RANK=R`` and ``GGND_TEST_KILL_AFTER=N``: rank R SIGKILLs itself at its N-th force
  call, as a node or process failure would.
* ``GGND_TEST_SYSTEMS_LOG=PATH``: every force call appends "rank n_systems" to PATH.rankR, so a test can
  count the replica-steps each rank computed.

Usage: ``torchrun --nproc-per-node 2 tests/distributed_driver.py stability MODEL ... --out DIR``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fault_driver  # noqa: E402


class CountingAdapter(fault_driver.MorseAdapter):
    def torchsim_model(self, model, device="cpu", dtype=None):
        inner = super().torchsim_model(model, device=device)
        rank = os.environ.get("RANK", "0")
        kill = os.environ.get("GGND_TEST_KILL_RANK") == rank
        after = int(os.environ.get("GGND_TEST_KILL_AFTER", "0"))
        log = os.environ.get("GGND_TEST_SYSTEMS_LOG")
        forward = inner.forward

        def counted(state, **kwargs):
            if kill and inner.calls + 1 >= after:
                os.kill(os.getpid(), signal.SIGKILL)
            if log:
                with open(f"{log}.rank{rank}", "a") as handle:
                    handle.write(f"{state.n_systems}\n")
            return forward(state, **kwargs)

        inner.forward = counted
        return inner


if __name__ == "__main__":
    from ggnd_plugin import registry
    from ggnd_plugin.cli import main

    registry.resolve = lambda host, path: CountingAdapter()
    sys.exit(main(sys.argv[1:]))
