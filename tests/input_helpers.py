"""What the input-path tests share: a small JPEG folder and its reader, the preprocessing, a small prepared copy."""
from pathlib import Path

import pytest

from scenarios import datasets, prepared
from scenarios.decode import reader_for
from scenarios.pipeline import Preprocess
from scenarios.prepared import PrepareOptions
from scenarios.synthetic import make_image_folder

PRE = Preprocess(28, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.875, "inception")
SHORT = 48  # small images: quick tests, still shrunk


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    make_image_folder(root, classes=3, per_class=12, size=(80, 60), portrait_every=5)
    return root


@pytest.fixture(scope="module")
def reader(folder):
    return reader_for(datasets.load(f"imagefolder:{folder}").train)


def prepare_small(reader, root, **opts):
    """A prepared copy of ``reader`` in ``root`` at the tests' small short side, decoded in this process."""
    return prepared.prepare(reader, name="jpegs", split="train", class_names=("a", "b", "c"), root=root,
                            opts=PrepareOptions(short_side=SHORT, workers=0, **opts))
