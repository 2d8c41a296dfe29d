"""Every image mode Pillow decodes becomes correct 8-bit RGB (app.services.images, the one place
for predictions and datasets alike), each compared with a reference conversion written here with
numpy from the definition (issue 14: a 16-bit grayscale PNG used to become a white image).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from app.services import images

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 25_000_000}
H, W = 16, 24
RNG = np.random.default_rng(14)


def _decoded(data: bytes) -> np.ndarray:
    """What prediction sees: the sanitized PNG, decoded."""
    with Image.open(io.BytesIO(images.sanitize_image(data, **LIMITS))) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def _encoded(im: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _case_i16() -> tuple[bytes, np.ndarray]:
    values = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    expected = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
    return _encoded(Image.fromarray(values)), _gray3(expected)


def _case_i16_dark() -> tuple[bytes, np.ndarray]:
    """12-bit data in a 16-bit PNG (common for sensors) is dark, not clipped to white."""
    values = RNG.integers(0, 4096, (H, W)).astype(np.uint16)
    expected = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
    return _encoded(Image.fromarray(values)), _gray3(expected)


def _case_palette() -> tuple[bytes, np.ndarray]:
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    im = Image.fromarray(index, mode="P")
    im.putpalette(palette.flatten().tolist())
    return _encoded(im), palette[index]


def _case_palette_transparent() -> tuple[bytes, np.ndarray]:
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    index[:4] = 7
    im = Image.fromarray(index, mode="P")
    im.putpalette(palette.flatten().tolist())
    expected = palette[index].copy()
    expected[index == 7] = 255  # the transparent entry shows the white background
    return _encoded(im, transparency=7), expected


def _case_la() -> tuple[bytes, np.ndarray]:
    la = RNG.integers(0, 256, (H, W, 2)).astype(np.uint8)
    return _encoded(Image.fromarray(la, mode="LA")), _over_white(_gray3(la[..., 0]), la[..., 1])


def _case_rgba() -> tuple[bytes, np.ndarray]:
    rgba = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    return _encoded(Image.fromarray(rgba, mode="RGBA")), _over_white(rgba[..., :3], rgba[..., 3])


def _case_l() -> tuple[bytes, np.ndarray]:
    gray = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    return _encoded(Image.fromarray(gray, mode="L")), _gray3(gray)


def _case_bilevel() -> tuple[bytes, np.ndarray]:
    bits = RNG.integers(0, 2, (H, W)).astype(bool)
    return _encoded(Image.fromarray(bits)), _gray3(np.where(bits, 255, 0).astype(np.uint8))


def _case_rgb() -> tuple[bytes, np.ndarray]:
    rgb = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
    return _encoded(Image.fromarray(rgb, mode="RGB")), rgb


PNG_CASES: dict[str, Callable[[], tuple[bytes, np.ndarray]]] = {
    "I;16": _case_i16,
    "I;16 12-bit data": _case_i16_dark,
    "P": _case_palette,
    "P + transparency": _case_palette_transparent,
    "LA": _case_la,
    "RGBA": _case_rgba,
    "L": _case_l,
    "1": _case_bilevel,
    "RGB": _case_rgb,
}


@pytest.mark.parametrize("mode", list(PNG_CASES))
def test_png_modes_for_prediction(mode: str) -> None:
    data, expected = PNG_CASES[mode]()
    assert np.array_equal(_decoded(data), expected)


def test_cmyk_jpeg_for_prediction() -> None:
    """The reference: R = (255 - C)(255 - K) / 255 (and so on), within JPEG's rounding."""
    cmyk = np.zeros((H, W, 4), np.uint8)
    cmyk[:, : W // 2] = (10, 200, 30, 40)
    cmyk[:, W // 2 :] = (180, 20, 90, 0)
    data = _encoded(Image.fromarray(cmyk, mode="CMYK"), "JPEG", quality=100)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = (255 - c) * (255 - k) / 255
    got = _decoded(data).astype(np.float64)
    assert np.abs(got - expected).max() <= 3


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # 32-bit integers in the 16-bit range: scaled from 16 bits, as a 16-bit PNG is
        (np.array([[0, 257, 65535]], np.int32), [0, 1, 255]),
        # any other range is stretched from its own minimum and maximum
        (np.array([[-1000, 0, 1000]], np.int32), [0, 128, 255]),
        (np.array([[0, 100_000, 200_000]], np.int32), [0, 128, 255]),
    ],
)
def test_32_bit_integer_grayscale(values: np.ndarray, expected: list[int]) -> None:
    rgb = np.asarray(images.to_rgb8(Image.fromarray(values, mode="I")))
    assert rgb[0, :, 0].tolist() == expected and (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # the unit range
        (np.array([[-2.0, 0.0, 2.0]], np.float32), [0, 128, 255]),  # stretched
        (np.array([[3.0, 3.0, 3.0]], np.float32), [0, 0, 0]),  # flat: no division by zero
    ],
)
def test_32_bit_float_grayscale(values: np.ndarray, expected: list[int]) -> None:
    rgb = np.asarray(images.to_rgb8(Image.fromarray(values, mode="F")))
    assert rgb[0, :, 0].tolist() == expected


def test_a_16_bit_dataset_image_is_stored_as_scaled_8_bit(tmp_path: object) -> None:
    from pathlib import Path

    data, expected = _case_i16()
    path = Path(str(tmp_path)) / "ISIC_0000001.png"
    path.write_bytes(data)
    images.reencode_file(path, max_pixels=LIMITS["max_pixels"])
    with Image.open(path) as im:
        assert im.mode == "L"
        assert np.array_equal(np.asarray(im), expected[..., 0])


def test_a_cmyk_dataset_jpeg_is_stored_as_rgb(tmp_path: object) -> None:
    from pathlib import Path

    cmyk = np.full((H, W, 4), (10, 200, 30, 40), np.uint8)
    path = Path(str(tmp_path)) / "ISIC_0000002.jpg"
    path.write_bytes(_encoded(Image.fromarray(cmyk, mode="CMYK"), "JPEG", quality=100))
    images.reencode_file(path, max_pixels=LIMITS["max_pixels"])
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.format == "JPEG"
        got = np.asarray(im).astype(np.float64)
    expected = (255 - cmyk[..., :3].astype(np.float64)) * (255 - 40) / 255
    assert np.abs(got - expected).max() <= 3
