"""The mutation-score command: the temporary mutmut settings keep every other setting, the score counts right."""
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "dev"))
import mutation_score as ms  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_the_run_s_settings_change_only_the_modules_and_tests():
    text = (ROOT / "pyproject.toml").read_text()
    new = tomllib.loads(ms.with_section(text, ["registry/api.py"], ["tests/test_registry.py"]))
    old = tomllib.loads(text)
    assert new["tool"]["mutmut"] == {**old["tool"]["mutmut"], "only_mutate": ["registry/api.py"],
                                     "pytest_add_cli_args_test_selection": ["tests/test_registry.py"]}
    assert {k: v for k, v in new.items() if k != "tool"} == {k: v for k, v in old.items() if k != "tool"}
    assert {k: v for k, v in new["tool"].items() if k != "mutmut"} == {
        k: v for k, v in old["tool"].items() if k != "mutmut"}
    with pytest.raises(ValueError, match="no \\[tool.mutmut\\] section"):
        ms.with_section("[project]\nname = 'x'\n", [], [])


def test_the_score_is_killed_over_the_mutants_a_test_reached():
    results = """
    registry.api.x_check__mutmut_1: killed
    registry.api.x_check__mutmut_2: survived
    registry.api.x_check__mutmut_3: killed
    registry.api.xǁReportǁfailing__mutmut_1: no tests
    registry.api.x_sha256__mutmut_1: not checked
    registry.changes.x_add__mutmut_3: timeout
    """
    res = ms.scores(results)
    assert res["registry.api"] == {"counts": {"killed": 2, "survived": 1, "no tests": 1, "not checked": 1},
                                   "score": 2 / 3, "survivors": ["registry.api.x_check__mutmut_2"]}
    assert res["registry.changes"]["score"] == 0.0  # a timeout is not a kill
    assert "| registry.api | 5 | 2 | 1 | 1 | 1 | 66.7% |" in ms.table(res)
