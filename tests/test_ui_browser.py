"""The dashboard in a real Chromium (Selenium, Debian's chromium + chromium-driver) against
`dpaat serve` on loopback: the embedded default (SQLite, the in-process worker) with
authentication on, so that signing in is part of the walk.

One browser session walks through what a person does: sign in, upload a small generated dataset,
train a tiny model and watch its progress change without a reload, evaluate it and see the report's
figures load, compare two models, read the leaderboard, open an audit, predict on an image, sign
out; then a second owner sees none of it. Screenshots of each page go to DPAAT_UI_SCREENSHOTS
(default ``var/ui-screenshots``, not committed). Sized for 2 cores: 32 px, 2 epochs, 2 PGD steps.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from stack_support import ROOT, Stack, dpaat_command, free_port, running_stack, wait_for
from test_api import ham_files, zip_bytes

from app.db.migrate import upgrade
from app.db.session import make_engine, make_sessionmaker
from app.services import api_keys

pytestmark = pytest.mark.browser

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)
TINY = {"image_size": "32", "epochs": "2", "pgd_steps": "2", "eps_max": "4"}
FAST = {"DPAAT_PREDICT_STEPS": "2", "DPAAT_PREDICT_CAP": "8", "DPAAT_SSE_POLL_SECONDS": "0.2"}
FULLSTACK = [pytest.mark.fullstack, pytest.mark.slow]
EVAL = {"eps_list": [0, 1, 2], "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": 2}]}


class Server:
    """Where the dashboard runs: its URL, two owners' keys and an HTTP client with alice's key."""

    base: str
    alice: str
    bob: str
    tmp: Path
    http: httpx.Client
    log: Path

    def job(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        """The job once it has finished."""
        body: dict[str, Any] = {}

        def done() -> bool:
            nonlocal body
            body = self.http.get(f"/api/v1/jobs/{job_id}").json()
            return body["status"] in ("succeeded", "failed", "cancelled")

        wait_for(done, timeout, f"job {job_id}", every=0.5)
        assert body["status"] == "succeeded", (body.get("error"), self.log.read_text()[-3000:])
        return body


class Embedded(Server):
    """`dpaat serve` in the embedded default (SQLite, the in-process worker), authentication on."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        url = f"sqlite:///{tmp / 'ui.db'}"
        upgrade(url)
        engine = make_engine(url)
        with make_sessionmaker(engine)() as s:
            self.alice = api_keys.create_key(s, owner="alice", scopes=["read", "submit"])[1]
            self.bob = api_keys.create_key(s, owner="bob", scopes=["read", "submit"])[1]
        engine.dispose()
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", "DATABASE_URL")}
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",
                "DPAAT_DATABASE_URL": url,
                "DPAAT_ARTIFACT_DIR": str(tmp / "artifacts"),
                "DPAAT_AUTH": "on",
                "DPAAT_DATA_ROOTS": "[]",
                **FAST,
            }
        )
        self.log = tmp / "serve.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                dpaat_command("serve", "--port", str(port), "--log-level", "warning"),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.http = httpx.Client(base_url=self.base, headers={"X-API-Key": self.alice}, timeout=60)

        def ready() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return self.http.get("/health/ready").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 90, "dpaat serve", every=0.3)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


class FullStack(Server):
    """The full deployment of tests/stack_support.py: PostgreSQL, Redis, `dpaat serve` and a
    separate `dpaat worker`; the keys made with `dpaat keys create`."""

    def __init__(self, stack: Stack, tmp: Path) -> None:
        self.tmp = tmp
        self.base = stack.base_url
        self.alice = stack.new_key("alice")
        self.bob = stack.new_key("bob")
        self.http = httpx.Client(base_url=self.base, headers={"X-API-Key": self.alice}, timeout=60)
        self.log = stack.logs / "api.log"


@pytest.fixture(scope="module", params=["embedded", pytest.param("fullstack", marks=FULLSTACK)])
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    chromium: tuple[str, str],  # checked before a server is started for nothing
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"ui-{request.param}")
    if request.param == "embedded":
        embedded = Embedded(tmp)
        try:
            yield embedded
        finally:
            embedded.stop()
        return
    postgres, redis_url = (request.getfixturevalue(n) for n in ("postgres_url", "redis_url"))
    with running_stack(postgres, redis_url, tmp, env=FAST) as stack:
        full = FullStack(stack, tmp)
        try:
            yield full
        finally:
            full.http.close()


@pytest.fixture(scope="module")
def driver(chromium: tuple[str, str]) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = chromium
    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="dpaat-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.binary_location = browser
    d = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    d.set_page_load_timeout(120)
    d.set_script_timeout(60)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


SHOTS = Path(os.environ.get("DPAAT_UI_SCREENSHOTS", ROOT / "var" / "ui-screenshots"))


def shot(driver: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(max(int(height) + 40, 700), 2400))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(1280, 1000)


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def wait_until(driver: Any, condition: Any, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def image_loads(driver: Any, element_id: str) -> tuple[int, int, int]:
    """(HTTP status, bytes, natural width) of an <img>, fetched again by the page itself with
    its session cookie."""
    wait_until(
        driver,
        lambda d: d.execute_script(
            "const i = document.getElementById(arguments[0]); return i && i.complete;", element_id
        ),
    )
    status, size = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById(arguments[0]).src, {credentials: 'same-origin'})"
        ".then(r => r.blob().then(b => done([r.status, b.size])));",
        element_id,
    )
    width = driver.execute_script(
        "return document.getElementById(arguments[0]).naturalWidth;", element_id
    )
    return int(status), int(size), int(width)


def sign_in(driver: Any, server: Server, key: str) -> None:
    driver.get(f"{server.base}/ui")
    assert "/ui/login" in driver.current_url
    by_id(driver, "api-key").send_keys(key)
    by_id(driver, "sign-in").click()
    wait_until(driver, lambda d: d.current_url.rstrip("/").endswith("/ui"))


def png_file(path: Path) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (180, 90, 70)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def test_a_person_walks_through_the_dashboard(server: Server, driver: Any) -> None:
    from selenium.webdriver.support.ui import Select

    tmp = server.tmp
    tag = "" if isinstance(server, Embedded) else "-fullstack"
    driver.delete_all_cookies()  # one browser for both deployments (cookies ignore the port)
    sign_in(driver, server, server.alice)
    assert by_id(driver, "owner").text == "alice"

    # ---- upload a small generated dataset
    archive = tmp / "lesions.zip"
    archive.write_bytes(zip_bytes(ham_files(per_class=8)))
    driver.get(f"{server.base}/ui/datasets")
    by_id(driver, "dataset-file").send_keys(str(archive))
    by_id(driver, "dataset-name").send_keys("tiny lesions")
    by_id(driver, "upload").click()
    wait_until(driver, lambda d: "/ui/datasets/" in d.current_url)
    dataset_id = driver.current_url.rsplit("/", 1)[1]
    assert by_id(driver, "dataset-title").text == "tiny lesions"
    assert "akiec" in by_id(driver, "class-counts").text
    assert "train" in by_id(driver, "split-sizes").text
    assert driver.execute_script(
        "return [...document.querySelectorAll('.thumbs img')].every(i => i.naturalWidth > 0)"
    )
    shot(driver, "dataset" + tag)

    # ---- train: the job page follows progress without a reload
    driver.get(f"{server.base}/ui/jobs?dataset={dataset_id}")
    by_id(driver, "train-name").send_keys("dpaat-tiny")
    for field, value in TINY.items():
        element = by_id(driver, {"image_size": "train-size", "pgd_steps": "train-steps",
                                 "eps_max": "train-eps"}.get(field, f"train-{field}"))  # fmt: skip
        element.clear()
        element.send_keys(value)
    by_id(driver, "train-limit").send_keys("8")
    by_id(driver, "train").click()
    wait_until(driver, lambda d: "/ui/jobs/" in d.current_url)
    job_a = driver.current_url.rsplit("/", 1)[1]
    driver.execute_script("window.__samePage = 'yes';")
    first_status = by_id(driver, "job-status").text
    # A second model for the comparison, submitted as a CI script would.
    r = server.http.post(
        "/api/v1/jobs/train",
        json={
            "dataset_id": dataset_id,
            "name": "pgd-tiny",
            "config": {
                "method": "pgd_at",
                "image_size": 32,
                "epochs": 1,
                "pgd_steps": 2,
                "eps_max": 4,
                "limit": 8,
            },
        },
    )
    assert r.status_code == 201, r.text
    job_b = r.json()["id"]
    # Live: the status changed and several events arrived while the document stayed the same.
    wait_until(
        driver,
        lambda d: (
            d.execute_script("return window.__samePage") == "yes"
            and by_id(d, "job-status").text != first_status
            and int(by_id(d, "job-update-count").text) >= 2
        ),
        timeout=120,
    )
    shot(driver, "job" + tag)
    wait_until(driver, lambda d: d.find_elements("id", "result-model"), timeout=240)
    assert by_id(driver, "job-status").text == "succeeded"
    assert driver.find_elements("css selector", "table.hist tr")  # DPAAT's radius histogram
    model_a = server.job(job_a)["result"]["model_id"]

    # ---- evaluate model A from its page
    by_id(driver, "result-model").click()
    wait_until(driver, lambda d: "/ui/models/" in d.current_url)
    assert by_id(driver, "no-report")
    eps = by_id(driver, "eval-eps")
    eps.clear()
    eps.send_keys("0, 1, 2")
    steps = by_id(driver, "eval-steps")
    steps.clear()
    steps.send_keys("2")
    by_id(driver, "evaluate").click()
    wait_until(driver, lambda d: "/ui/jobs/" in d.current_url)
    eval_a = driver.current_url.rsplit("/", 1)[1]
    model_b = server.job(job_b)["result"]["model_id"]
    r = server.http.post("/api/v1/jobs/evaluate", json={"model_id": model_b, **EVAL})
    assert r.status_code == 201, r.text
    eval_b = r.json()["id"]
    r = server.http.post(
        "/api/v1/audits",
        json={
            "model_id": model_a,
            "dataset_id": dataset_id,
            **EVAL,
            "thresholds": [
                {"metric": "accuracy", "op": ">=", "value": 0.0},
                {"metric": "verdict", "op": "!=", "value": "fail"},
            ],
        },
    )
    assert r.status_code == 201, r.text
    audit_id = r.json()["id"]
    server.job(eval_a)
    server.job(eval_b)
    server.job(r.json()["job_id"])

    # ---- the model's report: metrics, checks, figures that load with the session cookie
    driver.get(f"{server.base}/ui/models/{model_a}")
    assert by_id(driver, "verdict").text in ("pass", "warn", "fail")
    assert "clean" in by_id(driver, "metrics-table").text
    assert "akiec" in by_id(driver, "recall-table").text
    status, size, width = image_loads(driver, "fig-robustness_curve")
    assert (status, size > 1000, width > 0) == (200, True, True)
    for name in ("class_recall", "gradcam_montage"):
        assert image_loads(driver, f"fig-{name}")[0] == 200
    shot(driver, "model" + tag)

    # ---- compare two models, then the leaderboard
    driver.get(f"{server.base}/ui/models")
    for box in driver.find_elements("css selector", "input.pick"):
        box.click()
    by_id(driver, "compare-picked").click()
    wait_until(driver, lambda d: "/ui/compare?" in d.current_url)
    assert image_loads(driver, "compare-curve")[0] == 200
    table = by_id(driver, "compare-table").text
    assert "dpaat-tiny" in table and "pgd-tiny" in table
    shot(driver, "compare" + tag)
    driver.get(f"{server.base}/ui/leaderboard")
    rows = driver.find_elements("css selector", "#board-table tr")
    assert len(rows) == 3, by_id(driver, "board-table").text  # header + 2 models
    shot(driver, "leaderboard" + tag)

    # ---- the audit
    driver.get(f"{server.base}/ui/audits")
    driver.find_element("link text", audit_id[:8]).click()
    wait_until(driver, lambda d: f"/ui/audits/{audit_id}" in d.current_url)
    assert by_id(driver, "audit-outcome").text in ("passed", "failed")
    assert "accuracy >= 0" in by_id(driver, "thresholds-table").text
    assert "audit.xml" in by_id(driver, "audit-files").text
    assert image_loads(driver, "audit-curve")[0] == 200
    shot(driver, "audit" + tag)

    # ---- predict on an image
    driver.get(f"{server.base}/ui/predict")
    Select(by_id(driver, "predict-model")).select_by_value(model_a)
    by_id(driver, "predict-file").send_keys(str(png_file(tmp / "lesion.png")))
    by_id(driver, "predict").click()
    wait_until(driver, lambda d: d.find_elements("id", "predicted-class"), timeout=120)
    assert by_id(driver, "predicted-class").text in ("akiec", "bcc", "nv")
    assert 0 <= float(by_id(driver, "robustness-score").text) <= 1
    assert "eps*" in by_id(driver, "robustness-words").text
    assert driver.execute_script("return document.getElementById('gradcam').naturalWidth") > 0
    shot(driver, "predict" + tag)

    # ---- sign out: the pages ask for a key again
    by_id(driver, "sign-out").click()
    wait_until(driver, lambda d: "/ui/login" in d.current_url)
    driver.get(f"{server.base}/ui/models")
    assert "/ui/login" in driver.current_url

    # ---- another owner sees none of it
    sign_in(driver, server, server.bob)
    assert by_id(driver, "owner").text == "bob"
    for page, table in (("datasets", "datasets-table"), ("jobs", "jobs-table"),
                        ("models", "models-table"), ("audits", "audits-table")):  # fmt: skip
        driver.get(f"{server.base}/ui/{page}")
        text = by_id(driver, table).text
        assert "No " in text and "tiny" not in text, (page, text)
    driver.get(f"{server.base}/ui/models/{model_a}")
    assert "404" in driver.find_element("tag name", "h1").text
    status, _size, _w = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => done([r.status, 0, 0]));",
        f"/api/v1/models/{model_a}/figures/robustness_curve.png",
    )
    assert status == 404
    time.sleep(0)  # the walk is one test: one browser session, one server
