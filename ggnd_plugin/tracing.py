"""Is this call being traced or compiled? The one test the block, the adapters and the checks share.

Value checks (``species.min() < 0``, ``isfinite(positions).all()``) are data-dependent branches: a
tracer either refuses them (``make_fx`` with symbolic sizes, as ``nequip-compile`` uses, and
``torch.export``) or bakes one outcome into the graph (``torch.jit.trace``, TorchDynamo graph breaks).
Code that checks values asks :func:`is_tracing` first and skips the check while tracing; the eager
call that precedes or follows any compiled run has already made it.
"""

from __future__ import annotations

__all__ = ["is_tracing"]


def is_tracing() -> bool:
    """True under TorchScript scripting or tracing, ``torch.compile``, ``torch.export`` or ``make_fx``."""
    import torch
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or get_proxy_mode() is not None  # make_fx, as nequip-compile traces
    )
