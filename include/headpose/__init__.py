"""Head-pose retraining: plain Python shared by the DAG, the operators and the tests.

Importing this package imports nothing heavy; each submodule pulls in TensorFlow or
boto3 only where it needs them, so the DAG file can import the light ones at parse time.
"""
