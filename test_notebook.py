"""The tour notebook runs from top to bottom: every cell of `phoenix_tour.ipynb` is executed in a
fresh kernel, and the test fails on the first cell that raises, or if the tour leaves files
behind in the temporary folder."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).with_name("phoenix_tour.ipynb")
CELL_TIMEOUT = 600  # seconds


def test_every_cell_of_the_tour_runs(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the kernel's temporary folder
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError naming the cell and its traceback
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the mask picture is missing"
    assert not list(scratch.iterdir()), "the tour left files in the temporary folder"
