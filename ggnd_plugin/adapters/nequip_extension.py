"""NequIP extension module (entry point ``nequip.extension``): imported by nequip on import.

Kept light: only torch, e3nn and nequip at top level, because ``nequip-package`` interns it.
"""
