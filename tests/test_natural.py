"""The offline natural-image suite: built from registry package files (made here: a Debian ``.deb`` and an npm
``.tgz`` with the real packages' layouts), no dataset host."""
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from scenarios import datasets, natural


def _png(color, size=(40, 20), alpha=True) -> bytes:
    im = Image.new("RGBA" if alpha else "RGB", size, (*color, 255) if alpha else color)
    if alpha:  # a transparent left half, painted white by the builder
        im.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: dict[str, bytes], mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(path: Path, members: dict[str, bytes]) -> Path:
    """A minimal Debian package: an ``ar`` archive of debian-binary, control.tar.xz and data.tar.xz."""
    parts = [("debian-binary", b"2.0\n"), ("control.tar.xz", _tar({"./control": b"Package: x\n"})),
             ("data.tar.xz", _tar(members))]
    out = bytearray(b"!<arch>\n")
    for name, body in parts:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode()
        out += body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def _tux_members(n_per_class: int = 40) -> dict[str, bytes]:
    root = "./usr/share/tuxpaint/stamps"
    members = {}
    for c, color in (("animals", (200, 30, 30)), ("food", (30, 200, 30))):
        for i in range(n_per_class):
            members[f"{root}/{c}/sub/{i}.png"] = _png((color[0], color[1], (i * 5) % 255))
    members[f"{root}/animals/sub/copy.png"] = members[f"{root}/animals/sub/0.png"]  # exact duplicate: dropped
    members[f"{root}/food/bad.png"] = b"not an image"
    members[f"{root}/space/moon.png"] = _png((1, 2, 3))  # a class with too few images: left out
    members[f"{root}/animals/sub/sound.ogg"] = b"ogg"
    return members


def test_build_a_deb_into_an_image_folder_and_load_it(tmp_path):
    deb = _deb(tmp_path / "tux.deb", _tux_members())
    folder = natural.build("tuxpaint", tmp_path / "data", package_file=deb)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["classes"] == ["animals", "food"] and meta["left_out"] == {"duplicate": 1,
                                                                         "unreadable or too large": 1}
    assert meta["left_out_classes"] == ["space"]
    counts = {p: sum(meta["counts"][p].values()) for p in ("train", "test")}
    assert counts["train"] + counts["test"] == 80 and 0 < counts["test"] < counts["train"]
    data = datasets.load("tuxpaint", root=tmp_path / "data")
    assert data.class_names == ("animals", "food") and data.augment == "inception"
    assert tuple(data.train.images.shape[1:]) == (3, natural.SIDE, natural.SIDE)
    assert len(data.train) == counts["train"] and len(data.test) == counts["test"]
    # transparency is white, the wide image is padded (white) to a square, the colour is kept
    img = data.train.images[0].permute(1, 2, 0).numpy().astype(int)
    assert (img[5, :] > 235).all()  # the top padding row
    assert (img[natural.SIDE // 2, natural.SIDE // 8] > 235).all()  # the transparent left half
    assert img[natural.SIDE // 2, 3 * natural.SIDE // 4, 0] > 150  # the opaque right half keeps its red/green
    assert not list((tmp_path / "data").glob(".*partial"))


def test_the_split_is_fixed_by_content_and_rebuilding_is_a_no_op(tmp_path):
    deb = _deb(tmp_path / "tux.deb", _tux_members())
    a = natural.build("tuxpaint", tmp_path / "a", package_file=deb)
    b = natural.build("tuxpaint", tmp_path / "b", package_file=deb)
    files = lambda f: sorted(str(p.relative_to(f)) for p in f.rglob("*.jpg"))  # noqa: E731
    assert files(a) == files(b)
    stamp = (a / "meta.json").stat().st_mtime_ns
    natural.build("tuxpaint", tmp_path / "a", package_file=deb)
    assert (a / "meta.json").stat().st_mtime_ns == stamp
    assert natural.split_name("0" * 40) == "test" and natural.split_name("f" * 40) == "train"


def test_emoji_labels_come_from_emoji_json_and_skip_components(tmp_path):
    table = [{"image": f"{i}.png", "category": cat, "has_img_apple": True}
             for i, cat in enumerate(["Animals & Nature"] * 35 + ["Objects"] * 35 + ["Component"] * 35)]
    members = {"package/emoji.json": json.dumps(table).encode()}
    members.update({f"package/img/apple/64/{i}.png": _png((i * 7 % 255, 99, 5), (64, 64), alpha=False)
                    for i in range(len(table))})
    tgz = tmp_path / "emoji.tgz"
    tgz.write_bytes(_tar(members, "w:gz"))
    folder = natural.build("emoji-apple", tmp_path / "data", package_file=tgz)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["classes"] == ["Animals & Nature", "Objects"] and meta["side"] == 64


def test_clear_errors(tmp_path):
    with pytest.raises(datasets.DatasetError, match="build-dataset openclipart"):
        datasets.load("openclipart", root=tmp_path)
    with pytest.raises(natural.NaturalDataError, match="unknown suite dataset"):
        natural.build("nope", tmp_path)
    bad = tmp_path / "x.deb"
    bad.write_bytes(b"garbage")
    with pytest.raises(natural.NaturalDataError, match="not a Debian package"):
        natural.build("tuxpaint", tmp_path, package_file=bad)
    few = _deb(tmp_path / "few.deb", {"./usr/share/tuxpaint/stamps/a/b/1.png": _png((1, 1, 1))})
    with pytest.raises(natural.NaturalDataError, match="fewer than 2 classes"):
        natural.build("tuxpaint", tmp_path, package_file=few)
    assert not (tmp_path / "tuxpaint").exists()


def test_cli_build_dataset(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    deb = _deb(tmp_path / "tux.deb", _tux_members())
    res = CliRunner().invoke(app, ["build-dataset", "tuxpaint", "--data-root", str(tmp_path), "--package-file",
                                   str(deb), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["classes"] == 2
    res = CliRunner().invoke(app, ["build-dataset", "all", "--data-root", str(tmp_path), "--package-file", str(deb)])
    assert res.exit_code != 0 and "one package" in res.output
    assert "tuxpaint" in datasets.catalog()


def test_fetch_uses_the_registry_client_and_names_the_fix_without_it(tmp_path, monkeypatch):
    src = natural.SOURCES["emoji-apple"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "npm"  # stands in for `npm pack PKG@VERSION`: writes the tarball into the working folder
    fake.write_text(f"#!/bin/sh\necho \"$@\" > args.txt\nprintf tgz > {src.file_name}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    got = natural.fetch(src, tmp_path / "cache")
    assert got.read_bytes() == b"tgz" and (tmp_path / "cache" / "args.txt").read_text().split() == [
        "pack", f"{src.package}@{src.version}"]
    assert natural.fetch(src, tmp_path / "cache") == got  # cached: not fetched twice
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(natural.NaturalDataError, match="apt-get not found; run `apt-get download"):
        natural.fetch(natural.SOURCES["tuxpaint"], tmp_path / "cache")
