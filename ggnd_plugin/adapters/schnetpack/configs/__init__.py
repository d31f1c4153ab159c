"""Hydra config groups for ``spktrain`` (found through ``hydra_plugins.ggnd_plugin_searchpath``).

- ``ggnd/painn``, ``ggnd/schnet``: energy + GGND + forces output modules for any experiment
  (``spktrain experiment=rmd17 +ggnd=painn globals.ggnd_atomic_numbers=[1,6,8]``).
- ``experiment/painn_3bpa``, ``experiment/schnet_3bpa``: plain models on 3BPA (eV, Å).
- ``experiment/ggnd_painn_3bpa``, ``experiment/ggnd_schnet_3bpa``: the same with GGND.
"""
