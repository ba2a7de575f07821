"""The join/leave rules, one home each (continual_mem.checks): the model, bundle imports, the registry and the CLI
all ask there."""
from continual_mem.checks import dependants, extension_mismatch, name_taken, removal_refused
from continual_mem.config import TaskConfig


def test_name_taken():
    assert name_taken("a", ["b", "c"]) is None
    assert name_taken("a", iter(["b", "a"]), owner="model 'm'", fix="rename it") == \
        "model 'm' already has a task named 'a'; rename it"
    assert name_taken("a", {"ab": 1}) is None  # whole names, not substrings


def test_extension_mismatch():
    ext = TaskConfig(name="e", num_classes=2, mode="extension", memory=1, layers=(0,), sees=("a", "b"))
    assert extension_mismatch(ext, ["a", "b"]) is None
    assert "trained on top of tasks ['a', 'b'], but this model has token tasks ['a']" in extension_mismatch(ext, ["a"])
    assert extension_mismatch(ext, ["b", "a"]) is not None  # order matters: it reads them in that order
    plain = TaskConfig(name="p", num_classes=2, memory=1, layers=(0,))
    assert extension_mismatch(plain, ["x"]) is None


def test_dependants_and_removal():
    sees = {"a": (), "b": ("a",), "c": ("a", "b"), "d": ()}
    assert dependants("a", sees) == ["b", "c"] and dependants("b", sees) == ["c"] and dependants("d", sees) == []
    assert removal_refused("d", []) is None
    assert removal_refused("a", ["b", "c"]) == \
        "cannot remove 'a': extension tasks ['b', 'c'] attend to it; remove them first"


def test_the_cli_and_the_library_share_one_recipe_and_its_defaults():
    import inspect

    import pytest

    from cli.tasks import add_task
    from scenarios.recipes import train_on_dataset
    from scenarios.task_recipe import DEFAULT, TaskRecipe

    params = inspect.signature(add_task).parameters
    shared = [f for f in TaskRecipe.__dataclass_fields__ if f in params and f != "fork_pool"]
    assert len(shared) >= 25
    assert {f: params[f].default for f in shared} == {f: getattr(DEFAULT, f) for f in shared}
    assert inspect.signature(train_on_dataset).parameters["recipe"].default == DEFAULT
    assert TaskRecipe.from_dict(TaskRecipe(lr=0.2, fork_pool=(1, 2)).to_dict()) == TaskRecipe(lr=0.2, fork_pool=[1, 2])
    for bad, match in ((dict(lr_sweep="0.1,x"), "lr_sweep"), (dict(steps=0), "steps"), (dict(pipeline="ffcv"),
                       "pipeline"), (dict(probe_fraction=1.0), "probe_fraction"), (dict(max_test=0), "max_test")):
        with pytest.raises(ValueError, match=match):
            TaskRecipe(**bad)
