"""A job's local working folder kept in step with the artifact store (issue 15).

On object storage a worker is stateless: a job works in local scratch, and after every epoch's
checkpoint the files a resume needs are published to ``jobs/<id>/`` in the store. A job that
starts (or starts again, on any host) first fetches them, so ``models.api.train`` finds its
checkpoint and resumes with no epoch redone. With a directory store the job folder *is* the store,
and both steps are no-ops.

Order matters: ``best.pt`` (the best epoch so far) is published before ``checkpoint.pt``. A worker
killed between the two leaves a checkpoint one epoch behind; the resumed run redoes that epoch
bit-exactly and makes the same choice of best. The other order could pair a newer checkpoint with
a stale best and register the wrong model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.services.storage import SCHEME, Storage

log = logging.getLogger(__name__)

# What a resume reads, in publishing order; checkpoint.pt last (see the module docstring).
RESUME_FILES = ("best.pt", "history.json", "checkpoint.pt")


class JobFiles:
    """The files of job ``job_id`` between its local ``folder`` and the store."""

    def __init__(self, store: Storage, job_id: str, folder: Path) -> None:
        self.store = store
        self.job_id = job_id
        self.folder = folder

    def _key(self, name: str) -> str:
        return f"jobs/{self.job_id}/{name}"

    def restore(self) -> bool:
        """Fetch what a previous run of this job published; True when there was a checkpoint.
        Files already here with the same content (this host ran it before) are not fetched."""
        if self.store.is_local:
            return (self.folder / "checkpoint.pt").is_file()
        found = {}
        for name in RESUME_FILES:
            found[name] = self.store.fetch(SCHEME + self._key(name), self.folder / name)
        if found["checkpoint.pt"] is None:
            # Nothing resumable: drop local leftovers of an attempt that never published one.
            for name in RESUME_FILES:
                (self.folder / name).unlink(missing_ok=True)
            return False
        log.info("job %s: resuming from the checkpoint in the store", self.job_id)
        return True

    def save(self) -> None:
        """Publish the resume files after an epoch's checkpoint (the trainer wrote them whole)."""
        if self.store.is_local:
            return
        for name in RESUME_FILES:
            path = self.folder / name
            if path.is_file():
                self.store.publish(path, self._key(name))

    def discard_local(self) -> None:
        """Free the scratch folder of a finished job (its outputs are in the store)."""
        if not self.store.is_local:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)
