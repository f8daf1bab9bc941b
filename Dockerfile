# The image of every Airflow service in docker-compose.yaml: the official Airflow image
# plus this project's dependencies, resolved exactly as CI tested them (constraints.txt).
# Airflow's own pin in requirements.txt equals the base image's, so pip never swaps the
# Airflow that the image was built around.
ARG AIRFLOW_VERSION=3.3.2
FROM apache/airflow:${AIRFLOW_VERSION}-python3.11
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/airflow/requirements/
RUN pip install --no-cache-dir \
      -r /opt/airflow/requirements/requirements.txt \
      -c /opt/airflow/requirements/constraints.txt
