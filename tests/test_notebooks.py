"""The notebooks in ``notebooks/`` run, cell by cell, against a small finished run the suite makes (a fresh checkout has
no ``runs/demo``), and a failing cell fails the test; the committed notebooks carry no outputs and nothing specific to
the machine they were written on.

Each notebook runs in its own IPython kernel through nbclient. The kernel talks to the test over ZeroMQ's ``ipc``
transport (Unix domain sockets in the test's temporary folder): the suite's socket guard (pytest-socket,
``--disable-socket --allow-unix-socket``) blocks TCP, which jupyter_client uses by default.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import nbformat
import pytest
from fixtures_small_run import small_run  # noqa: F401  (the session fixture the notebooks read)
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from gestalt_xai.runs import Run

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
#: notebook metadata a notebook may carry: the kernel's name and the language, nothing from the writer's machine
ALLOWED_METADATA = {"kernelspec": {"display_name", "language", "name"}, "language_info": {"name"}}
#: the kernel the notebooks run in: this interpreter (its spec is written into the test's folder)
KERNEL = "gestalt-xai-tests"
#: seconds one cell may take on a busy two-core machine
CELL_TIMEOUT = 300


def _strip_module():
    spec = importlib.util.spec_from_file_location("notebook_strip", FOLDER / "strip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def execute(path: Path, run_dir: Path, workdir: Path) -> nbformat.NotebookNode:
    """Run every cell of the notebook ``path`` against ``run_dir`` in a fresh kernel (cwd: the notebook's folder, as
    Jupyter does); raise :class:`CellExecutionError` at the first cell that raises. Returns the executed notebook."""
    nb = nbformat.read(path, as_version=4)
    # a kernel spec of this interpreter only: no kernel a user or another environment installed is picked up
    write_kernel_spec(workdir / "kernels" / KERNEL)
    km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[
        str(workdir / "kernels")]), transport="ipc", connection_file=str(workdir / "kernel.json"))
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    # the kernel imports this checkout's package (as an editable install does) and reads the test's run
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    client.execute(env={**os.environ, "GESTALT_XAI_RUN": str(run_dir), "PYTHONPATH": pythonpath})
    return nb


def _outputs(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.get("output_type") in ("display_data", "execute_result") and mime in o.get("data", {})]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def test_the_walkthroughs_are_there_and_the_readme_lists_every_notebook() -> None:
    names = [p.name for p in NOTEBOOKS]
    assert {"01_quick_tour.ipynb", "02_attribution_methods.ipynb", "03_eye_tracking.ipynb"} <= set(names)
    readme = (FOLDER / "README.md").read_text(encoding="utf-8")
    assert [name for name in names if f"`{name}`" not in readme] == []


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_against_a_small_run(path: Path, small_run: Run, tmp_path) -> None:  # noqa: F811
    before = _snapshot(small_run.path)
    nb = execute(path, small_run.path, tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "every code cell ran"
    assert _outputs(nb, "image/png"), "each walkthrough draws at least one figure"
    assert _snapshot(small_run.path) == before, "a notebook reads the run and never writes into it"
    # stripping the executed notebook gives back the committed file: it was committed stripped, and strip.py is how
    text = nbformat.writes(_strip_module().strip(copy.deepcopy(nb)))
    assert text.rstrip("\n") == path.read_text(encoding="utf-8").rstrip("\n")
    if path.name == "03_eye_tracking.ipynb":  # the small run's study is simulated: the notebook must say so
        shown = " ".join(_outputs(nb, "text/markdown") + [o.get("text", "") for c in code for o in c.outputs])
        assert "SIMULATED" in shown


def test_a_failing_cell_fails_the_run(small_run: Run, tmp_path) -> None:  # noqa: F811
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('cell failed')"),
                nbformat.v4.new_code_cell("y = 2")]
    path = tmp_path / "failing.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(CellExecutionError, match="cell failed"):
        execute(path, small_run.path, tmp_path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_stripped_and_machine_neutral(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        assert not cell.get("metadata"), f"cell {cell.get('id')}: metadata {dict(cell.metadata)}"
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.get('id')} has outputs"
    assert set(nb.metadata) <= set(ALLOWED_METADATA), f"notebook metadata {sorted(nb.metadata)}"
    for key, allowed in ALLOWED_METADATA.items():
        assert set(nb.metadata.get(key, {})) <= allowed, f"{key}: {dict(nb.metadata[key])}"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for machine in ("/home/", "/work/", "/tmp/", "/Users/", "C:\\\\", str(ROOT)):
        assert machine not in text, f"{path.name} names a path of the machine it was written on: {machine}"
    ids = [c["id"] for c in json.loads(text)["cells"]]
    assert len(set(ids)) == len(ids)
