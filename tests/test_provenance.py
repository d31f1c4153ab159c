"""Recorded package versions: one function for every record, hosts taken from the adapter registry."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ggnd_plugin.provenance import package_versions

THIRDPARTY = Path(__file__).parent / "thirdparty"


def test_versions_list_ggnd_plugin_then_the_packages_asked_for():
    versions = package_versions(("numpy", "no-such-distribution-ggnd"))
    assert list(versions) == ["ggnd-plugin", "numpy"]  # a missing package is left out by default
    assert versions["numpy"] == importlib.metadata.version("numpy")
    marked = package_versions(("no-such-distribution-ggnd",), missing="not installed")
    assert marked["no-such-distribution-ggnd"] == "not installed"


def test_a_third_party_host_is_recorded_like_the_built_in_ones(monkeypatch):
    without = package_versions((), hosts=True)
    assert "toyhost-ggnd" not in without
    monkeypatch.syspath_prepend(str(THIRDPARTY))  # its dist-info registers an adapter
    with_toyhost = package_versions((), hosts=True)
    assert with_toyhost["toyhost-ggnd"] == "0.1"
    assert set(with_toyhost) - set(without) == {"toyhost-ggnd"}
    assert "toyhost-ggnd" not in package_versions(())  # hosts only when asked for
