# The official Airflow image plus this project's pinned dependencies.
FROM apache/airflow:3.3.2-python3.11
COPY requirements.txt constraints.txt /requirements/
RUN pip install --no-cache-dir -r /requirements/requirements.txt -c /requirements/constraints.txt
