"""Data benchmark: what versioning data with `jupyter_mlops.data` costs next to the DVC CLI.

    python bench/data.py [--quick]

Measures, each against what a user would do without us (the anchor), interleaved, medians:

1. versioning a fresh file of random bytes (1 GiB; 256 MiB with ``--quick``): ``data.add(name)``
   in-process vs ``dvc add -q NAME`` as a user runs it (a subprocess, its start-up included),
   with two ceilings: ``hashlib.md5`` over the same file in 4 MiB reads (page cache warm) and
   (default run only) ``shutil.copyfile`` of a fresh file into the cache folder (an add hashes
   and copies);
2. the unchanged check of a versioned, committed folder of 10,000 small files:
   ``data.version("files")`` (and ``data.use("files")``, no run active) vs ``dvc status files.dvc``;
3. re-adding that unchanged folder: ``data.add("files")`` vs ``dvc add -q files``.

Everything lives in one temporary folder (the git + DVC project made by
``jupyter_mlops.data.project.init_project``, DVC's site cache and config folders), removed at
the end. The last line of stdout is one JSON object (see bench/README.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# No root handler: DVC logs through its own (set up when dvc is imported), and a root one would
# print each of its hints twice. Python's last-resort handler still shows warnings on stderr.
warnings.filterwarnings("ignore")

from _common import Logger, fmt, goal_met, interleave, median, quick_mode, scratch, stdout_to_stderr, ratio  # noqa: E402

log = Logger('data')

GOALS = {
    "add_mb_per_s": ">=500",
    "unchanged_check_s": "<=0.1",
    "vs_dvc_status": ">=9",
}

MB = 1_000_000  # MB/s figures are in 10^6 bytes a second
CHUNK = 1 << 22  # 4 MiB: how the big file is written and how the md5 ceiling reads it
BIG = "big.bin"
FOLDER = "files"


# -- small helpers ----------------------------------------------------------------------------------


def dvc_command() -> list[str]:
    """The ``dvc`` a user of this environment runs: the virtual environment's entry point."""
    script = Path(sys.executable).with_name("dvc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dvc"]


def git(project: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def recorded_md5(dvcfile: Path) -> str:
    """The md5 a .dvc file records (its only out)."""
    import yaml

    return str(yaml.safe_load(dvcfile.read_text())["outs"][0]["md5"])


# -- the project --------------------------------------------------------------------------------------


class Project:
    """A git + DVC project made the way users make one, and both contenders' ways into it."""

    def __init__(self, root: Path) -> None:
        from jupyter_mlops.data.project import init_project

        self.root = root
        root.mkdir()
        with stdout_to_stderr():
            done = init_project(root)
        log(f"init_project: {'; '.join(done)}")
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "init")
        self.dvc = dvc_command()
        self.md5_s: list[float] = []  # the md5 ceiling, once per fresh file

    def run_dvc(self, *args: str, expect: str | None = None) -> float:
        """One ``dvc`` command as a user runs it; seconds from launch to exit."""
        t0 = time.perf_counter()
        done = subprocess.run([*self.dvc, *args], cwd=self.root, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, check=False)
        dt = time.perf_counter() - t0
        if done.returncode != 0 or (expect is not None and expect not in done.stdout):
            raise RuntimeError(f"dvc {' '.join(args)} -> {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return dt

    # -- 1. a fresh big file ---------------------------------------------------------------------

    def fresh_file(self, size: int) -> Path:
        """A new file of random bytes, on disk (synced) and in the page cache; returns its path.

        Then, untimed, the md5 ceiling over it: the same warm read both contenders get.
        """
        import numpy as np  # an MLflow dependency; writes random bytes about twice as fast as os.urandom

        path = self.root / BIG
        rng = np.random.default_rng()
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(CHUNK, left)
                f.write(rng.bytes(n))
                left -= n
        os.sync()  # nothing of the writing is left for the timed add to wait on
        h = hashlib.md5()
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        self.md5_s.append(time.perf_counter() - t0)
        self.expected_md5 = h.hexdigest()
        return path

    def drop_big(self) -> None:
        """Remove the file, its .dvc file and every cache object, so the next add hashes and copies."""
        (self.root / BIG).unlink(missing_ok=True)
        (self.root / (BIG + ".dvc")).unlink(missing_ok=True)
        shutil.rmtree(self.root / ".dvc" / "cache", ignore_errors=True)
        os.sync()

    def check_big(self, size: int) -> None:
        """Both contenders must have versioned the bytes: the .dvc file and a full cache object."""
        md5 = recorded_md5(self.root / (BIG + ".dvc"))
        if md5 != self.expected_md5:
            raise RuntimeError(f"{BIG}.dvc records {md5}, the file's md5 is {self.expected_md5}")
        obj = self.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
        if not obj.is_file() or obj.stat().st_size != size:
            raise RuntimeError(f"no complete cache object {obj} after adding {BIG}")

    def add_big_ours(self, size: int) -> float:
        from jupyter_mlops import data

        self.fresh_file(size)
        try:
            with stdout_to_stderr():
                t0 = time.perf_counter()
                data.add(BIG)
                dt = time.perf_counter() - t0
            self.check_big(size)
        finally:
            self.drop_big()
        return dt

    def add_big_dvc(self, size: int) -> float:
        self.fresh_file(size)
        try:
            dt = self.run_dvc("add", "-q", BIG)
            self.check_big(size)
        finally:
            self.drop_big()
        return dt

    def copy_big(self, size: int) -> float:
        """The copy ceiling: ``shutil.copyfile`` of a fresh file into the cache folder (what an
        add must write besides hashing), measured like the adds, between them."""
        path = self.fresh_file(size)
        cache = self.root / ".dvc" / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        try:
            t0 = time.perf_counter()
            shutil.copyfile(path, cache / "copy.tmp")
            dt = time.perf_counter() - t0
        finally:
            self.drop_big()
        return dt

    # -- 2. and 3. a folder of small files -------------------------------------------------------

    def make_folder(self, folders: int, per_folder: int) -> float:
        """``files/dNNN/fNNN.txt``, 100 bytes each; versioned once with data.add and committed.

        Returns the seconds of that first data.add (context, not compared).
        """
        from jupyter_mlops import data

        base = self.root / FOLDER
        for d in range(folders):
            sub = base / f"d{d:03d}"
            sub.mkdir(parents=True)
            for i in range(per_folder):
                (sub / f"f{i:03d}.txt").write_bytes(os.urandom(50).hex().encode())
        with stdout_to_stderr():
            t0 = time.perf_counter()
            data.add(FOLDER)
            dt = time.perf_counter() - t0
        git(self.root, "add", "-A")
        git(self.root, "commit", "-q", "-m", "version the folder")
        self.folder_md5 = recorded_md5(self.root / (FOLDER + ".dvc"))
        self.nfiles = folders * per_folder
        return dt

    def check_folder_versioned(self) -> None:
        """Nothing changed the folder's version or left the .dvc file uncommitted."""
        md5 = recorded_md5(self.root / (FOLDER + ".dvc"))
        if md5 != self.folder_md5 or git(self.root, "status", "--porcelain", "--", FOLDER + ".dvc"):
            raise RuntimeError(f"{FOLDER}.dvc changed: {md5} (was {self.folder_md5})")

    def version_ours(self) -> float:
        from jupyter_mlops import data

        t0 = time.perf_counter()
        v = data.version(FOLDER)
        dt = time.perf_counter() - t0
        if v.modified or v.rev is None or v.md5 != self.folder_md5 or v.nfiles != self.nfiles:
            raise RuntimeError(f"data.version({FOLDER!r}) says {v}")
        return dt

    def use_ours(self) -> float:
        from jupyter_mlops import data

        t0 = time.perf_counter()
        p = data.use(FOLDER)
        dt = time.perf_counter() - t0
        if p != self.root / FOLDER:
            raise RuntimeError(f"data.use({FOLDER!r}) returned {p}")
        return dt

    def status_dvc(self) -> float:
        return self.run_dvc("status", FOLDER + ".dvc", expect="up to date")

    def readd_ours(self) -> float:
        from jupyter_mlops import data

        with stdout_to_stderr():
            t0 = time.perf_counter()
            data.add(FOLDER)
            dt = time.perf_counter() - t0
        self.check_folder_versioned()
        return dt

    def readd_dvc(self) -> float:
        dt = self.run_dvc("add", "-q", FOLDER)
        self.check_folder_versioned()
        return dt


# -- the run ------------------------------------------------------------------------------------------

QUICK = dict(big_mib=256, warmup_mib=32, add_rounds=3, copy_ceiling=False, folders=100, per_folder=100,
             check_rounds=3, readd_rounds=3)
DEFAULT = dict(big_mib=1024, warmup_mib=1024, add_rounds=5, copy_ceiling=True, folders=100, per_folder=100,
               check_rounds=7, readd_rounds=5)


def run_all(p: dict[str, Any], tmp: Path) -> dict[str, float]:
    m: dict[str, float] = {}
    from jupyter_mlops import data  # noqa: F401  (imported before anything is timed)

    project = Project(tmp / "project")
    os.chdir(project.root)  # the data API finds the project from the cwd

    # 1. a fresh big file ------------------------------------------------------------------------
    size = p["big_mib"] << 20
    warm = p["warmup_mib"] << 20
    log(f"add: a fresh {p['big_mib']} MiB file per measure x {p['add_rounds']} (dvc add, ours"
        + (", copy ceiling" if p["copy_ceiling"] else "") + "), "
        f"after a {p['warmup_mib']} MiB warm-up of each")
    contenders = [("dvc_add", lambda: project.add_big_dvc(size)), ("ours", lambda: project.add_big_ours(size))]
    warmup = [lambda: project.add_big_dvc(warm), lambda: project.add_big_ours(warm)]
    if p["copy_ceiling"]:
        contenders.append(("copy", lambda: project.copy_big(size)))
        warmup.append(lambda: project.copy_big(warm))
    res = interleave(log, p["add_rounds"], contenders, warmup=warmup)
    md5_s = project.md5_s[len(warmup):]  # the warm-up's files may be another size
    m["add_s"] = median(res["ours"])
    m["dvc_add_s"] = median(res["dvc_add"])
    m["add_mb_per_s"] = size / MB / m["add_s"]
    m["dvc_add_mb_per_s"] = size / MB / m["dvc_add_s"]
    m["md5_limit_mb_per_s"] = size / MB / median(md5_s)
    if p["copy_ceiling"]:
        m["copy_limit_mb_per_s"] = size / MB / median(res["copy"])

    # 2. the unchanged check of a folder of small files ------------------------------------------
    n = p["folders"] * p["per_folder"]
    log(f"folder: {p['folders']} x {p['per_folder']} files of 100 bytes, versioned once with data.add")
    m["folder_first_add_s"] = project.make_folder(p["folders"], p["per_folder"])
    log(f"  first data.add of {n:,} files: {m['folder_first_add_s']:.1f} s; committed")
    log(f"unchanged check: {p['check_rounds']} x (dvc status, data.version, data.use) after a warm-up")
    res = interleave(log, p["check_rounds"], [
        ("dvc_status", project.status_dvc),
        ("version", project.version_ours),
        ("use", project.use_ours),
    ], warmup=[project.status_dvc, project.version_ours, project.use_ours])
    m["unchanged_check_s"] = median(res["version"])
    m["use_s"] = median(res["use"])
    m["dvc_status_s"] = median(res["dvc_status"])

    # 3. re-adding the unchanged folder ----------------------------------------------------------
    log(f"re-add the unchanged folder: {p['readd_rounds']} x (dvc add, data.add) after a warm-up")
    res = interleave(log, p["readd_rounds"], [
        ("dvc_add", project.readd_dvc),
        ("ours", project.readd_ours),
    ], warmup=[project.readd_dvc, project.readd_ours])
    m["readd_s"] = median(res["ours"])
    m["dvc_readd_s"] = median(res["dvc_add"])
    return m


def main(argv: list[str] | None = None) -> int:
    quick = quick_mode(__doc__, "a 256 MiB file, fewer repeats (< 60 s on 2 cores)", argv)
    p = QUICK if quick else DEFAULT

    started = time.perf_counter()
    with scratch("bench-data-") as tmp:
        log(f"temp folder {tmp}; {'quick' if quick else 'default'} mode: {p}")
        m = run_all(p, tmp)
    wall = time.perf_counter() - started

    ratios = {
        "vs_dvc_add": ratio(m, "dvc_add_s", "add_s"),
        "vs_dvc_status": ratio(m, "dvc_status_s", "unchanged_check_s"),
        "use_vs_dvc_status": ratio(m, "dvc_status_s", "use_s"),
        "vs_dvc_readd": ratio(m, "dvc_readd_s", "readd_s"),
    }
    ratios = {k: v for k, v in ratios.items() if v is not None}

    mib = p["big_mib"]
    nfiles = p["folders"] * p["per_folder"]
    rows = [
        # measure, anchor, anchor metric, ours metric, unit, ratio, goal keys (on ours or on the ratio)
        (f"add {mib} MiB file: time", "dvc add -q (CLI)", "dvc_add_s", "add_s", "s", "vs_dvc_add", []),
        (f"add {mib} MiB file: speed", "dvc add -q (CLI)", "dvc_add_mb_per_s", "add_mb_per_s", "MB/s",
         None, ["add_mb_per_s"]),
        (f"md5 of {mib} MiB (ceiling)", "hashlib.md5, 4 MiB", "md5_limit_mb_per_s", "add_mb_per_s", "MB/s",
         None, []),
        (f"copy of {mib} MiB (ceiling)", "shutil.copyfile", "copy_limit_mb_per_s", "add_mb_per_s", "MB/s",
         None, []),
        (f"unchanged {nfiles:,} files", "dvc status (CLI)", "dvc_status_s", "unchanged_check_s", "s",
         "vs_dvc_status", ["unchanged_check_s", "vs_dvc_status"]),
        ("  same, data.use", "dvc status (CLI)", "dvc_status_s", "use_s", "s", "use_vs_dvc_status", []),
        ("re-add unchanged folder", "dvc add -q (CLI)", "dvc_readd_s", "readd_s", "s", "vs_dvc_readd", []),
    ]
    print()
    print(f"data benchmark ({'--quick' if quick else 'default'}): medians; ratio = anchor / ours, bigger is better")
    print(f"  add: {mib} MiB fresh file x{p['add_rounds']}; folder: {nfiles:,} files "
          f"(first data.add {m.get('folder_first_add_s', float('nan')):.1f} s), check x{p['check_rounds']}, "
          f"re-add x{p['readd_rounds']}; MB = 10^6 bytes; total {wall:.0f} s")
    header = f"{'measure':<27} {'anchor':<19} {'anchor':>11} {'ours':>11} {'ratio':>9}  {'goal':<40} met"
    print(header)
    print("-" * len(header))
    for label, anchor_name, a_key, o_key, unit, r_key, goal_keys in rows:
        if a_key not in m:
            continue
        r = ratios.get(r_key) if r_key else None
        goals = [(k, GOALS[k], goal_met(m[k] if k in m else ratios.get(k), GOALS[k])) for k in goal_keys]
        goal_txt = ", ".join(f"{k} {g}" for k, g, _ in goals)
        met = ", ".join(ok for _, _, ok in goals)
        r_txt = f"{r:>8.2f}x" if r is not None else f"{'-':>9}"
        print(f"{label:<27} {anchor_name:<19} {fmt(m[a_key], unit):>11} {fmt(m.get(o_key), unit):>11} "
              f"{r_txt}  {goal_txt:<40} {met}")
    print()
    metrics = {k: round(v, 4) for k, v in m.items()}
    print(json.dumps({"bench": "data", "metrics": metrics, "ratios": ratios, "goals": GOALS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
