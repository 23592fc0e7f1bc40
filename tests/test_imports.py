"""Fast imports: the package, %load_ext + %mlops track and `--help` pull in nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import Project, cell_text, execute_notebook, make_notebook

HEAVY = ["mlflow", "dvc", "papermill", "kubernetes", "kubernetes_asyncio", "pandas", "sklearn", "sqlalchemy"]


def loaded_heavy(code: str) -> list[str]:
    probe = code + f"\nimport sys, json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_is_light() -> None:
    assert loaded_heavy("import jupyter_mlops, jupyter_mlops.tracking, jupyter_mlops.config, jupyter_mlops.magics") == []


def test_cli_help_is_light() -> None:
    code = "from jupyter_mlops.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert loaded_heavy(code) == []
    done = subprocess.run(["jupyter", "mlops", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "sync" in done.stdout


def test_load_ext_and_track_in_a_kernel_are_light(mlops_project: Project) -> None:
    nb = make_notebook(mlops_project.root / "light.ipynb", [
        "%load_ext jupyter_mlops\n%mlops track --experiment light\n%mlops log x=1",
        f"import sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))",
        "%mlops end",
    ])
    assert cell_text(execute_notebook(nb), 1).strip() == "[]"
