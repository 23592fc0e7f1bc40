from __future__ import annotations

from pathlib import Path

import pytest

from jupyter_mlops.config import find_project_root, load_config
from jupyter_mlops.errors import ConfigError


def test_embedded_defaults_live_under_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLOPS_SPOOL_DIR", raising=False)
    config = load_config(read_files=False, project_root=str(tmp_path))
    assert config.uses_embedded_store
    assert config.resolved_tracking_uri == f"sqlite:///{tmp_path}/.mlops/mlflow.db"
    assert config.resolved_artifact_root == (tmp_path / ".mlops" / "artifacts").as_uri()
    assert config.resolved_spool_dir == tmp_path / ".mlops" / "spool"
    assert config.experiment_for(None) == tmp_path.name


def test_project_root_is_the_nearest_git_or_mlops_folder(tmp_path: Path) -> None:
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    deep = tmp_path / "repo" / "a" / "b"
    deep.mkdir(parents=True)
    assert find_project_root(deep) == (tmp_path / "repo").resolve()
    (tmp_path / "repo" / "a" / ".mlops" / "data").mkdir(parents=True)  # a DVC subproject's data index only
    assert find_project_root(deep) == (tmp_path / "repo").resolve()
    (tmp_path / "repo" / "a" / ".mlops" / "spool").mkdir()  # a project's own state
    assert find_project_root(deep) == (tmp_path / "repo" / "a").resolve()


def test_files_then_environment_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "jupyter_mlops_config.py").write_text(
        "c.MlopsConfig.tracking_uri = 'http://from-file:5000'\n"
        "c.MlopsConfig.experiment_name = '{project}-{notebook}'\n"
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLOPS_TRACKING_URI", raising=False)
    assert load_config().tracking_uri == "http://from-file:5000"
    assert load_config().experiment_for("/x/train.ipynb").endswith("-train")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert load_config().tracking_uri == "http://from-env:5000"
    assert load_config(tracking_uri="http://from-arg:5000").tracking_uri == "http://from-arg:5000"
    assert load_config().resolved_artifact_root is None  # an http server keeps its own default


def test_a_broken_config_file_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "cfg"))
    (tmp_path / "jupyter_mlops_config.py").write_text("c.MlopsConfig.tracking_uri = (\n")
    with pytest.raises(ConfigError, match="jupyter_mlops_config.py"):
        load_config()


def test_unknown_experiment_field_says_which_fields_exist(tmp_path: Path) -> None:
    config = load_config(read_files=False, project_root=str(tmp_path), experiment_name="{team}")
    with pytest.raises(ConfigError, match=r"\{project\}, \{notebook\} or \{user\}"):
        config.experiment_for(None)


def test_a_tracking_uri_with_an_unknown_scheme_is_refused_at_once(tmp_path: Path) -> None:
    config = load_config(read_files=False, project_root=str(tmp_path), tracking_uri="htp://127.0.0.1:5000")
    with pytest.raises(ConfigError, match="unknown scheme 'htp'"):
        config.resolved_tracking_uri
    ok = load_config(read_files=False, project_root=str(tmp_path), tracking_uri="postgresql+psycopg2://u@h/db")
    assert ok.resolved_tracking_uri.startswith("postgresql+psycopg2")


def test_a_relative_sqlite_uri_is_anchored_where_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(read_files=False, project_root=str(tmp_path), tracking_uri="sqlite:///mlflow.db")
    assert config.resolved_tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    absolute = load_config(read_files=False, tracking_uri="sqlite:////srv/m.db")
    assert absolute.resolved_tracking_uri == "sqlite:////srv/m.db"
