"""Request dependencies, as typed aliases the routes declare (``session: SessionDep``).

Everything comes from ``app.state`` (filled by ``create_app``), so a test app with its own
settings, database and dispatcher never touches the process-wide defaults.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.core.settings import Settings
from app.services.predictor import Predictor
from app.services.storage import ArtifactStore
from app.services.submissions import Dispatcher

LOCAL_OWNER = "local"


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Iterator[Session]:
    """One session per request, closed afterwards (services commit what they change)."""
    with request.app.state.sessionmaker() as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.store
    return store


def get_predictor(request: Request) -> Predictor:
    predictor: Predictor = request.app.state.predictor
    return predictor


def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


def current_owner(
    x_api_key: Annotated[
        str | None,
        Header(description="API key; rows are owned by a hash of it (no key: the 'local' owner)."),
    ] = None,
) -> str:
    """Who is asking. Until authentication lands (a later issue replaces only this function),
    the owner is the sha256 of the X-API-Key header, or "local" without one."""
    if not x_api_key:
        return LOCAL_OWNER
    return hashlib.sha256(x_api_key.encode()).hexdigest()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_db)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
OwnerDep = Annotated[str, Depends(current_owner)]
