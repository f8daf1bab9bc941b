"""Moving a run's files between S3 and a worker, each transfer checked by its sha256.

Tasks hand files to each other by S3 URI and sha256 (XCom carries both); these are the
transfers at either end. boto3 is never imported here: the client is passed in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from headpose.planning.layout import file_sha256, split_s3_uri
from headpose.planning.s3_calls import viewable_type


class HandoffError(RuntimeError):
    """A file is not what the task that wrote it recorded; the message says which and how."""


def verify_model_artifact(
    s3_client: Any, description: Mapping[str, Any], expected_uri: str, scratch: str | Path,
) -> dict[str, Any]:
    """``download_artifact``'s work: the job's ``model.tar.gz`` checked, and its sha256 recorded.

    Refuses an artifact at another URI than the job's, and one whose sha256 differs from
    what the local backend recorded when it uploaded it. Every later reader downloads
    it again and checks this sha256, so an object replaced between tasks is refused.
    """
    artifact_uri = description["ModelArtifacts"]["S3ModelArtifacts"]
    job = description["TrainingJobName"]
    if artifact_uri != expected_uri:
        raise HandoffError(f"training job {job} wrote {artifact_uri}, expected {expected_uri}")
    recorded = description.get("LocalBackend", {}).get("ArtifactSha256")
    path = download_verified(s3_client, artifact_uri, Path(scratch) / "model.tar.gz", recorded)
    return {"artifact_uri": artifact_uri, "sha256": file_sha256(path), "size_bytes": path.stat().st_size,
            "training_job_name": job}


def download_verified(s3_client: Any, uri: str, dest: str | Path, sha256: str | None) -> Path:
    """``uri`` downloaded to ``dest`` (boto3's transfer manager), refused unless it has ``sha256``."""
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    bucket, key = split_s3_uri(uri)
    s3_client.download_file(bucket, key, str(target))
    actual = file_sha256(target)
    if sha256 is not None and actual != sha256:
        target.unlink()
        raise HandoffError(f"{uri} has sha256 {actual}, but the task that wrote it recorded {sha256}")
    return target


def upload_file(s3_client: Any, path: str | Path, uri: str) -> str:
    """Upload ``path`` to ``uri`` (boto3's transfer manager); returns the file's sha256."""
    bucket, key = split_s3_uri(uri)
    sha256 = file_sha256(path)
    content_type = viewable_type(key)
    s3_client.upload_file(str(path), bucket, key, ExtraArgs={"ContentType": content_type} if content_type else None)
    return sha256
