import pytest

from continual_mem import MemoryViT
from helpers import make_backbone


@pytest.fixture
def tiny():
    return make_backbone("tiny")


@pytest.fixture
def model(tiny):
    return MemoryViT(tiny)
