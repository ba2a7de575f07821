import pytest

from continual_mem import TaskConfig, parse_layers


@pytest.mark.parametrize(
    "spec,expected",
    [("all", (0, 1, 2, 3)), ("last:2", (2, 3)), ("first:1", (0,)), ("3,0", (0, 3)), ("none", ()), ([1, 2], (1, 2))],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 4) == expected


@pytest.mark.parametrize("spec,msg", [("last:9", "k must be"), ("7", "out of range"), ("middle", "not understood"),
                                      ("1,1", "duplicates")])
def test_parse_layers_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_layers(spec, 4)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(name="bad name"), "invalid"),
        (dict(name="original"), "invalid"),
        (dict(num_classes=0), "num_classes"),
        (dict(regime="lora"), "unknown regime"),
        (dict(mode="sideways"), "unknown mode"),
        (dict(regime="memory", mode="extension"), "extension mode needs"),
        (dict(memory=0), "needs memory >= 1"),
        (dict(regime="head", memory=5, layers=(0,)), "has no per-layer memory"),
        (dict(regime="input-memory", memory=0, layers=()), "input_memory >= 1"),
        (dict(class_names=("a",)), "class names"),
        (dict(regime="full", memory=0, layers=(), task_tokens=2), "several task tokens"),
    ],
)
def test_config_validation(kwargs, msg):
    base = dict(name="t", num_classes=3, regime="masked-memory", memory=2, layers=(0,))
    with pytest.raises(ValueError, match=msg):
        TaskConfig(**{**base, **kwargs})


def test_config_round_trip():
    c = TaskConfig(name="t", num_classes=2, memory=3, layers=(1, 2), class_names=("a", "b"))
    assert TaskConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown fields"):
        TaskConfig.from_dict({**c.to_dict(), "surprise": 1})
