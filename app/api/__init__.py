"""The HTTP layer: routers (thin), dependencies, error mapping, limits and metrics."""

API_PREFIX = "/api/v1"
