"""Request dependencies, as typed aliases the routes declare (``session: SessionDep``).

Everything comes from ``app.state`` (filled by ``create_app``), so a test app with its own
settings, database and dispatcher never touches the process-wide defaults. The dependencies that
do no I/O are ``async``: FastAPI runs a plain ``def`` one in a worker thread, a hop that each
request would pay for (issue 12: job status polled under load).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api.auth import presented_key, principal_of, unauthenticated_principal
from app.core.settings import Settings
from app.services.api_keys import Principal
from app.services.errors import Forbidden, Unauthenticated
from app.services.prediction import PredictionService
from app.services.storage import Storage
from app.services.submissions import Dispatcher


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Iterator[Session]:
    """One session per request, closed afterwards (services commit what they change)."""
    with request.app.state.sessionmaker() as session:
        yield session


async def get_reader(request: Request) -> AsyncIterator[Session]:
    """A session for a route that only reads (``make_sessionmaker(reads_only=True)``). Opened
    and closed on the event loop: a session connects on first use (in the route's thread), and
    closing one that ran in autocommit hands its connection back without a round trip."""
    with request.app.state.reader() as session:
        yield session


async def get_store(request: Request) -> Storage:
    store: Storage = request.app.state.store
    return store


async def get_predictions(request: Request) -> PredictionService:
    service: PredictionService = request.app.state.predictions
    return service


async def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


# Declared for the OpenAPI document (security schemes); the key itself is checked by
# ``app.api.auth.AuthMiddleware`` before the body is read.
_api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="An API key `dpk_<key_id>_<secret>` (`dpaat keys create`).",
)
_bearer = HTTPBearer(auto_error=False, description="The same API key as a bearer token.")


async def current_principal(
    request: Request,
    _key: Annotated[str | None, Security(_api_key_header)] = None,
    _bearer_token: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> Principal:
    """Who is asking, as resolved by the auth middleware. Fails closed: with authentication on,
    a request the middleware did not authenticate is refused."""
    principal = principal_of(request.scope)
    if principal is not None:
        return principal
    settings: Settings = request.app.state.settings
    if settings.auth_enabled:
        raise Unauthenticated("an API key is required")
    return unauthenticated_principal(presented_key(dict(request.headers)))


async def require_admin(principal: Annotated[Principal, Depends(current_principal)]) -> None:
    """Defence in depth for the key routes (the middleware already demands ``admin``)."""
    if "admin" not in principal.scopes:
        raise Forbidden("this API key lacks the 'admin' scope")


async def current_owner(principal: Annotated[Principal, Depends(current_principal)]) -> str:
    """The owner of the rows a request may see and create."""
    return principal.owner


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_db)]
ReaderDep = Annotated[Session, Depends(get_reader)]
StoreDep = Annotated[Storage, Depends(get_store)]
PredictionsDep = Annotated[PredictionService, Depends(get_predictions)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
OwnerDep = Annotated[str, Depends(current_owner)]
PrincipalDep = Annotated[Principal, Depends(current_principal)]
