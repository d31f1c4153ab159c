"""MACE files pickled under e3nn <= 0.5, loaded exactly under e3nn 0.6.

Every model trained with a stock mace-torch 0.3.x was pickled under e3nn 0.4.4 (which mace-torch pins).
:func:`legacy_e3nn_unpickling` lets e3nn 0.6 unpickle such a file; :func:`rebuild_under_current_e3nn`
then rebuilds the model with the installed MACE and e3nn and its own weights, which reproduces its old
predictions exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ggnd_plugin.adapters.mace.wrapper import GGNDMACE, dtype_of
from ggnd_plugin.block import GGNDBlock
from ggnd_plugin.errors import GGNDError


@contextmanager
def legacy_e3nn_unpickling() -> Iterator[list[str]]:
    """Let e3nn 0.6 unpickle modules that e3nn <= 0.5 pickled; yields the names of those it fixed.

    This is the adapter's one patch of a host internal, applied only inside this context.
    e3nn's ``CodeGenMixin`` pickles its generated TorchScript submodules in ``__getstate__``; e3nn <= 0.5
    stored each as bare ``bytes``, e3nn 0.6 stores ``(kind, bytes)`` and its ``__setstate__`` fails on
    the old form (``ValueError: too many values to unpack``). The old bytes are TorchScript, which 0.6
    still reads as kind ``"torchscript"``, so the state is rewritten to that form before e3nn sees it.
    The loaded object is only good for reading its configuration and weights; MACE's buffers computed
    by e3nn changed between versions, so :func:`rebuild_under_current_e3nn` rebuilds it.
    """
    import e3nn
    from e3nn.util.codegen._mixin import CodeGenMixin

    fixed: list[str] = []
    if tuple(int(part) for part in e3nn.__version__.split(".")[:2]) < (0, 6):
        yield fixed  # the installed e3nn reads the old form itself
        return
    original = CodeGenMixin.__setstate__

    def setstate(self, state):
        codegen = state.get("__codegen__")
        if codegen and any(isinstance(value, bytes) for value in codegen.values()):
            state = dict(state)
            state["__codegen__"] = {
                name: ("torchscript", value) if isinstance(value, bytes) else value
                for name, value in codegen.items()
            }
            fixed.append(type(self).__name__)
        original(self, state)

    CodeGenMixin.__setstate__ = setstate
    try:
        yield fixed
    finally:
        CodeGenMixin.__setstate__ = original


def rebuild_under_current_e3nn(old: nn.Module) -> nn.Module:
    """The same model built by the installed MACE/e3nn, with every weight and buffer of ``old``.

    ``type(old)(**extract_config_mace_model(old))`` then a strict ``load_state_dict`` reproduces the
    old predictions exactly; copying only the weights would not (MACE's U-matrix buffers differ).
    """
    if isinstance(old, GGNDMACE):
        host = rebuild_under_current_e3nn(old.host)
        block = GGNDBlock(old.ggnd.spec, old.ggnd.config).to(dtype=dtype_of(host))
        block.load_state_dict(old.ggnd.state_dict(), strict=True)
        return GGNDMACE(host, block)
    from mace.tools import torch_tools
    from mace.tools.scripts_utils import extract_config_mace_model

    config = extract_config_mace_model(old)
    if "error" in config:
        raise GGNDError(
            f"cannot convert a {type(old).__name__} pickled under an older e3nn: {config['error']}"
        )
    dtype = dtype_of(old)
    with torch_tools.default_dtype(dtype):
        new = type(old)(**config)
    new = new.to(dtype)
    try:
        new.load_state_dict(old.state_dict(), strict=True)
    except RuntimeError as error:
        raise GGNDError(
            f"cannot convert a {type(old).__name__} pickled under an older e3nn: its weights do not fit the "
            f"model rebuilt from its own configuration ({error})"
        ) from error
    return new.eval()
