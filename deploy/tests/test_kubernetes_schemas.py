"""Every rendered document is valid against the Kubernetes schemas, in strict mode."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

import manifests


def _validate(document: dict) -> None:
    kubernetes_validate.validate(document, manifests.kubernetes_version(), strict=True)


@pytest.mark.parametrize("set_name", [s.name for s in manifests.render_sets()])
def test_rendered_documents_validate_strictly(set_name: str) -> None:
    render_set = next(s for s in manifests.render_sets() if s.name == set_name)
    assert render_set.documents, f"{set_name} rendered nothing"
    failures = []
    for document in render_set.documents:
        try:
            _validate(document)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
            failures.append(f"{document['kind']}/{document['metadata']['name']}: {getattr(error, 'message', error)}")
    assert failures == []


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = manifests.by_name(manifests.render_chart(), "Deployment", "clm-identity")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)
