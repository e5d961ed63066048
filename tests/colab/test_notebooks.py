"""Every notebook in colab/ executes top to bottom at tiny size (cells tagged
`colab-install`, which set up a fresh Colab runtime, are skipped) and prints what its
metadata's `llmjax_test.expect` lists."""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  # The kernel inherits the environment: a tiny run, and TFDS data in a temp dir.
  monkeypatch.setenv("LLMJAX_NOTEBOOK_STEPS", "4")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  nb = nbformat.read(path, as_version=4)
  assert "colab-install" in nb.cells[1].metadata.get("tags", []), "open with an install cell"
  nb.cells = [c for c in nb.cells if "colab-install" not in c.metadata.get("tags", [])]
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  expected = nb.metadata["llmjax_test"]["expect"]
  assert expected and all(text in outputs for text in expected), (expected, outputs[-2000:])
