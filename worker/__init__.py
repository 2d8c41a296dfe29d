"""Celery worker: the app, thin tasks, job hooks and the reaper (see docs/architecture.md)."""
