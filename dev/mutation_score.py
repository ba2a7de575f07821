"""Mutation score of chosen modules with chosen tests, in one command (mutmut 3).

mutmut reads its settings from ``[tool.mutmut]`` in ``pyproject.toml`` only. This script puts a section with
``--modules`` and ``--tests`` there for the run, runs ``mutmut run`` (optionally on mutant name patterns only),
puts the file back as it was, and prints the score per module (killed / mutants with a test) as JSON and a table.

    .venv/bin/python dev/mutation_score.py --modules registry/api.py,registry/changes.py \
        --tests tests/test_registry.py,tests/test_registry_verify.py ["registry.api.x_check*" ...]
    .venv/bin/python dev/mutation_score.py --report-only [--modules ...]   # score what the last run left in mutants/

It is not part of `.ci/run`: a module with a few hundred mutants takes tens of minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = Path(sys.executable).with_name("mutmut")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, (int, float)) else json.dumps(value)  # JSON strings and lists are TOML


def with_section(text: str, modules: list[str], tests: list[str]) -> str:
    """``pyproject.toml``'s text with its ``[tool.mutmut]`` section rewritten: the same settings, but
    ``only_mutate`` = ``modules`` and the test selection = ``tests``."""
    match = re.search(r"^\[tool\.mutmut\]\n(?:(?!^\[).*\n?)*", text, flags=re.M)
    if match is None:
        raise ValueError("pyproject.toml has no [tool.mutmut] section to start from")
    cfg = {**tomllib.loads(text)["tool"]["mutmut"], "only_mutate": modules,
           "pytest_add_cli_args_test_selection": tests}
    body = "[tool.mutmut]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in cfg.items()) + "\n"
    return text[:match.start()] + body + text[match.end():]


def scores(results: str) -> dict[str, dict]:
    """Per module: counts of each status and the score (killed over killed + survived + timeout)."""
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for line in results.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if not name or "__mutmut_" not in name:
            continue
        module = re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]
        by_module[module][status] += 1
        if status == "survived":
            survivors[module].append(name)
    out = {}
    for module, c in sorted(by_module.items()):
        reached = c["killed"] + c["survived"] + c["timeout"]
        out[module] = {"counts": dict(c), "score": c["killed"] / reached if reached else None,
                       "survivors": survivors[module]}
    return out


def table(res: dict[str, dict]) -> str:
    lines = ["| module | mutants | killed | survived | no tests | not checked | score |", "|---|---|---|---|---|---|---|"]
    for module, r in res.items():
        c = r["counts"]
        score = "" if r["score"] is None else f"{100 * r['score']:.1f}%"
        lines.append(f"| {module} | {sum(c.values())} | {c.get('killed', 0)} | {c.get('survived', 0)} "
                     f"| {c.get('no tests', 0)} | {c.get('not checked', 0)} | {score} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("patterns", nargs="*", help="mutant name patterns (default: every mutant of the modules)")
    p.add_argument("--modules", default="", help="comma list of files to mutate, e.g. registry/api.py")
    p.add_argument("--tests", default="", help="comma list of test files to run against each mutant")
    p.add_argument("--report-only", action="store_true", help="score the last run, run nothing")
    args = p.parse_args(argv)
    if not args.report_only and not (args.modules and args.tests):
        p.error("--modules and --tests are both needed (or --report-only)")
    pyproject = ROOT / "pyproject.toml"
    original = pyproject.read_text()
    if args.modules:  # mutmut lists only the modules its settings name: the results are read under them too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still puts the file back
        pyproject.write_text(with_section(original, args.modules.split(","), (args.tests or "tests").split(",")))
    try:
        if not args.report_only:
            subprocess.run([str(MUTMUT), "run", *args.patterns], cwd=ROOT, check=False)
        results = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout
    finally:
        pyproject.write_text(original)
    res = scores(results)
    print(json.dumps(res, indent=1))
    print(table(res))
    return res


if __name__ == "__main__":
    main()
