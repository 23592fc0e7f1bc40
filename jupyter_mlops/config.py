"""Settings shared by every face: the kernel side, the CLI and the server extension.

Configuration is traitlets (``c.MlopsConfig.<name>`` in ``jupyter_mlops_config.py`` or
``jupyter_server_config.py`` on the Jupyter config path or in the current folder), overridden by
environment variables, which is what a kernel, a pipeline step or a pod inherits. Nothing here
imports more than the standard library, traitlets and jupyter_core.
"""

from __future__ import annotations

import os
from pathlib import Path

from traitlets import Bool, Float, Integer, Unicode, default
from traitlets.config import Config, Configurable

from .errors import ConfigError

__all__ = ["MlopsConfig", "load_config", "find_project_root", "EMBEDDED_DIR"]

#: The project-local folder that holds embedded state (tracking store, artifacts, spool).
EMBEDDED_DIR = ".mlops"

#: Environment variables that override config, by trait name. MLFLOW_* are MLflow's own names.
ENV_OVERRIDES = {
    "project_root": ("MLOPS_PROJECT_ROOT",),
    "tracking_uri": ("MLOPS_TRACKING_URI", "MLFLOW_TRACKING_URI"),
    "experiment_name": ("MLOPS_EXPERIMENT", "MLFLOW_EXPERIMENT_NAME"),
    "spool_dir": ("MLOPS_SPOOL_DIR",),
    "artifact_root": ("MLOPS_ARTIFACT_ROOT",),
    "pipeline_state_url": ("MLOPS_PIPELINE_STATE_URL",),
    "environments_dir": ("MLOPS_ENVIRONMENTS_DIR",),
    "envs_dir": ("MLOPS_ENVS_DIR",),
    "pkgs_dir": ("MLOPS_PKGS_DIR",),
    "pipeline_webhook_url": ("MLOPS_PIPELINE_WEBHOOK_URL",),
    "kernel_backend": ("MLOPS_KERNEL_BACKEND",),
}

CONFIG_FILE_NAMES = ("jupyter_mlops_config", "jupyter_server_config")

#: URI schemes MLflow's tracking client accepts (database dialects may add a driver: postgresql+psycopg2).
TRACKING_SCHEMES = frozenset({"http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks", "databricks-uc", "uc"})


def find_project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` holding ``.mlops/`` or ``.git``, else ``start``.

    A ``.mlops/`` that holds nothing but ``data/`` does not count: the data layer keeps its index
    there at the root of a DVC project, and a DVC subproject (``dvc init --subdir``, as
    ``examples/iris``) would otherwise become a project of its own after its first versioned
    output, moving the runs, the step cache and the state of every later run somewhere else.
    """
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if _holds_project_state(folder / EMBEDDED_DIR) or (folder / ".git").exists():
            return folder
    return start


def _holds_project_state(embedded: Path) -> bool:
    try:
        names = {entry.name for entry in os.scandir(embedded)}
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:  # there, but unreadable: it still marks the project
        return True
    return names != {"data"}


def _absolute_db_path(uri: str) -> str:
    """``sqlite:///x.db`` and ``file:x`` name paths relative to the caller's folder; the uploader
    runs elsewhere, so they are made absolute where the URI is read."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return Path(uri[len("file:"):]).resolve().as_uri()
    return uri


class MlopsConfig(Configurable):
    """Where runs go and where local state lives."""

    project_root = Unicode(
        "",
        help="Root of the project. Empty: the nearest folder above the working directory that "
        "holds .mlops/ or .git, else the working directory. Env: MLOPS_PROJECT_ROOT.",
    ).tag(config=True)

    tracking_uri = Unicode(
        "",
        help="MLflow tracking URI (http(s)://..., postgresql://..., sqlite:///...). Empty: the "
        "embedded store sqlite:///<project>/.mlops/mlflow.db. Env: MLFLOW_TRACKING_URI.",
    ).tag(config=True)

    artifact_root = Unicode(
        "",
        help="Artifact location for experiments this tool creates. Empty: <project>/.mlops/artifacts "
        "for a database store, the server's own default for an http(s) server.",
    ).tag(config=True)

    experiment_name = Unicode(
        "{project}",
        help="Experiment for runs that name none. Fields: {project} (the project folder's name), "
        "{notebook} (the notebook's file name without .ipynb), {user}. Env: MLFLOW_EXPERIMENT_NAME.",
    ).tag(config=True)

    spool_dir = Unicode(
        "",
        help="Folder of the durable local spool that runs are written to before upload. Empty: "
        "<project>/.mlops/spool. Env: MLOPS_SPOOL_DIR.",
    ).tag(config=True)

    flusher_autostart = Bool(
        True,
        help="Start the background uploader when a run starts or ends. Off: runs stay spooled "
        "until `jupyter mlops sync` (e.g. where a central job uploads).",
    ).tag(config=True)

    flusher_idle_timeout = Float(
        5.0,
        help="Seconds the background uploader lingers with nothing to do before it exits.",
    ).tag(config=True)

    flusher_max_linger = Float(
        900.0,
        help="Seconds the uploader keeps retrying an unreachable server once no kernel is writing; "
        "what it could not upload stays in the spool for `jupyter mlops sync`.",
    ).tag(config=True)

    flusher_python = Unicode(
        help="Python interpreter that runs the uploader (it needs mlflow). Default: this one.",
    ).tag(config=True)

    environments_dir = Unicode(
        "",
        help="Folder of environment definitions (NAME/environment.yml, NAME/conda-lock.yml). Empty: "
        "<project>/environments. Env: MLOPS_ENVIRONMENTS_DIR.",
    ).tag(config=True)

    envs_dir = Unicode(
        "",
        help="Where environments are installed (one prefix per locked environment). Empty: "
        "<jupyter data dir>/mlops/envs. Env: MLOPS_ENVS_DIR.",
    ).tag(config=True)

    pkgs_dir = Unicode(
        "",
        help="Package cache shared by every environment. Empty: <jupyter data dir>/mlops/pkgs. "
        "Env: MLOPS_PKGS_DIR.",
    ).tag(config=True)

    pipeline_state_url = Unicode(
        "",
        help="Database of pipeline runs, step cache and schedules. Empty: sqlite:///<project>/.mlops/"
        "pipelines.db. postgresql://USER@HOST/DB to share it between replicas (needs the postgres "
        "extra). Env: MLOPS_PIPELINE_STATE_URL.",
    ).tag(config=True)

    pipeline_webhook_url = Unicode(
        "",
        help="URL that gets a JSON POST when a pipeline run fails (best effort: a webhook that does "
        "not answer never fails the pipeline). Env: MLOPS_PIPELINE_WEBHOOK_URL.",
    ).tag(config=True)

    pipeline_executor = Unicode(
        "local",
        help="Where pipeline steps run: the name of an executor in the `jupyter_mlops.executors` "
        "entry points (`local`: kernels on this machine).",
    ).tag(config=True)

    kernel_backend = Unicode(
        "local",
        help="Where kernels of environments x profiles run: local (the mlops-local provisioner, "
        "installed prefixes) or kubernetes (mlops-kubernetes, pods of the environments' images). "
        "Kernel spec names are the same on both. Env: MLOPS_KERNEL_BACKEND.",
    ).tag(config=True)

    pipeline_workers = Integer(
        0,
        help="Steps of one pipeline run at once; 0: the pipeline's own `workers:` (default 2).",
    ).tag(config=True)

    pipeline_max_steps = Integer(
        10_000,
        help="Most steps one pipeline run may have, matrix expansions counted. A matrix is easy to "
        "make far larger than intended (three keys of 30 values are 27,000 steps, each a kernel and a "
        "tracked run): a pipeline over the limit is refused at load, saying which step passed it.",
    ).tag(config=True)

    @default("flusher_python")
    def _default_flusher_python(self) -> str:
        import sys

        return sys.executable

    # -- resolved values ------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return Path(self.project_root).resolve() if self.project_root else find_project_root()

    @property
    def embedded_dir(self) -> Path:
        return self.root / EMBEDDED_DIR

    @property
    def resolved_tracking_uri(self) -> str:
        """The tracking URI to record into. Raises :class:`ConfigError` for an unknown scheme."""
        if not self.tracking_uri:
            return "sqlite:///" + str(self.embedded_dir / "mlflow.db")
        scheme = self.tracking_uri.partition(":")[0].split("+")[0].lower()
        if scheme not in TRACKING_SCHEMES:
            raise ConfigError(
                f"tracking URI {self.tracking_uri!r} has an unknown scheme {scheme!r}; use http(s)://HOST:PORT, "
                "sqlite:///PATH, postgresql://..., mysql://... (MLFLOW_TRACKING_URI or c.MlopsConfig.tracking_uri)"
            )
        return _absolute_db_path(self.tracking_uri)

    @property
    def uses_embedded_store(self) -> bool:
        return not self.tracking_uri

    @property
    def resolved_artifact_root(self) -> str | None:
        """Artifact location for new experiments, or None to leave it to the server."""
        if self.artifact_root:
            return self.artifact_root
        if self.resolved_tracking_uri.startswith(("http://", "https://", "databricks")):
            return None
        return (self.embedded_dir / "artifacts").as_uri()

    @property
    def resolved_spool_dir(self) -> Path:
        return Path(self.spool_dir).resolve() if self.spool_dir else self.embedded_dir / "spool"

    @property
    def resolved_environments_dir(self) -> Path:
        return Path(self.environments_dir).resolve() if self.environments_dir else self.root / "environments"

    @property
    def resolved_envs_dir(self) -> Path:
        return Path(self.envs_dir).resolve() if self.envs_dir else _data_dir() / "envs"

    @property
    def resolved_pkgs_dir(self) -> Path:
        return Path(self.pkgs_dir).resolve() if self.pkgs_dir else _data_dir() / "pkgs"

    @property
    def resolved_pipeline_state_url(self) -> str:
        if not self.pipeline_state_url:
            return "sqlite:///" + str(self.embedded_dir / "pipelines.db")
        return _absolute_db_path(self.pipeline_state_url)

    def experiment_for(self, notebook: str | None) -> str:
        import getpass

        stem = Path(notebook).stem if notebook else "notebook"
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        try:
            return self.experiment_name.format(project=self.root.name, notebook=stem, user=user)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"experiment_name {self.experiment_name!r} has an unknown field ({e}); "
                "use {project}, {notebook} or {user}"
            ) from e


def _data_dir() -> Path:
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "mlops"


def _config_files(dirs: list[str]) -> Config:
    from traitlets.config.loader import JSONFileConfigLoader, PyFileConfigLoader

    merged = Config()
    for folder in dirs:
        for name in CONFIG_FILE_NAMES:
            for ext, loader_cls in ((".json", JSONFileConfigLoader), (".py", PyFileConfigLoader)):
                path = Path(folder) / (name + ext)
                if not path.is_file():
                    continue
                try:
                    merged.merge(loader_cls(path.name, path=str(path.parent)).load_config())
                except Exception as e:  # a user's config file: any error is theirs to see
                    raise ConfigError(f"cannot load config: {e}", source=str(path)) from e
    return merged


def load_config(config: Config | None = None, *, read_files: bool = True, folder: Path | None = None,
                **overrides: object) -> MlopsConfig:
    """Build the effective settings: files < environment < ``config`` < ``overrides``.

    ``folder``: where the work is (a pipeline file's folder), in place of the working directory:
    its config file is read, and the project is the one holding it unless configured otherwise.
    Raises :class:`ConfigError` when a config file cannot be loaded.
    """
    merged = Config()
    if read_files:
        from jupyter_core.paths import jupyter_config_path

        # Lowest priority first: system paths come last in jupyter_config_path().
        merged.merge(_config_files([*reversed(jupyter_config_path()), str(folder or os.getcwd())]))
    env_values = {}
    for trait, names in ENV_OVERRIDES.items():
        for name in names:
            if os.environ.get(name):
                env_values[trait] = os.environ[name]
                break
    merged.merge(Config({"MlopsConfig": env_values}))
    if config is not None:
        merged.merge(config)
    if overrides:
        merged.merge(Config({"MlopsConfig": overrides}))
    settings = MlopsConfig(config=merged)
    if folder is not None and not settings.project_root:
        settings.project_root = str(find_project_root(Path(folder)))
    return settings
