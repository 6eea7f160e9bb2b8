"""Strip notebooks for committing: no outputs, no execution counts, no cell metadata, and notebook metadata reduced to
the kernel's name and the language (Jupyter adds the Python version and editor settings of the machine it ran on).

Usage: python notebooks/strip.py [NOTEBOOK ...]   (default: every notebook beside this file; rewrites in place)
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

#: what a committed notebook's metadata may hold
KEEP = {"kernelspec": ("display_name", "language", "name"), "language_info": ("name",)}


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` without outputs, execution counts, cell metadata and machine-specific notebook metadata (in place)."""
    for cell in nb.cells:
        cell.metadata = nbformat.NotebookNode()
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata = nbformat.NotebookNode({key: {k: nb.metadata[key][k] for k in keep if k in nb.metadata[key]}
                                         for key, keep in KEEP.items() if key in nb.metadata})
    return nb


def main(paths: list[str]) -> int:
    for path in [Path(p) for p in paths] or sorted(Path(__file__).parent.glob("*.ipynb")):
        nb = strip(nbformat.read(path, as_version=4))
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
