"""The device fleet: reading the devices' reports, deciding a rollout, applying it (no Airflow here)."""
