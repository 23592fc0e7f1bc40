"""``conda-lock.yml``: the exact packages of an environment, per platform, in conda-lock's v1 format.

We write and read conda-lock's own format (so the conda-lock tool, micromamba and people can read
ours, and we can read theirs), not py-rattler's lock format. A v1 entry has the package's name,
version, platform, dependencies, URL and hashes; the build string and subdir follow from the URL
(``.../SUBDIR/NAME-VERSION-BUILD.conda``). What a v1 entry lacks (noarch kind, build number) py-rattler's
installer reads from the package itself, so installing from these records links exactly what a
solve would (checked in tests with a ``noarch: python`` package).

A ``pip:`` section is locked as conda-lock locks it: ``manager: pip`` entries (name, version, the
wheel's URL and its sha256, the dependencies that apply on that platform) next to the conda ones
of the same platform; see :mod:`.pip`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import EnvironmentSpecError

if TYPE_CHECKING:
    from .spec import EnvironmentSpec

__all__ = ["LockedPackage", "LockedPipPackage", "write_lock", "read_lock", "read_pip_lock", "content_hash"]

ARCHIVE_SUFFIXES = (".conda", ".tar.bz2")


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    build: str
    subdir: str
    platform: str
    url: str
    md5: str
    sha256: str | None
    dependencies: tuple[str, ...]  # match specs: "python >=3.8"
    manager: str = "conda"

    @property
    def channel(self) -> str:
        return self.url.rsplit("/", 2)[0]

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[1]

    def to_record(self) -> Any:
        """The py-rattler RepoDataRecord to install this package from."""
        import rattler

        package = rattler.PackageRecord(
            self.name, self.version, rattler.BuildString(self.build), 0, self.subdir, depends=list(self.dependencies),
            md5=bytes.fromhex(self.md5), sha256=bytes.fromhex(self.sha256) if self.sha256 else None,
        )
        return rattler.RepoDataRecord(package, self.file_name, self.url, self.channel)


@dataclass(frozen=True)
class LockedPipPackage:
    """A wheel of a ``pip:`` section, pinned for one platform."""

    name: str  # PEP 503 normalized
    version: str
    platform: str
    url: str
    sha256: str
    dependencies: tuple[tuple[str, str], ...] = ()  # (name, specifier or "*"), what applies on platform

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[1]


def content_hash(spec: EnvironmentSpec, platform: str) -> str:
    """What the lock was made from: changes when environment.yml's content does."""
    return hashlib.sha256(spec.file.read_bytes() + b"\0" + platform.encode()).hexdigest()


def _split_spec(spec: str) -> tuple[str, str]:
    name, _, rest = spec.strip().partition(" ")
    return name, rest.strip() or "*"


def write_lock(spec: EnvironmentSpec, records: Mapping[str, Sequence[Any]], path: Path | None = None,
               pip: Mapping[str, Sequence[LockedPipPackage]] | None = None) -> Path:
    """Write ``records`` (py-rattler RepoDataRecords per platform, from a solve) as conda-lock v1,
    each platform's ``pip`` packages after its conda ones."""
    import yaml

    path = path or spec.lock_file
    packages = []
    pip = pip or {}
    for platform in sorted(records):
        for record in sorted(records[platform], key=lambda r: r.name.normalized):
            depends = dict(_split_spec(d) for d in record.depends)
            entry: dict[str, Any] = {
                "name": record.name.normalized, "version": str(record.version), "manager": "conda",
                "platform": platform, "dependencies": depends, "url": record.url,
                "hash": {"md5": _hex(record.md5), **({"sha256": _hex(record.sha256)} if record.sha256 else {})},
                "category": "main", "optional": False,
            }
            packages.append(entry)
        for wheel in sorted(pip.get(platform, ()), key=lambda w: w.name):
            packages.append({
                "name": wheel.name, "version": wheel.version, "manager": "pip", "platform": platform,
                "dependencies": dict(wheel.dependencies), "url": wheel.url, "hash": {"sha256": wheel.sha256},
                "category": "main", "optional": False,
            })
    document = {
        "version": 1,
        "metadata": {
            "content_hash": {p: content_hash(spec, p) for p in sorted(records)},
            "channels": [{"url": c, "used_env_vars": []} for c in spec.channels],
            "platforms": sorted(records),
            "sources": [spec.file.name],
        },
        "package": packages,
    }
    text = ("# Written by `jupyter mlops env lock` from environment.yml; do not edit by hand.\n"
            + yaml.safe_dump(document, sort_keys=False, default_flow_style=False))
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)  # never half a lock file
    return path


def _hex(value: Any) -> str:
    return value.hex() if isinstance(value, (bytes, bytearray)) else str(value)


def _entries(path: Path, platform: str) -> list[dict[str, Any]]:
    """The entries of ``platform`` in the lock at ``path``, both managers; errors name the file."""
    import yaml

    shown = str(path)
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise EnvironmentSpecError(shown, None, "no lock file; run `jupyter mlops env lock` where the channels "
                                   "are reachable") from None
    except yaml.YAMLError as e:
        raise EnvironmentSpecError(shown, None, f"not valid YAML ({e}); write it again with env lock") from e
    if not isinstance(document, dict) or document.get("version") != 1 or "package" not in document:
        raise EnvironmentSpecError(shown, None, "not a conda-lock v1 file (version: 1, metadata, package)")
    platforms = document.get("metadata", {}).get("platforms", [])
    if platform not in platforms:
        raise EnvironmentSpecError(shown, None, f"platform {platform} is not locked (locked: "
                                   f"{', '.join(platforms) or 'none'}); add it to `platforms:` and lock again")
    return [e for e in document["package"] if isinstance(e, dict) and e.get("platform") == platform]


def read_lock(path: Path, platform: str) -> list[LockedPackage]:
    """The conda packages locked for ``platform``. Raises :class:`EnvironmentSpecError` naming
    the file and what is wrong (not a v1 lock, the platform not locked, an entry without hash)."""
    found = []
    for entry in _entries(path, platform):
        if entry.get("manager", "conda") != "conda":
            continue
        url = str(entry.get("url", ""))
        digest = entry.get("hash") or {}
        if not url.endswith(ARCHIVE_SUFFIXES) or "md5" not in digest:
            raise EnvironmentSpecError(str(path), None, f"package {entry.get('name')!r} has no archive URL or md5; "
                                       "the lock is damaged: lock again")
        stem = url.rsplit("/", 1)[1]
        stem = stem[: -len(next(s for s in ARCHIVE_SUFFIXES if stem.endswith(s)))]
        name, version, build = stem.rsplit("-", 2)
        depends = tuple(f"{n} {s}".strip() if s and s != "*" else n
                        for n, s in (entry.get("dependencies") or {}).items())
        found.append(LockedPackage(name, version, build, url.rsplit("/", 2)[1], platform, url,
                                   str(digest["md5"]), digest.get("sha256"), depends))
    return found


def read_pip_lock(path: Path, platform: str) -> list[LockedPipPackage]:
    """The ``manager: pip`` packages locked for ``platform`` (none for a lock without a pip
    section). Raises :class:`EnvironmentSpecError` as :func:`read_lock` does, and for a pip entry
    without a URL or a sha256 (installing it could not be exact)."""
    found = []
    for entry in _entries(path, platform):
        if entry.get("manager") != "pip":
            continue
        url = str(entry.get("url") or "")
        sha256 = str((entry.get("hash") or {}).get("sha256") or "")
        if "/" not in url or len(sha256) != 64:
            raise EnvironmentSpecError(str(path), None, f"pip package {entry.get('name')!r} has no URL or sha256; "
                                       "the lock is damaged (or was written without hashes): lock again")
        depends = tuple((str(n), str(s)) for n, s in (entry.get("dependencies") or {}).items())
        found.append(LockedPipPackage(str(entry["name"]), str(entry["version"]), platform, url, sha256, depends))
    return found
