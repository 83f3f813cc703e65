"""docs/walkthrough.ipynb is executed on every test run, so its pictures and the asserts beside them follow
the code as it is today: a stage that changes shape, name or behaviour breaks this test, not the reader."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "walkthrough.ipynb"


def draws(cell):
    """Does this code cell make a picture (a pyplot figure, or the Figure explain --plot draws)?"""
    return "plt.subplots(" in cell.source or "explain.token_figure(" in cell.source


def test_walkthrough_is_stored_without_outputs():
    """The pictures come from executing it; stored outputs would go stale and bloat every diff."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and not any(c.outputs or c.execution_count for c in code)


def test_walkthrough_executes_and_draws_every_picture():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a failing cell (an assert the text relies on, a renamed tensor) raises CellExecutionError here
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()
    pictures = [c for c in nb.cells if c.cell_type == "code" and draws(c)]
    assert len(pictures) == 8
    for cell in pictures:
        pngs = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(pngs) == 1, cell.source[:80]
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## ")]
    assert [h.split()[1] for h in headings[:7]] == ["0.", "1.", "2.", "3.", "4.", "5.", "6."]
