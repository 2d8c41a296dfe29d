"""DPAAT robustness evaluation service: FastAPI front end, database, job state machine, storage."""
