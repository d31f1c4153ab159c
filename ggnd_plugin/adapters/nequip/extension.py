"""NequIP extension module (entry point ``nequip.extension``, ``init_always``): imported by nequip on import.

It deliberately imports nothing, and so do the packages above it (``ggnd_plugin``,
``ggnd_plugin.adapters``, ``ggnd_plugin.adapters.nequip`` load their names lazily). nequip loads it from
the middle of its own ``__init__`` (while ``nequip.utils`` is still initialising, so importing nequip
submodules here can fail with a circular import), and ``nequip-package`` interns it. The GGND graph
modules that travel inside packages are in :mod:`ggnd_plugin.adapters.nequip.graph_modules`; the
config targets (``GGNDNequIPModel``, ``GGNDUpgrade``) in :mod:`ggnd_plugin.adapters.nequip.builders`,
which registers those modules for packaging when imported.
"""
