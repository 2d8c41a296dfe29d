"""Wiring the dashboard and the offline API documentation into the app (``create_app`` calls
:func:`install`)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from app.api.errors import error_response, status_of
from app.core.settings import Settings
from app.services.errors import ServiceError
from app.ui import UI_PREFIX, routes
from app.ui.session import SignInRequired, UiSessionMiddleware
from app.ui.templating import templates

STATIC = Path(__file__).parent / "static"
# Swagger UI and ReDoc as files of an installed package (fastapi-offline ships both), so /docs
# and /redoc work on a network without internet access.
DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
_TITLES = {401: "Sign-in needed", 403: "Not allowed", 404: "Not found", 409: "Conflict"}


def _is_ui(request: Request) -> bool:
    return request.url.path == UI_PREFIX or request.url.path.startswith(UI_PREFIX + "/")


async def _service_error(request: Request, exc: Exception) -> Response:
    """Domain errors: an HTML page under /ui, the API's JSON everywhere else."""
    assert isinstance(exc, ServiceError)
    if not _is_ui(request):
        return error_response(exc)
    status = status_of(exc)
    return templates.TemplateResponse(
        request,
        "error.html",
        {
            "opened": request.scope.get("dpaat.ui"),
            "owner": None,
            "status": status,
            "title": _TITLES.get(status, "Error"),
            "message": exc.message,
        },
        status_code=status,
    )


async def _sign_in(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    return RedirectResponse(
        f"{UI_PREFIX}/login?{urlencode({'next': exc.next_path})}", status_code=303
    )


def install(app: FastAPI, settings: Settings) -> None:
    app.mount(f"{UI_PREFIX}/static", StaticFiles(directory=STATIC), name="ui-static")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.include_router(routes.router)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(SignInRequired, _sign_in)
    app.add_middleware(UiSessionMiddleware, settings=settings, factory=app.state.sessionmaker)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(UI_PREFIX)

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} · API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} · ReDoc",
            redoc_js_url="/docs-assets/redoc.standalone.js",
            redoc_favicon_url="/docs-assets/favicon.png",
            with_google_fonts=False,
        )
