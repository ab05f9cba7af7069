"""examples/walkthrough.ipynb: valid nbformat 4, in sync with its generator, and it runs.

The code cells run in order with plain ``exec`` in one namespace (Jupyter is not a dependency);
after the cell tagged "parameters" the test shrinks the run, as papermill would."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "walkthrough.ipynb")
GENERATOR = os.path.join(ROOT, "examples", "make_walkthrough.py")
SMALL = 'DEVICE = "cpu"\nLIMIT = 24\nINPUT_SIZE = 72\nEPOCHS = 1\nBATCH_SIZE = 8\nBACKEND = "torch"\n'


def _load():
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)


def test_notebook_is_valid_nbformat_4():
    nb = _load()
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            compile("".join(cell["source"]), cell["id"], "exec")
    tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1


def test_notebook_matches_its_generator():
    spec = importlib.util.spec_from_file_location("make_walkthrough", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(NOTEBOOK, encoding="utf-8") as f:
        assert f.read() == module.render(), (
            "run `python examples/make_walkthrough.py` to regenerate the notebook"
        )


def test_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    cells = [c for c in _load()["cells"] if c["cell_type"] == "code"]
    for cell in cells:
        try:
            exec(compile("".join(cell["source"]), f"walkthrough {cell['id']}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"notebook cell {cell['id']} failed: {type(e).__name__}: {e}")
        if "parameters" in cell["metadata"].get("tags", []):
            exec(SMALL, namespace)
    assert len(namespace["result"].history) == 1
    assert namespace["metrics"]["images"] == 24
    assert namespace["embeddings"].shape == (24, 9216)
