"""The prediction worker's parts (issue 12), without Redis: the model cache bounded by count and
bytes, and the micro-batching loop (grouping, size bound, failure isolation)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import models.api
from app.services.prediction import ModelSpec, PredictParams
from worker.predict import Batcher, ModelCache

PARAMS = PredictParams(cap=8.0, eps_list=(1.0,), steps=1, gradcam=False)


def spec(sha: str) -> ModelSpec:
    return ModelSpec(sha, sha, "weights/x.safetensors", "safetensors", "small_cnn", ("a", "b"), 32)


def cache_with(tmp_path: Path, max_models: int, max_bytes: int, loads: list[str]) -> ModelCache:
    cache = ModelCache(tmp_path, max_models, max_bytes)

    def load(s: ModelSpec) -> Any:
        loads.append(s.sha256)
        return SimpleNamespace(model=nn.Linear(10, 10))  # 110 float32 = 440 bytes

    cache._load = load  # type: ignore[method-assign]
    return cache


def test_model_cache_is_an_lru_bounded_by_count(tmp_path: Path) -> None:
    loads: list[str] = []
    cache = cache_with(tmp_path, 2, 1 << 20, loads)
    for sha in ("a", "b", "a", "c", "a", "b"):
        cache.get(spec(sha))
    assert loads == ["a", "b", "c", "b"]  # "b" was evicted by "c" (least recently used)
    assert cache.cached() == ["a", "b"]


def test_model_cache_is_bounded_by_bytes(tmp_path: Path) -> None:
    loads: list[str] = []
    cache = cache_with(tmp_path, 10, 1000, loads)  # room for two 440-byte models
    for sha in ("a", "b", "c"):
        cache.get(spec(sha))
    assert cache.cached() == ["b", "c"] and cache.bytes() == 880
    tiny = cache_with(tmp_path, 10, 100, [])  # a model over the bound alone still serves
    tiny.get(spec("a"))
    assert tiny.cached() == ["a"]


@pytest.fixture
def fake_predict(monkeypatch: pytest.MonkeyPatch) -> list[list[bytes]]:
    """models.api.predict replaced by one that records its batches and echoes each image."""
    calls: list[list[bytes]] = []

    def predict(_loaded: Any, images: list[bytes], **_: Any) -> list[dict[str, Any]]:
        calls.append(list(images))
        if b"bad" in images:
            raise ValueError("cannot decode image")
        return [{"class": image.decode(), "gradcam_png": None} for image in images]

    monkeypatch.setattr(models.api, "predict", predict)
    return calls


def batcher(tmp_path: Path, window_ms: float = 300, max_images: int = 32) -> Batcher:
    stats: list[tuple[int, int]] = []
    b = Batcher(
        cache_with(tmp_path, 4, 1 << 20, []),
        window_ms=window_ms,
        max_images=max_images,
        record=lambda requests, images, _s: stats.append((requests, images)),
    )
    b.stats = stats  # type: ignore[attr-defined]
    return b


def test_requests_within_the_window_share_one_batch(
    tmp_path: Path, fake_predict: list[list[bytes]]
) -> None:
    b = batcher(tmp_path)
    futures = [b.submit(spec("m"), [f"img{i}".encode()], PARAMS) for i in range(5)]
    answers = [f.result(timeout=10) for f in futures]
    assert [a[0]["class"] for a in answers] == [f"img{i}" for i in range(5)]
    assert fake_predict == [[f"img{i}".encode() for i in range(5)]]
    assert b.stats == [(5, 5)]  # type: ignore[attr-defined]
    b.stop()


def test_other_models_and_budgets_are_not_mixed(
    tmp_path: Path, fake_predict: list[list[bytes]]
) -> None:
    b = batcher(tmp_path)
    other = PredictParams(cap=16.0, eps_list=(1.0,), steps=1, gradcam=False)
    futures = [
        b.submit(spec("m"), [b"a"], PARAMS),
        b.submit(spec("n"), [b"b"], PARAMS),
        b.submit(spec("m"), [b"c"], other),
        b.submit(spec("m"), [b"d"], PARAMS),
    ]
    assert [f.result(timeout=10)[0]["class"] for f in futures] == ["a", "b", "c", "d"]
    assert sorted(fake_predict) == [[b"a", b"d"], [b"b"], [b"c"]]
    b.stop()


def test_a_batch_never_exceeds_max_images(tmp_path: Path, fake_predict: list[list[bytes]]) -> None:
    b = batcher(tmp_path, max_images=4)
    futures = [b.submit(spec("m"), [b"x%d" % i, b"y%d" % i], PARAMS) for i in range(3)]
    for i, f in enumerate(futures):
        assert [r["class"] for r in f.result(timeout=10)] == [f"x{i}", f"y{i}"]
    assert [len(c) for c in fake_predict] == [4, 2]
    b.stop()


def test_one_bad_request_does_not_fail_its_batch(
    tmp_path: Path, fake_predict: list[list[bytes]]
) -> None:
    b = batcher(tmp_path)
    good = b.submit(spec("m"), [b"ok"], PARAMS)
    bad = b.submit(spec("m"), [b"bad"], PARAMS)
    assert good.result(timeout=10)[0]["class"] == "ok"
    with pytest.raises(ValueError, match="decode"):
        bad.result(timeout=10)
    b.stop()


def test_batched_answers_equal_single_ones_on_a_real_model(tmp_path: Path) -> None:
    """The real models.api.predict: an image's answer does not depend on its batch mates."""
    import io

    from PIL import Image

    from models.nets import build_model

    torch.manual_seed(0)
    loaded = models.api.LoadedModel(
        build_model("small_cnn", 2).eval(), {"classes": ["a", "b"], "image_size": 16}, "sha"
    )
    images = []
    for i in range(4):
        buf = io.BytesIO()
        Image.effect_noise((16, 16), 30 + 10 * i).convert("RGB").save(buf, format="PNG")
        images.append(buf.getvalue())
    alone = [models.api.predict(loaded, [im], cap=8, eps_list=(1, 4), steps=2)[0] for im in images]
    cache = ModelCache(tmp_path, 2, 1 << 30)
    cache._load = lambda _s: loaded  # type: ignore[method-assign]
    b = Batcher(cache, window_ms=300, max_images=8)
    params = PredictParams(cap=8.0, eps_list=(1.0, 4.0), steps=2, gradcam=False)
    futures = [b.submit(spec("sha"), [im], params) for im in images]
    batched = [f.result(timeout=60)[0] for f in futures]
    assert b.batches == [4]
    for one, many in zip(alone, batched, strict=True):
        assert one["class"] == many["class"] and one["robustness"] == many["robustness"]
        for c in one["probabilities"]:
            assert abs(one["probabilities"][c] - many["probabilities"][c]) <= 1e-5
    b.stop()
