"""The notebooks: each `.ipynb` holds the cells of its paired `.py`, carries no outputs, and runs
top to bottom in quick mode (`TRANSFORMER_NOTEBOOK_QUICK=1`) in a fresh Jupyter kernel."""

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = sorted(
    {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py")}
    | {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}
)
# Notebooks that set up their own simulated devices before importing JAX; the others get one
# CPU device instead of the 8 that conftest.py gives this process (faster on a small machine).
OWN_DEVICES = ("05_scaling_out",)
# Notebooks that need optional extras: skipped (with the reason) without them.
EXTRAS = {"07_finetune": {"lm_eval": "eval", "safetensors": "hf"}}


def test_there_are_notebooks():
    assert NAMES, f"no notebooks found in {NOTEBOOKS}"


def cell_sources(notebook):
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_and_py_hold_the_same_cells(name):
    import jupytext  # in the dev and notebooks extras

    py_path, ipynb_path = NOTEBOOKS / f"{name}.py", NOTEBOOKS / f"{name}.ipynb"
    missing = [p.name for p in (py_path, ipynb_path) if not p.exists()]
    assert not missing, f"{name} lacks {missing}; run `jupytext --sync notebooks/{name}.*`"
    py, ipynb = jupytext.read(py_path), jupytext.read(ipynb_path)
    assert cell_sources(py) == cell_sources(ipynb), (
        f"{name}.ipynb and {name}.py differ; run `jupytext --sync notebooks/{name}.ipynb` "
        "(the newer file wins)"
    )
    with_outputs = [
        i
        for i, cell in enumerate(ipynb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not with_outputs, (
        f"{name}.ipynb is committed with outputs in cells {with_outputs}; clear them with "
        f"`jupyter nbconvert --clear-output --inplace notebooks/{name}.ipynb`"
    )


# The default suite runs the first notebook; `pytest -m slow` runs the others.
QUICK_BY_DEFAULT = ("01_tokens_and_embeddings",)


@pytest.mark.parametrize(
    "name",
    [n if n in QUICK_BY_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in NAMES],
)
def test_notebook_runs_in_quick_mode(name, monkeypatch, tmp_path):
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    for module, extra in EXTRAS.get(name, {}).items():
        pytest.importorskip(module, reason=f"{name} needs the {extra} extra")

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail(
            "no Jupyter kernel named 'python3': install ipykernel (`pip install -e .[dev]`) "
            "or register one with `python -m ipykernel install --user`"
        )
    # The kernel inherits this environment.
    monkeypatch.setenv("TRANSFORMER_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary workdirs land here
    if name not in OWN_DEVICES:
        monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,  # per cell
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # run from notebooks/, as Jupyter does
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors
