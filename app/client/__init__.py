"""The torch-free CI client: ``dpaat audit`` (httpx, typer and rich only; installed by the
``dpaat[client]`` extra). Nothing here may import torch, FastAPI, SQLAlchemy or Celery."""
