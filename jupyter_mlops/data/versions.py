"""What a data version is, as recorded on a run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DataVersion"]


@dataclass(frozen=True)
class DataVersion:
    """One version of a file or folder, as DVC identifies it.

    ``md5`` is DVC's: the file's md5, or for a folder the md5 of its ``.dir`` manifest (DVC writes
    it with a ``.dir`` suffix). ``rev`` is the git commit whose ``.dvc`` file holds this version,
    None while that ``.dvc`` content is not committed. ``modified``: the bytes read differ from the
    version the ``.dvc`` file records (they were changed and not added again).
    """

    path: str  # repository-relative, POSIX
    md5: str
    size: int
    nfiles: int
    kind: str  # "file" or "dir"
    rev: str | None = None
    modified: bool = False
    snapshot: str | None = None  # stat snapshot when recorded (see index.py): detects later changes

    @property
    def digest(self) -> str:
        """The md5 without DVC's ``.dir`` suffix (fits MLflow's 36-character dataset digest)."""
        return self.md5.removesuffix(".dir")

    @property
    def short(self) -> str:
        return f"{self.path}@{self.digest[:8]}" + ("+modified" if self.modified else "")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DataVersion":
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)
