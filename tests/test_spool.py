from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_mlops.errors import SpoolError
from jupyter_mlops.tracking.spool import SpoolWriter, iter_run_dirs, read_json, read_records, writer_alive


def test_records_round_trip_and_a_torn_tail_is_left_for_later(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path / "r1", {"spool_id": "r1"})
    writer.write("m\tloss\t0.5\t1000\t1\n")
    writer.write('p\tlr\t"0.1"\n')
    with open(tmp_path / "r1" / "events.log", "ab") as f:
        f.write(b"m\tloss\t0.4\t10")  # a record still being written
    records = read_records(tmp_path / "r1", 0)
    assert [(r.kind, r.fields) for r in records] == [("m", ("loss", "0.5", "1000", "1")), ("p", ("lr", '"0.1"'))]
    assert records[-1].end == len("m\tloss\t0.5\t1000\t1\n") + len('p\tlr\t"0.1"\n')
    assert read_records(tmp_path / "r1", records[-1].end) == []
    assert read_json(tmp_path / "r1" / "run.json") == {"spool_id": "r1"}
    assert list(iter_run_dirs(tmp_path)) == [tmp_path / "r1"]


def test_writer_lock_is_held_until_close(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path / "r1", {"spool_id": "r1"})
    assert writer_alive(tmp_path / "r1")
    writer.close()
    assert not writer_alive(tmp_path / "r1")


def test_writer_lock_is_dropped_when_the_process_is_killed(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path\n"
        "from jupyter_mlops.tracking.spool import SpoolWriter\n"
        f"w = SpoolWriter(Path({str(tmp_path / 'r1')!r}), {{'spool_id': 'r1'}})\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    assert writer_alive(tmp_path / "r1")
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert not writer_alive(tmp_path / "r1")


def test_snapshots_do_not_follow_later_edits(tmp_path: Path) -> None:
    src = tmp_path / "model.txt"
    src.write_text("v1")
    writer = SpoolWriter(tmp_path / "r1", {"spool_id": "r1"})
    rel = writer.snapshot(src)
    src.write_text("v2")
    assert (tmp_path / "r1" / "files" / rel).read_text() == "v1"


def test_an_unwritable_spool_says_what_to_do(mlops_readonly_dir: Path) -> None:
    with pytest.raises(SpoolError) as info:
        SpoolWriter(mlops_readonly_dir / "r1", {"spool_id": "r1"})
    message = str(info.value)
    assert "MLOPS_SPOOL_DIR" in message and str(mlops_readonly_dir) in message
    assert "\n" not in message
    assert not os.path.exists(mlops_readonly_dir / "r1")
