"""Data from outside, property style (hypothesis): every image format and mode a user may bring decodes to the
pixels PIL gives (``Image.open(...).convert("RGB")``, what timm's and torchvision's loaders use; no EXIF rotation
on either side), or fails with one clear line; the prepared copy stores exactly what the decoder gives."""
import io

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis", reason="needs the dev extra: pip install -e '.[dev]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scenarios import prepared  # noqa: E402
from scenarios.decode import MAX_ASPECT, SHORT_SIDE, BadImage, FilesReader, decode_item, decode_shrunk  # noqa: E402
from scenarios.prepared import PrepareOptions  # noqa: E402

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
# (PIL mode, format, lossless): what the decoders must read
KINDS = [("RGB", "PNG", True), ("L", "PNG", True), ("LA", "PNG", True), ("RGBA", "PNG", True), ("P", "PNG", True),
         ("RGB", "JPEG", False), ("L", "JPEG", False), ("CMYK", "JPEG", False), ("P", "GIF", True),
         ("RGB", "BMP", True), ("RGB", "WEBP", True), ("RGBA", "WEBP", True), ("RGB", "TIFF", True)]
JPEG_TOLERANCE = 2  # libjpeg-turbo (torchvision) and PIL's libjpeg may round the colour conversion differently


def make(kind, size, seed: int, orientation: int = 1) -> bytes:
    mode, fmt, _ = kind
    w, h = size
    rgba = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    im = Image.fromarray(rgba, "RGBA").convert(mode) if mode != "P" else Image.fromarray(rgba[..., :3]).convert("P")
    out = io.BytesIO()
    kw = {"quality": 92} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    if fmt == "JPEG" and orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(out, fmt, **kw)
    return out.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@PROPERTY
@given(kind=st.sampled_from(KINDS), size=st.tuples(st.integers(1, 120), st.integers(1, 120)),
       seed=st.integers(0, 2**16), orientation=st.integers(1, 8))
def test_every_format_and_mode_decodes_to_pils_pixels(kind, size, seed, orientation):
    data = make(kind, size, seed, orientation)
    got = decode_shrunk(data, short_side=None, max_aspect=1000.0)
    want = pil_rgb(data)
    assert got.dtype == np.uint8 and got.shape == want.shape == (size[1], size[0], 3)
    diff = np.abs(got.astype(int) - want.astype(int)).max()
    assert diff <= (0 if kind[2] else JPEG_TOLERANCE), (kind, size, diff)


def test_sixteen_bit_pngs_keep_their_high_byte():
    # torchvision decodes a 16-bit PNG to uint16; the pipeline is uint8: the 8 most significant bits, not a wrap
    # (PIL's own convert("RGB") clips every value above 255 to white, so it is no reference here)
    grey = np.random.default_rng(0).integers(0, 256, (9, 13), dtype=np.uint16)
    out = io.BytesIO()
    Image.fromarray(grey * 257).save(out, "PNG")  # 16-bit: value v becomes v * 257, high byte v
    got = decode_shrunk(out.getvalue(), short_side=None, max_aspect=1000.0)
    assert got.dtype == np.uint8 and np.array_equal(got, np.repeat(grey[..., None], 3, axis=2).astype(np.uint8))


@PROPERTY
@given(kind=st.sampled_from([k for k in KINDS if k[1] in ("PNG", "JPEG", "GIF", "WEBP")]),
       cut=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_a_truncated_file_is_one_clear_error_or_the_pixels_it_holds(kind, cut, seed):
    data = make(kind, (64, 48), seed)
    part = data[: max(1, int(len(data) * cut))]
    try:
        got = decode_shrunk(part, short_side=None, max_aspect=1000.0)
    except BadImage as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 300, message
        return
    # a decoder that accepts a cut file (GIF frames, progressive data) must still give an image of the full size
    assert got.dtype == np.uint8 and got.shape == (48, 64, 3)


def test_what_is_no_image_is_named():
    with pytest.raises(BadImage, match="not an image file"):
        decode_shrunk(b"hello, not an image", short_side=None, max_aspect=MAX_ASPECT)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.tuples(st.sampled_from(KINDS), st.tuples(st.integers(8, 400), st.integers(8, 400)),
                                st.integers(0, 2**16)), min_size=1, max_size=6))
def test_the_prepared_copy_stores_what_the_decoder_gives(tmp_path_factory, items):
    folder = tmp_path_factory.mktemp("files")
    paths = []
    for i, (kind, size, seed) in enumerate(items):
        path = folder / f"{i}.{kind[1].lower()}"
        path.write_bytes(make(kind, size, seed))
        paths.append(str(path))
    reader = FilesReader(paths, np.arange(len(paths)) % 2)
    copy = prepared.prepare(reader, name="props", split="train", class_names=("a", "b"),
                            opts=PrepareOptions(workers=0), root=tmp_path_factory.mktemp("prepared"))
    assert len(copy) == len(paths)
    for i in range(len(paths)):
        want = decode_item(reader, i, short_side=SHORT_SIDE, max_aspect=MAX_ASPECT)
        assert np.array_equal(copy.image(i), want), items[i]
