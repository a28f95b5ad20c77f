"""Every tutorial notebook executes end to end in quick mode (KC_QUICK=1)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = sorted(
    (pathlib.Path(__file__).parent.parent / "tutorials").glob("*.ipynb")
)


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_in_quick_mode(path, monkeypatch, tmp_path):
    monkeypatch.setenv("KC_QUICK", "1")
    monkeypatch.setenv("KERAS_CSGD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KC_CIFAR_DIR", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    errors = [
        o for c in nb.cells for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
