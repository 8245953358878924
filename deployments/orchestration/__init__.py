"""The Prefect set-up: deployments, their triggers and automations, and the Prefect queries
of the service."""
