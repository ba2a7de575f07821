"""The README's quick start must run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(section: str) -> str:
    return re.search(r"```python\n(.*?)```", README.read_text().split(section, 1)[1], re.S).group(1)


def test_quick_start_and_registry_snippets_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_block("## Quick start (library)"), "README quick start", "exec"), namespace)
    exec(compile(_block("## Task registry"), "README registry", "exec"), namespace)
    assert namespace["reg"].task_names() == ["pets"]
    assert (tmp_path / "continual-mem.db").exists()
    out = capsys.readouterr().out
    assert "'original': (8, 10)" in out and "'pets': (8, 37)" in out and "'flowers': (8, 102)" in out
    assert "x the backbone's FLOPs" in out
