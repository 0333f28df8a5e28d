"""experiments/quickstart.ipynb runs from top to bottom in a fresh kernel, so the seed-style example never rots."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient
import pytest

pytestmark = pytest.mark.slow  # see setup.cfg's markers

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.ipynb"


def test_quickstart_notebook_executes_and_shows_the_report(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:  # what is committed is not what is checked
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    tables = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(tables) == 2 and tables[0].startswith("`lesions.csv` (4 rows)")
    session_rows = [line for line in tables[0].splitlines() if re.match(r"\| sub-0[12] \| ses-[12] \|", line)]
    assert len(session_rows) == 4 and all("| ok |" in row for row in session_rows)
    assert tables[1].startswith("`lesion_table.csv`")
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 2 and all(len(p.data["image/png"]) > 1000 for p in pictures)
