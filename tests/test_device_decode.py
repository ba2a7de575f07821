"""JPEG uploads decoded inside the served pass (nvJPEG on CUDA): the same images, laid out the same way, as the host
path; a bad file fails only itself."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from scenarios.decode import MAX_ASPECT, SHORT_SIDE, BadImage, decode_shrunk
from scenarios.pipeline import Preprocess
from scenarios.streaming import DeviceStage, pad_batch

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")

from serving.device_decode import decode_jpegs  # noqa: E402
from scenarios.gpu_jpeg import device_decodable  # noqa: E402


def jpeg(seed: int, size=(300, 400)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", quality=90)
    return out.getvalue()


def bogus_huffman(data: bytes) -> bytes:
    """A JPEG whose header reads fine (size, format) but whose Huffman table cannot be used."""
    b = bytearray(data)
    i = b.index(b"\xff\xc4")
    b[i + 5:i + 21] = b"\xff" * 16
    return bytes(b)


def test_decoded_in_the_pass_is_the_host_decoders_image():
    files = [jpeg(0), jpeg(1, (700, 200)), jpeg(2, (120, 90))]  # shrunk, aspect-capped, left as is
    got = decode_jpegs(files, device=torch.device("cpu"), short_side=SHORT_SIDE, max_aspect=MAX_ASPECT)
    for data, img in zip(files, got):
        assert np.array_equal(img.permute(1, 2, 0).numpy(),
                              decode_shrunk(data, short_side=SHORT_SIDE, max_aspect=MAX_ASPECT))


def test_a_bad_file_fails_alone_with_the_decoders_reason():
    good = jpeg(0)
    got = decode_jpegs([good, bogus_huffman(good), good], device=torch.device("cpu"), short_side=SHORT_SIDE,
                       max_aspect=MAX_ASPECT)
    assert isinstance(got[1], BadImage) and "Huffman" in str(got[1])
    assert torch.equal(got[0], got[2])


def test_only_complete_jpegs_are_decoded_in_the_pass():
    data = jpeg(0)
    assert device_decodable(data)
    assert not device_decodable(data[:-100])  # cut short: the host decoder names the problem
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    assert not device_decodable(png.getvalue())


def test_images_laid_out_on_the_device_are_the_host_batch_bit_for_bit():
    import timm

    bb = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64)
    rng = np.random.default_rng(0)
    for sizes in ([(40, 50), (70, 33), (64, 64)], [(40, 50)] * 3):  # one by one; all of one size together
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
        canvas, hw = pad_batch(images)
        for augment in ("inception", "flip"):  # timm's centre crop; the whole image, whose resize reads the edge
            stage = DeviceStage(Preprocess.for_backbone(bb, augment), torch.device("cpu"))
            host, _ = stage(canvas, hw, torch.zeros(3, dtype=torch.int64), train=False)
            assert torch.equal(stage.from_images([torch.from_numpy(a).permute(2, 0, 1) for a in images]), host)


def test_shrinking_images_of_one_size_together_gives_each_ones_bits():
    from scenarios.decode import shrink, shrink_by_size

    rng = np.random.default_rng(0)
    sizes = [(375, 500), (375, 500), (200, 700), (375, 500), (90, 120)]
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    images.insert(2, BadImage("left as it is"))
    got = shrink_by_size(images, short_side=SHORT_SIDE, max_aspect=MAX_ASPECT)
    assert got[2] is images[2]
    for img, out in zip(images, got):
        if not isinstance(img, BadImage):
            assert torch.equal(out, shrink(img, short_side=SHORT_SIDE, max_aspect=MAX_ASPECT))
    assert [tuple(t.shape[1:]) for t in got if not isinstance(t, BadImage)] == [
        (256, 341), (256, 341), (200, 400), (256, 341), (90, 120)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU host)")
def test_a_decoded_image_freed_before_its_readers_ran_is_not_overwritten_by_the_next_decode():
    """nvJPEG writes from a stream of its own: memory freed on the current stream while a queued kernel still reads
    it must not be handed to the next decode (the served pass's layout read another request's pixels)."""
    dev = torch.device("cuda")
    a, b = jpeg(0, (64, 48)), jpeg(1, (64, 48))
    want = decode_jpegs([a], device=dev, short_side=SHORT_SIDE, max_aspect=MAX_ASPECT)[0].double().sum().item()
    for _ in range(5):
        x = decode_jpegs([a], device=dev, short_side=SHORT_SIDE, max_aspect=MAX_ASPECT)[0]
        torch.cuda._sleep(200_000_000)  # the current stream busy for ~0.1 s: the read below waits behind it
        total = x.double().sum()
        del x  # freed now, read later
        decode_jpegs([b], device=dev, short_side=SHORT_SIDE, max_aspect=MAX_ASPECT)
        assert total.item() == want
