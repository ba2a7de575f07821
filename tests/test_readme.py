"""The README's Python snippets must run as written, in order, in one namespace."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_snippets_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README python block {i}", "exec"), namespace)
    assert namespace["reg"].task_names() == ["pets"]
    assert (tmp_path / "continual-mem.db").exists()
    out = capsys.readouterr().out
    assert "'original': (8, 10)" in out and "'pets': (8, 37)" in out and "'flowers': (8, 102)" in out
    assert "x the backbone's FLOPs" in out
