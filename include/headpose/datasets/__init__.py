"""Datasets: the synthetic generator, the Prima converter, the legacy pickle importer, staging to S3 and dataset validation."""
