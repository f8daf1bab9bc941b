"""The IAM policy documents users apply (deploy/iam/) are well-formed policies."""
from __future__ import annotations

import json

import pytest

from support import ROOT

POLICIES = sorted((ROOT / "deploy" / "iam").glob("*.json"))


@pytest.mark.parametrize("path", POLICIES, ids=[p.name for p in POLICIES])
def test_each_policy_document_is_an_iam_policy(path):
    document = json.loads(path.read_text())
    assert document["Version"] == "2012-10-17"
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow" and statement["Action"], statement
        if path.name.endswith("-queue-policy.json"):  # a resource policy: whom, and on what
            assert "Resource" in statement and "Principal" in statement, statement
        else:  # an identity policy has no Principal; a trust policy no Resource
            assert ("Resource" in statement) != ("Principal" in statement), statement


def test_the_bucket_location_call_of_the_tensorflow_image_is_allowed():
    actions = [a for s in json.loads((ROOT / "deploy/iam/sagemaker-execution-role-policy.json").read_text())["Statement"]
               for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
    assert "s3:GetBucketLocation" in actions
