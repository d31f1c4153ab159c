"""``e3nn.o3``, importable under torch's weights-only loading whatever the e3nn version.

e3nn 0.4.4 (the version mace-torch 0.3.16 pins) reads its Wigner constants with a bare ``torch.load``
when ``e3nn.o3`` is first imported. Since torch 2.6 ``torch.load`` is weights-only by default and refuses
that file, because it pickles ``slice`` objects (``Unsupported global: GLOBAL slice``). mace-torch works
around it by setting ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process, which also turns off
the check for every model file loaded later. Here ``slice`` is allowed only for the duration of e3nn's
own first import; every later ``torch.load`` (users' files included) keeps torch's default.

Import ``o3`` from here instead of from e3nn in modules that may be the first to import e3nn::

    from ggnd_plugin.e3nn_compat import o3
"""

import sys

import torch

__all__ = ["import_e3nn", "o3"]


def import_e3nn():
    """``e3nn.o3``, imported with ``slice`` allowed in weights-only loading while it loads its constants."""
    if "e3nn.o3" in sys.modules:
        return sys.modules["e3nn.o3"]
    # A slice object cannot run code when unpickled, so allowing it does not weaken the check; the
    # allow-list is restored when the block exits.
    with torch.serialization.safe_globals([slice]):
        from e3nn import o3
    return o3


o3 = import_e3nn()
