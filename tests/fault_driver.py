"""``ggnd`` in a subprocess with the bonded Morse test model as its host (tests/test_fault_injection.py).

A subprocess cannot be monkeypatched from the test, so this script does what test_stability.py's
command-line test does in-process: resolve every model file to an adapter that reads Morse parameters.
Usage: ``python tests/fault_driver.py stability MODEL ... --out DIR``.
"""

from __future__ import annotations

import sys

import torch


class MorseAdapter:
    """Just enough of a host adapter for ``ggnd stability``: a file holding the Morse parameters."""

    name = "morse"

    def load(self, path, device="cpu"):
        return torch.load(path, weights_only=False)

    def check_structures(self, model, structures, source):
        pass

    def torchsim_model(self, model, device="cpu", dtype=torch.float64):
        from ggnd_plugin.md.reference_models import bonded_morse_model

        return bonded_morse_model(model["pairs"], model["lengths"])


def install() -> None:
    from ggnd_plugin import registry

    registry.resolve = lambda host, path: MorseAdapter()


if __name__ == "__main__":
    from ggnd_plugin.cli import main

    install()
    sys.exit(main(sys.argv[1:]))
