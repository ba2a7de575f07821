import pytest

from continual_mem import MemoryViT
from helpers import make_backbone


@pytest.fixture
def tiny():
    return make_backbone("tiny")


@pytest.fixture
def model(tiny):
    return MemoryViT(tiny)


@pytest.fixture(autouse=True, scope="session")
def _prepared_copies_in_a_temporary_folder(tmp_path_factory):
    """Prepared copies that tests make (add-task on image folders builds them) stay out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CONTINUAL_MEM_PREPARED", str(tmp_path_factory.mktemp("prepared")))
    yield
    mp.undo()
