"""Hostile workspaces: the studio deletes only what it made, ids are ids, nothing from outside a checkpoint's
folder is copied, and a broken index or output path is one line of error (exit code 2), never a lost file.

Every test builds its hostile input itself and checks that the files it did not make survive byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from studio.cli import main
from studio.errors import BadInput, DiskFull
from studio.variants import JOB_MARKER, Workspace

SECRET = "TOP-SECRET-TOKEN 8f14e45fceea167a5a36dedd4bea2543"


def make_variant(ws: Workspace, kind: str = "onnx", files: dict[str, bytes] | None = None) -> dict:
    """A real variant committed the way a run commits one (job folder, manifest, rename, row)."""
    files = files or (
        {"model.onnx": b"onnx bytes " * 50} if kind == "onnx" else {"model.safetensors": b"w" * 500}
    )
    with ws.job_folder() as job:
        staged = job / "artifact"
        for rel, data in files.items():
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / rel).write_bytes(data)
        return ws.commit_variant(staged, kind=kind, parent=None, model="m", recipe={}, metrics={})


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`, links recorded as links (not followed): what must survive unchanged."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = "dir"
    return out


def one_line_error(capsys, code: int, expected: int = 2) -> str:
    err = capsys.readouterr().err.strip()
    assert code == expected, err
    assert err.startswith("model-studio: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def secrets_under(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


@contextlib.contextmanager
def read_only(path: Path):
    """Make a file or folder unwritable for this process: permissions for a user, the immutable flag for
    root (whom permissions do not stop)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make {path} read-only as root here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# ------------------------------------------------------------------------------------------------ tmp/


class TestTmpHoldsOnlyWhatTheStudioMade:
    def test_foreign_tmp_entries_survive_and_dead_marked_jobs_go(self, tmp_path):
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "precious.txt").write_text("mine")
        root = tmp_path / "project"
        tmp = root / "tmp"
        tmp.mkdir(parents=True)
        (tmp / "notes.txt").write_text("the user's own tmp file")
        (tmp / "build").mkdir()
        (tmp / "build" / "a.o").write_bytes(b"\x7fELF")
        lookalike = tmp / "0123456789ab"  # a job id's shape and a dead .pid, but no studio marker
        lookalike.mkdir()
        (lookalike / ".pid").write_text("999999999")
        (tmp / "link-to-outside").symlink_to(outside, target_is_directory=True)
        (tmp / "marker-is-a-link").mkdir()
        (tmp / "marker-is-a-link" / JOB_MARKER).symlink_to(outside / "precious.txt")
        before_tmp, before_outside = snapshot(tmp), snapshot(outside)
        # a studio job that died (its process is gone), holding a link out: the job goes, the target stays
        dead = tmp / "deadbeef0001"
        dead.mkdir()
        (dead / JOB_MARKER).write_text(json.dumps({"pid": 999_999_999}))
        (dead / "link").symlink_to(outside, target_is_directory=True)
        (dead / "work.bin").write_bytes(b"partial")
        # a studio job still running (this process): kept
        live = tmp / "live00000001"
        live.mkdir()
        (live / JOB_MARKER).write_text(json.dumps({"pid": os.getpid()}))

        ws = Workspace(root)
        assert ws.report.removed_tmp == [dead.name]
        assert not dead.exists() and live.is_dir()
        assert {f"tmp/{n}" for n in before_tmp if "/" not in n} == set(ws.report.foreign)
        shutil.rmtree(live)
        assert snapshot(tmp) == before_tmp
        assert snapshot(outside) == before_outside
        Workspace(root)  # opening again changes nothing either
        assert snapshot(tmp) == before_tmp

    @pytest.mark.parametrize("which", ["tmp", "variants"])
    def test_a_linked_tmp_or_variants_is_refused_and_its_target_untouched(self, tmp_path, capsys, which):
        target = tmp_path / "elsewhere"
        target.mkdir()
        (target / "dead-job").mkdir()
        (target / "dead-job" / JOB_MARKER).write_text(json.dumps({"pid": 999_999_999}))
        (target / "data.csv").write_text("a,b\n1,2\n")
        root = tmp_path / "ws"
        root.mkdir()
        (root / which).symlink_to(target, target_is_directory=True)
        before = snapshot(target)
        err = one_line_error(capsys, main(["variants", "--workspace", str(root)]))
        assert "symbolic link" in err and which in err
        assert snapshot(target) == before
        with pytest.raises(BadInput, match="symbolic link"):
            Workspace(root)

    def test_job_folders_are_marked_and_removed_when_the_job_ends(self, tmp_path):
        ws = Workspace(tmp_path)
        with ws.job_folder("job1") as job:
            assert json.loads((job / JOB_MARKER).read_text())["pid"] == os.getpid()
            Workspace(tmp_path)  # another open while the job runs keeps it
            assert job.is_dir()
        assert not job.exists()
        assert list(ws.tmp_dir.iterdir()) == []

    def test_removing_a_variant_never_follows_links_inside_it(self, tmp_path):
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "precious.txt").write_text("mine")
        ws = Workspace(tmp_path / "ws")
        row = make_variant(ws)
        (ws.variants_dir / row["id"] / "link").symlink_to(outside, target_is_directory=True)
        assert main(["variants", "rm", row["id"], "--workspace", str(ws.root)]) == 0
        assert not (ws.variants_dir / row["id"]).exists() and list(ws.tmp_dir.iterdir()) == []
        assert (outside / "precious.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ variants/


class TestVariantsFolderIsNeverWiped:
    def test_foreign_entries_in_variants_survive_a_lost_index(self, tmp_path, capsys):
        root = tmp_path / "project"
        ws = Workspace(root)
        kept = make_variant(ws)
        v = root / "variants"
        (v / "README.md").write_text("my own variants folder")
        (v / "experiment-3").mkdir()
        (v / "experiment-3" / "weights.bin").write_bytes(b"\x00\x01" * 100)
        (v / "someone-else").mkdir()
        (v / "someone-else" / "manifest.json").write_text(json.dumps({"id": "not-this-folder", "files": {}}))
        (v / "bad-json").mkdir()
        (v / "bad-json" / "manifest.json").write_text("{not json")
        (root / "studio.db").unlink()  # the index is lost
        before = snapshot(v)
        assert main(["variants", "--workspace", str(root)]) == 0
        captured = capsys.readouterr()
        assert kept["id"] in captured.out  # re-indexed from its manifest
        for name in ("README.md", "experiment-3", "someone-else", "bad-json"):
            assert f"variants/{name} is not the studio's" in captured.err
        assert snapshot(v) == before

    def test_a_variant_with_one_changed_byte_is_quarantined_not_deleted(self, tmp_path, capsys):
        root = tmp_path / "ws"
        ws = Workspace(root)
        good = make_variant(ws)
        bad = make_variant(ws, kind="torch")
        weights = root / "variants" / bad["id"] / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[10] ^= 0xFF
        weights.write_bytes(bytes(data))
        before = snapshot(root / "variants" / bad["id"])
        (root / "studio.db").unlink()  # lost index: only the manifests tell what each folder is
        assert main(["variants", "--workspace", str(root)]) == 0
        captured = capsys.readouterr()
        assert f"damaged variant moved to quarantine/{bad['id']}" in captured.err
        assert "model.safetensors does not match" in captured.err
        assert good["id"] in captured.out and bad["id"] not in captured.out
        assert snapshot(root / "quarantine" / bad["id"]) == before  # every byte kept, the changed one too
        ws = Workspace(root)
        assert ws.quarantined() == [bad["id"]] and ws.report.quarantined == []  # moved once, not re-hashed
        assert [r["id"] for r in ws.list()] == [good["id"]]

    def test_a_linked_quarantine_is_not_used_and_the_damaged_variant_stays(self, tmp_path, capsys):
        root = tmp_path / "ws"
        ws = Workspace(root)
        bad = make_variant(ws)
        (root / "variants" / bad["id"] / "model.onnx").write_bytes(b"changed")
        before = snapshot(root / "variants")
        (tmp_path / "elsewhere").mkdir()
        (root / "quarantine").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        (root / "studio.db").unlink()
        assert main(["variants", "--workspace", str(root)]) == 0
        assert f"damaged variant left in variants/{bad['id']}" in capsys.readouterr().err
        assert snapshot(root / "variants") == before and list((tmp_path / "elsewhere").iterdir()) == []

    def test_files_deleted_by_hand_show_the_variant_as_damaged(self, tmp_path, capsys):
        ws = Workspace(tmp_path)
        row = make_variant(ws, kind="torch", files={"model.safetensors": b"w" * 64, "config.json": b"{}"})
        (ws.variants_dir / row["id"] / "model.safetensors").unlink()  # the folder stays
        got = ws.get(row["id"])
        assert got["missing"] and "model.safetensors" in got["damage"]
        assert main(["variants", "--workspace", str(tmp_path)]) == 0
        assert "FILES MISSING: 1 of its files are gone (model.safetensors)" in capsys.readouterr().out
        out = tmp_path / "exported"
        code = main(["export", row["id"], "--format", "hf", "--out", str(out), "--workspace", str(tmp_path)])
        assert "model.safetensors" in one_line_error(capsys, code)
        assert not out.exists()


# ------------------------------------------------------------------------------------------------ ids


class TestIdsAreIds:
    @pytest.fixture
    def ws(self, tmp_path):
        ws = Workspace(tmp_path / "ws")
        self.rows = [make_variant(ws) for _ in range(2)]
        return ws

    def args(self, ws, *argv):
        return [*argv, "--workspace", str(ws.root)]

    @pytest.mark.parametrize(
        "pattern", ["%", "%{tail}", "_{rest}", "{head}%", "{head}_", "________________%"]
    )
    def test_patterns_match_nothing(self, ws, capsys, pattern):
        vid = self.rows[0]["id"]
        arg = pattern.format(tail=vid[-6:], rest=vid[1:], head=vid[:-1])
        before = snapshot(ws.variants_dir)
        out = ws.root.parent / "out"
        for argv in (
            ["variants", "rm", arg],
            ["compare", arg, self.rows[1]["id"], "--no-weights", "--examples", "0"],
            ["export", arg, "--format", "onnx", "--out", str(out)],
            ["report", arg, "--out", str(ws.root.parent / "r.html")],
        ):
            err = one_line_error(capsys, main(self.args(ws, *argv)))
            assert f"no variant '{arg}'" in err, argv
        assert snapshot(ws.variants_dir) == before and len(ws.list()) == 2
        assert not out.exists() and not (ws.root.parent / "r.html").exists()

    def test_an_unambiguous_prefix_still_works_and_one_bad_id_removes_nothing(self, ws, capsys):
        a, b = (r["id"] for r in self.rows)
        code = main(self.args(ws, "variants", "rm", a, "%"))
        assert "no variant '%'" in one_line_error(capsys, code)
        assert len(ws.list()) == 2
        code = main(self.args(ws, "variants", "rm", ""))
        assert "empty variant id" in one_line_error(capsys, code)
        assert main(self.args(ws, "variants", "rm", a[:-1])) == 0  # a prefix only `a` starts with
        assert capsys.readouterr().out.strip() == f"removed {a}"
        assert [r["id"] for r in ws.list()] == [b]


# ------------------------------------------------------------------------------------------------ side files


class TestNothingFromOutsideTheCheckpointIsCopied:
    def hostile_checkpoint(self, tmp_path: Path, model_dir: Path) -> Path:
        secret = tmp_path / "secret.txt"
        secret.write_text(SECRET)
        (tmp_path / "secret-dir").mkdir()
        (tmp_path / "secret-dir" / "config.json").write_text(json.dumps({"token": SECRET}))
        src = tmp_path / "model"
        shutil.copytree(model_dir, src)
        (src / "merges.txt").symlink_to(secret)
        (src / "special_tokens_map.json").unlink(missing_ok=True)
        (src / "special_tokens_map.json").symlink_to(src / "tokenizer_config.json")  # inside: fine
        pooling = src / "1_Pooling"
        pooling.mkdir(exist_ok=True)
        (pooling / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
        (pooling / "leak.json").symlink_to(secret)
        (pooling / "leak-dir").symlink_to(tmp_path / "secret-dir", target_is_directory=True)
        (src / "2_Normalize").symlink_to(tmp_path / "secret-dir", target_is_directory=True)
        return src

    def test_copy_side_files_skips_links_that_leave_the_folder(self, tmp_path, bert_classifier):
        from studio.techniques.torch_io import copy_side_files

        src = self.hostile_checkpoint(tmp_path, bert_classifier)
        before = snapshot(tmp_path / "secret-dir")
        out = tmp_path / "variant"
        out.mkdir()
        copy_side_files(src, out)
        assert secrets_under(out) == []
        assert not (out / "merges.txt").exists() and not (out / "2_Normalize").exists()
        assert (out / "1_Pooling" / "config.json").is_file() and not (
            out / "1_Pooling" / "leak.json"
        ).exists()
        assert (out / "special_tokens_map.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
        assert (out / "vocab.txt").is_file()
        assert snapshot(tmp_path / "secret-dir") == before and SECRET in (tmp_path / "secret.txt").read_text()

    def test_hugging_face_cache_snapshots_still_copy_their_blobs(self, tmp_path):
        from studio.techniques.torch_io import copy_side_files

        repo = tmp_path / "hub" / "models--org--name"
        (repo / "blobs").mkdir(parents=True)
        (repo / "blobs" / "abc123").write_text('{"model_max_length": 128}')
        snap = repo / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True)
        (snap / "tokenizer_config.json").symlink_to(Path("..") / ".." / "blobs" / "abc123")
        out = tmp_path / "variant"
        out.mkdir()
        copy_side_files(snap, out)
        assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 128}

    @pytest.mark.slow
    def test_a_run_and_its_hf_export_carry_no_linked_secret(self, tmp_path, capsys, bert_classifier):
        from studio.events import Done
        from studio.worker import WorkerClient

        src = self.hostile_checkpoint(tmp_path, bert_classifier)
        root = tmp_path / "ws"
        recipe = {
            "version": 1,
            "model": str(src),
            "data": {"evaluation_examples": 4, "calibration_examples": 4},
            "steps": [],
            "evaluate": {"latency": False, "sequence_length": 16},
        }
        events = list(WorkerClient(recipe, root).events())
        assert isinstance(events[-1], Done), events[-1]
        vid = events[-1].result["variants"][0]["id"]
        assert (root / "variants" / vid / "vocab.txt").is_file()  # side files inside the folder are copied
        assert secrets_under(root / "variants") == []
        out = tmp_path / "exported"
        assert main(["export", vid, "--format", "hf", "--out", str(out), "--workspace", str(root)]) == 0, (
            capsys.readouterr().err
        )
        assert (out / "config.json").is_file() and secrets_under(out) == []

    def test_export_refuses_a_variant_whose_file_became_a_link_and_skips_unlisted_links(
        self, tmp_path, capsys
    ):
        secret = tmp_path / "secret.txt"
        secret.write_text(SECRET)
        ws = Workspace(tmp_path / "ws")
        row = make_variant(ws)
        folder = ws.variants_dir / row["id"]
        (folder / "extra-notes.txt").symlink_to(secret)  # not in the manifest: never exported
        out = tmp_path / "out"
        argv = ["export", row["id"], "--format", "onnx", "--out", str(out), "--workspace", str(ws.root)]
        assert main(argv) == 0
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").symlink_to(secret)  # a listed file replaced by a link out
        out2 = tmp_path / "out2"
        argv[5] = str(out2)
        capsys.readouterr()
        assert "is missing, a link, or outside" in one_line_error(capsys, main(argv))
        assert not out2.exists() and not list(tmp_path.glob(".out2.partial-*"))
        assert secret.read_text() == SECRET


# ------------------------------------------------------------------------------------------------ studio.db


class TestBrokenIndexIsExplained:
    def workspace_with_variant(self, root: Path) -> tuple[str, dict]:
        ws = Workspace(root)
        vid = make_variant(ws)["id"]
        return vid, snapshot(root / "variants")

    @pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-schema", "a-folder"])
    def test_a_damaged_index_is_one_line_and_recovery_works(self, tmp_path, capsys, damage):
        root = tmp_path / "ws"
        vid, variants_before = self.workspace_with_variant(root)
        db = root / "studio.db"
        if damage == "garbage":
            db.write_bytes(os.urandom(8192))
        elif damage == "truncated":
            ws = Workspace(root)
            for i in range(40):  # enough rows for several pages, then cut the file in half
                ws.record_baseline(f"m{i}", f"k{i}", {"pad": "x" * 3000}, "")
            db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
        elif damage == "wrong-schema":
            db.unlink()
            con = sqlite3.connect(db)
            con.execute("CREATE TABLE variants (id TEXT, size INTEGER)")
            con.commit()
            con.close()
        else:
            db.unlink()
            db.mkdir()
            (db / "keep.txt").write_text("not a database")
        db_before = snapshot(root) if db.is_dir() else {"studio.db": db.read_bytes()}
        err = one_line_error(capsys, main(["variants", "--workspace", str(root)]))
        assert "studio.db" in err
        if damage != "a-folder":
            assert "move studio.db aside" in err and "re-indexed" in err
        assert snapshot(root / "variants") == variants_before
        assert (snapshot(root) if db.is_dir() else {"studio.db": db.read_bytes()}) == db_before
        # the advice works: with the index moved aside the variant is found again from its manifest
        db.rename(root / "studio.db.broken")
        assert main(["variants", "--workspace", str(root)]) == 0
        assert vid in capsys.readouterr().out

    def test_a_read_only_index_lists_but_refuses_changes_in_one_line(self, tmp_path, capsys):
        root = tmp_path / "ws"
        vid, variants_before = self.workspace_with_variant(root)
        ws = Workspace(root)
        with read_only(root / "studio.db"):
            code = main(["variants", "rm", vid, "--workspace", str(root)])
            assert "read-only" in one_line_error(capsys, code)
            with pytest.raises(BadInput, match="read-only"):
                make_variant(ws)  # the row cannot be written: the variant is moved back out, not kept
        assert snapshot(root / "variants") == variants_before
        assert [r["id"] for r in Workspace(root).list()] == [vid]
        assert list((root / "tmp").iterdir()) == []

    def test_a_read_only_workspace_folder_is_one_line(self, tmp_path, capsys):
        root = tmp_path / "ws"
        _, variants_before = self.workspace_with_variant(root)
        with read_only(root):
            code = main(["variants", "--workspace", str(root)])
            assert "studio.db" in one_line_error(capsys, code)
        assert snapshot(root / "variants") == variants_before

    def test_disk_full_during_the_index_write_saves_nothing(self, tmp_path):
        """A real full disk: a small tmpfs (mountable by root) filled up after the variant is staged, so the
        manifest still fits but SQLite cannot grow its files ("disk I/O error")."""
        mount = tmp_path / "small"
        mount.mkdir()
        made = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
        )
        if made.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
        try:
            ws = Workspace(mount / "ws")
            with ws.job_folder() as job:
                staged = job / "artifact"
                staged.mkdir()
                (staged / "model.onnx").write_bytes(b"x" * 1000)
                filler = mount / "filler"
                with filler.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
                    while True:
                        fh.write(b"\0" * 4096)
                os.truncate(filler, filler.stat().st_size - 8192)  # two pages: room for the manifest only
                with pytest.raises(DiskFull, match=r"studio\.db"):
                    ws.commit_variant(staged, kind="onnx", parent=None, model="m", recipe={}, metrics={})
                assert list(ws.variants_dir.iterdir()) == []
                filler.unlink()
            again = Workspace(mount / "ws")  # with space again: the variant does not reappear as saved
            assert again.list() == [] and again.report.reindexed == []
            assert list(again.tmp_dir.iterdir()) == []
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)


# ------------------------------------------------------------------------------------------------ outputs


class TestOutputPathsAreChecked:
    @pytest.fixture
    def ws(self, tmp_path):
        ws = Workspace(tmp_path / "ws")
        self.vid = make_variant(ws)["id"]
        return ws

    def export(self, ws, out: Path) -> int:
        return main(["export", self.vid, "--format", "onnx", "--out", str(out), "--workspace", str(ws.root)])

    def report(self, ws, out: Path) -> int:
        return main(["report", "--out", str(out), "--workspace", str(ws.root)])

    def test_export_into_a_file_or_read_only_folder_and_into_new_folders(self, ws, tmp_path, capsys):
        a_file = tmp_path / "a-file"
        a_file.write_text("keep me")
        full = tmp_path / "full"
        full.mkdir()
        (full / "old.txt").write_text("keep me too")
        cases = {
            a_file: "is a file",
            a_file / "sub": "is a file",
            full: "not empty",
        }
        for out, words in cases.items():
            assert words in one_line_error(capsys, self.export(ws, out)), out
        locked = tmp_path / "locked"
        locked.mkdir()
        with read_only(locked):
            assert "cannot write here" in one_line_error(capsys, self.export(ws, locked / "out"))
        assert list(locked.iterdir()) == []
        assert a_file.read_text() == "keep me" and (full / "old.txt").read_text() == "keep me too"
        assert self.export(ws, tmp_path / "fine") == 0  # the same variant exports where it can
        # the folders above a new output folder are made, as mkdir -p
        assert self.export(ws, tmp_path / "new" / "deeper" / "out") == 0
        assert (tmp_path / "new" / "deeper" / "out").is_dir()

    def test_report_into_a_folder_a_file_or_read_only_folder_and_into_new_folders(self, ws, tmp_path, capsys):
        a_file = tmp_path / "a-file"
        a_file.write_text("keep me")
        cases = {
            tmp_path: "is a folder",
            a_file / "r.html": "is a file",
            a_file / "sub" / "r.html": "is a file",
        }
        for out, words in cases.items():
            assert words in one_line_error(capsys, self.report(ws, out)), out
        locked = tmp_path / "locked"
        locked.mkdir()
        previous = locked / "r.html"
        previous.write_text("last week's report")
        with read_only(locked):
            assert "cannot write here" in one_line_error(capsys, self.report(ws, previous))
        assert previous.read_text() == "last week's report" and sorted(locked.iterdir()) == [previous]
        assert a_file.read_text() == "keep me"
        assert self.report(ws, tmp_path / "r.html") == 0 and "<html>" in (tmp_path / "r.html").read_text()
        assert self.report(ws, tmp_path / "new" / "r.html") == 0  # a missing folder above is made
