"""Environment definitions: environments/NAME/environment.yml, checked with file:line errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from jupyter_mlops.cli import main as cli
from jupyter_mlops.environments.spec import current_platform, find_environments, load_environment
from jupyter_mlops.errors import EnvironmentSpecError

ROOT = Path(__file__).parent.parent


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "environment.yml").write_text(textwrap.dedent(text))
    return folder


def test_a_full_definition(tmp_path: Path) -> None:
    folder = write(tmp_path / "cpu", """\
        name: cpu
        channels: [conda-forge, bioconda]
        platforms: [linux-64, osx-arm64]
        dependencies:
          - python=3.11
          - scikit-learn >=1.5
          - pip
          - pip:
              - requests==2.32.0
        image: ghcr.io/org/cpu:1
        variables: {OMP_NUM_THREADS: 2}
    """)
    spec = load_environment(folder)
    assert spec.channels == ["conda-forge", "bioconda"] and spec.platforms == ["linux-64", "osx-arm64"]
    assert spec.dependencies == ["python=3.11", "scikit-learn >=1.5", "pip"] and spec.pip == ["requests==2.32.0"]
    assert spec.image == "ghcr.io/org/cpu:1" and spec.variables == {"OMP_NUM_THREADS": "2"}
    assert not spec.locked


def test_platforms_default_to_this_machine(tmp_path: Path) -> None:
    spec = load_environment(write(tmp_path / "e", "channels: conda-forge\ndependencies: [python]\n"))
    assert spec.platforms == [current_platform()] and current_platform().startswith(("linux-", "osx-", "win-"))


@pytest.mark.parametrize(("text", "where", "says"), [
    ("channels: [c]\ndependencies: [python\n", 3, "not valid YAML"),
    ("channels: [c]\ndependencies: [python]\nchanels: [x]\n", 3, "unknown key 'chanels'; did you mean 'channels'?"),
    ("dependencies: [python]\n", None, "no `channels:`"),
    ("channels: []\ndependencies: [python]\n", 1, "`channels:` is empty"),
    ("channels: [c]\n", 1, "no `dependencies:`"),
    ("channels: [c]\nplatforms: [linux-128]\ndependencies: [python]\n", 2, "unknown platform 'linux-128'"),
    ("channels: [c]\ndependencies:\n  - python\n  - '>=3.11'\n", 4, "'>=3.11' is not a conda package spec"),
    ("channels: [c]\ndependencies:\n  - python\n  - pip:\n      - requests\n", 3, "needs `pip` among the conda dependencies"),
    ("channels: [c]\ndependencies:\n  - python\n  - pop: [x]\n", 4, "unknown key 'pop'"),
    ("name: other\nchannels: [c]\ndependencies: [python]\n", 1, "differs from the folder's name 'env'"),
    ("channels: [c]\ndependencies: [python]\nimage: [a]\n", 3, "image must be text"),
    ("", None, "the file is empty"),
])
def test_each_mistake_names_the_line_and_the_fix(tmp_path: Path, text: str, where: int | None, says: str) -> None:
    folder = tmp_path / "env"
    folder.mkdir()
    (folder / "environment.yml").write_text(text)
    with pytest.raises(EnvironmentSpecError) as raised:
        load_environment(folder)
    assert raised.value.line == where
    assert says in str(raised.value)
    assert str(raised.value).startswith(f"{folder / 'environment.yml'}{':' + str(where) if where else ''}: ")


def test_a_folder_name_that_cannot_become_a_kernel_name(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentSpecError, match="use lowercase letters"):
        load_environment(write(tmp_path / "My Env", "channels: [c]\ndependencies: [python]\n"))
    with pytest.raises(EnvironmentSpecError, match="no environment.yml"):
        load_environment(tmp_path / "missing")


def test_the_shipped_environments_are_valid() -> None:
    found = find_environments(ROOT / "environments")
    assert {"cpu", "pytorch-gpu"} <= set(found)
    for folder in found.values():
        spec = load_environment(folder)
        assert "conda-forge" in spec.channels and any(d.startswith("ipykernel") for d in spec.dependencies)


def test_cli_list_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLOPS_ENVIRONMENTS_DIR", str(tmp_path))
    write(tmp_path / "good", "channels: [conda-forge]\nplatforms: [linux-64]\ndependencies: [python=3.11]\nimage: img:1\n")
    write(tmp_path / "bad", "channels: [conda-forge]\n")
    assert cli(["env", "list"]) == 1  # one broken definition: listed with its error, status 1
    out = capsys.readouterr().out
    assert "good" in out and "linux-64" in out and "img:1" in out
    assert "bad" in out and "no `dependencies:`" in out
    assert cli(["env", "show", "good", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dependencies"] == ["python=3.11"]
    assert cli(["env", "show", "nope"]) == 1
    assert "no environment 'nope'" in capsys.readouterr().err
