"""/api/v1/datasets: upload an archive, register a server directory, list, get, delete."""

from __future__ import annotations

from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from app.api import API_PREFIX
from app.api.deps import OwnerDep, SessionDep, SettingsDep, StoreDep
from app.schemas.common import MAX_OFFSET, Page, error_responses
from app.schemas.datasets import DatasetOut, RegisterDatasetRequest
from app.services import datasets

router = APIRouter(prefix=f"{API_PREFIX}/datasets", tags=["datasets"])


def _name_from(filename: str | None) -> str:
    """A display name from the client's file name (only shown, never used as a path)."""
    stem = PurePath((filename or "").replace("\\", "/")).name
    for suffix in (".tar.gz", ".tgz", ".zip"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return (stem or "dataset")[:200]


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    summary="Upload a dataset archive",
    responses=error_responses(413, 415, 422),
)
def upload_dataset(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    file: Annotated[
        UploadFile,
        File(
            description="A .zip or .tar.gz: HAM10000, ISIC 2019 or ISIC 2020 label file + "
            "images (+ masks/), or one folder per class (docs/datasets.md)."
        ),
    ],
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> DatasetOut:
    """Extract the archive safely into the artifact store, validate the layout, count the
    images per class and fix the lesion- or patient-grouped split every job on the dataset will
    use."""
    row = datasets.create_from_archive(
        session,
        store,
        settings,
        owner=owner,
        name=name or _name_from(file.filename),
        upload=file.file,
    )
    return DatasetOut.model_validate(row)


@router.post(
    "/register",
    status_code=201,
    response_model=DatasetOut,
    summary="Register a directory on the server",
    responses=error_responses(422),
)
def register_dataset(
    body: RegisterDatasetRequest,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> DatasetOut:
    """Register a folder under one of the server's configured data roots; it is read in place."""
    row = datasets.register_directory(
        session, store, settings, owner=owner, name=body.name, path=body.path
    )
    return DatasetOut.model_validate(row)


@router.get("", response_model=Page[DatasetOut], summary="List datasets")
def list_datasets(
    session: SessionDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[DatasetOut]:
    rows, total = datasets.list_datasets(session, owner, limit=limit, offset=offset)
    items = [DatasetOut.model_validate(r) for r in rows]
    return Page[DatasetOut](items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/{dataset_id}",
    response_model=DatasetOut,
    summary="Get a dataset",
    responses=error_responses(404),
)
def get_dataset(dataset_id: str, session: SessionDep, owner: OwnerDep) -> DatasetOut:
    return DatasetOut.model_validate(datasets.get_dataset(session, dataset_id, owner))


@router.delete(
    "/{dataset_id}",
    status_code=204,
    summary="Delete a dataset",
    responses=error_responses(404, 409),
)
def delete_dataset(
    dataset_id: str, session: SessionDep, store: StoreDep, owner: OwnerDep
) -> Response:
    """Delete the dataset and its stored files (a registered directory itself is never touched).
    Refused with 409 while an unfinished job uses it."""
    datasets.delete_dataset(session, store, dataset_id, owner)
    return Response(status_code=204)
