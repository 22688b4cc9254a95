"""Fixtures shared by the deploy tests; rendering lives in manifests.py."""

from __future__ import annotations

import pytest

import manifests


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"clm deploy tests: chart rendered by {manifests.renderer_name()}, "
        f"schemas of Kubernetes {manifests.kubernetes_version()}, overlays {', '.join(manifests.OVERLAYS)}"
    ]


@pytest.fixture(scope="session")
def render_sets() -> tuple[manifests.RenderSet, ...]:
    return manifests.render_sets()
