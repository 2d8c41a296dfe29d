# syntax=docker/dockerfile:1
# One image for the API, the workers and the migrations (docker-compose.yml picks the command).
#   CPU:  docker build -t dpaat .
#   GPU:  docker build -t dpaat:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .

# ---------------------------------------------------------------- builder: a venv with everything
FROM python:3.11-slim AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned, from the index of the wanted build (CPU or CUDA); its own layer because it
# is by far the largest and changes least often.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# Not editable: the runtime stage gets an installed package, not a pointer to /src.
RUN pip install ".[server]" && pip check

# ---------------------------------------------------------------- runtime: the venv, no toolchain
FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DPAAT_ENVIRONMENT=production \
    DPAAT_ARTIFACT_DIR=/var/lib/dpaat/artifacts \
    DPAAT_CACHE_DIR=/var/cache/dpaat \
    DPAAT_SCRATCH_DIR=/var/lib/dpaat/scratch
RUN useradd --create-home --uid 10001 dpaat \
    && mkdir -p /var/lib/dpaat/artifacts /var/lib/dpaat/scratch /var/cache/dpaat \
    && chown -R dpaat:dpaat /var/lib/dpaat /var/cache/dpaat
COPY --from=builder /opt/venv /opt/venv
USER dpaat
WORKDIR /home/dpaat
EXPOSE 8000
CMD ["dpaat", "serve", "--host", "0.0.0.0", "--port", "8000"]
