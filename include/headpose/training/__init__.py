"""The training source directory shipped to SageMaker as ``sourcedir.tar.gz``.

Everything here must run inside the TensorFlow training image with nothing but
TensorFlow and NumPy installed: no Airflow, no boto3, no sagemaker SDK.
"""
