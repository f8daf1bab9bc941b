"""The pipeline's Airflow operators: thin shells over ``include/headpose``.

This package is imported by name (``plugins/`` is on ``sys.path``); ``plugins/.airflowignore``
keeps Airflow's plugin loader from also executing each file as a top-level module.
"""
from headpose_operators.approval import RecordReleaseOperator, ReleaseApprovalOperator
from headpose_operators.data_versions import ClaimDataVersionOperator, RecordDataVersionOperator
from headpose_operators.export import ExportEdgeModelsOperator
from headpose_operators.freeze import FreezeGraphOperator
from headpose_operators.training import HeadposeTrainingOperator

__all__ = [
    "ClaimDataVersionOperator", "ExportEdgeModelsOperator", "FreezeGraphOperator", "HeadposeTrainingOperator",
    "RecordDataVersionOperator", "RecordReleaseOperator", "ReleaseApprovalOperator",
]
