"""The workspace: variant folders plus an SQLite index, under the user data dir or `--workspace`.

Layout under the workspace root:
  studio.db            SQLite in WAL mode, one row per variant (and per evaluated baseline)
  variants/<id>/       the artifact and manifest.json (recipe, parent, versions, machine, sha256, metrics)
  tmp/<job>/           work folders of running jobs, each marked with a `.model-studio-job` file naming the
                       job's process; a variant moves from here into variants/ only when complete (one
                       rename), then its row is inserted.
  quarantine/<id>/     variant folders found damaged (a file no longer matches its manifest): kept for the
                       user to look at, never deleted by the studio.

A crash can therefore leave only (a) a marked tmp folder, removed at the next open, or (b) a complete variant
folder whose row was not yet inserted, which is re-indexed from its manifest at the next open. Rows whose
folder was deleted by hand are reported as missing, never silently dropped.

The studio deletes only what it made: `--workspace` may point at a folder that already has its own tmp/ or
variants/ entries, so anything in tmp/ without the marker, and anything in variants/ that is neither indexed nor
a studio variant, is left where it is and reported. Links are never followed when cleaning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import BadInput, DiskFull, StudioError, disk_full_error

TMP_FOLDER = "tmp"  # under the workspace root: one work folder per running job, named by its job id
JOB_MARKER = ".model-studio-job"  # written by job_folder: only folders carrying it are ever removed from tmp/
COLUMNS = ("id", "kind", "parent", "model", "name", "recipe", "metrics", "artifact", "created", "cache_key")
RECOVER = (
    "move studio.db aside and open the workspace again: variants/ will be re-indexed from their manifests"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS variants (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,            -- torch | onnx | tensorrt | executorch | openvino | baseline
    parent TEXT,
    model TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    recipe TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    artifact TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    cache_key TEXT                 -- baselines: model + evaluation settings, so they are measured once
);
"""
INDEXES = "CREATE INDEX IF NOT EXISTS variants_cache ON variants(cache_key);"


def default_root() -> Path:
    env = os.environ.get("MODEL_STUDIO_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("model-studio", appauthor=False))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def environment() -> dict[str, Any]:
    """Library versions and the machine, recorded in every manifest."""
    import platform
    from importlib import metadata

    versions = {}
    libraries = (
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "torchao",
        "compressed-tensors",
        "tensorrt",
        "executorch",
        "openvino",
        "nncf",
    )
    for dist in (*libraries, "model-studio"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {"versions": versions, "machine": machine_info(), "python": platform.python_version()}


def machine_info() -> dict[str, Any]:
    import platform

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
                flags = sorted(f for f in line.split(":", 1)[1].split() if f in wanted)
                break
    gpu = None
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": flags, "gpu": gpu}


@dataclass
class OpenReport:
    """What opening the workspace repaired, and what it found but left alone."""

    removed_tmp: list[str] = field(default_factory=list)  # work folders of dead jobs (marked by the studio)
    reindexed: list[str] = field(default_factory=list)  # complete variants that had lost their row
    quarantined: list[str] = field(default_factory=list)  # "<id>: why", moved to quarantine/<id>
    damaged: list[str] = field(default_factory=list)  # "<id>: why", left in place (could not be moved)
    foreign: list[str] = field(default_factory=list)  # "tmp/x", "variants/y": not the studio's, untouched

    def notes(self) -> list[str]:
        """One line per thing a user should know about; nothing for a routine repair."""
        out = [f"damaged variant moved to quarantine/{q}" for q in self.quarantined]
        out += [f"damaged variant left in variants/{d}" for d in self.damaged]
        out += [f"{f} is not the studio's: left untouched" for f in self.foreign]
        return out


class Workspace:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_root()
        self.variants_dir = self.root / "variants"
        self.tmp_dir = self.root / TMP_FOLDER
        self.quarantine_dir = self.root / "quarantine"
        for folder in (self.tmp_dir, self.variants_dir):
            # Cleaning a linked tmp/ would delete in the link's target, somewhere the studio never wrote.
            if folder.is_symlink():
                raise BadInput(
                    "is a symbolic link; the studio keeps its folders inside the workspace and does not clean "
                    "through links: remove the link or choose another --workspace",
                    path=folder,
                )
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError as exc:
                raise BadInput("is a file, not a folder: choose another --workspace", path=folder) from exc
            except OSError as exc:
                raise BadInput(f"cannot create the workspace ({exc.strerror})", path=folder) from exc
        self.db_path = self.root / "studio.db"
        with self._connect() as db:
            self._check_schema(db)  # before anything is written: someone else's database stays as it was
            self._use_wal(db)
            db.executescript(SCHEMA)
            db.executescript(INDEXES)
        self.report = self._repair()

    # -------------------------------------------------------------------------------------------- database

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection to the index; SQLite errors a user can act on (a damaged, read-only or full studio.db)
        come out as one-line StudioErrors saying how to recover, the others unchanged."""
        db = None
        try:
            db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=NORMAL")
            db.row_factory = sqlite3.Row
            yield db
        except sqlite3.Error as exc:
            problem = self._db_error(exc)
            if problem is None:
                raise
            raise problem from exc
        finally:
            if db is not None:
                db.close()

    def _check_schema(self, db: sqlite3.Connection) -> None:
        tables = {r["name"] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return  # a new workspace
        if "variants" not in tables:
            raise BadInput(
                f"is not a Model Studio index (its tables: {', '.join(sorted(tables)[:5])}); {RECOVER}",
                path=self.db_path,
            )
        columns = {r["name"] for r in db.execute("PRAGMA table_info(variants)")}
        if not set(COLUMNS) <= columns:
            missing = ", ".join(c for c in COLUMNS if c not in columns)
            raise BadInput(
                f"has a 'variants' table the studio did not write (no column {missing}); {RECOVER}",
                path=self.db_path,
            )

    def _db_error(self, exc: sqlite3.Error) -> StudioError | None:
        code = getattr(exc, "sqlite_errorname", "") or ""
        text = str(exc)
        if code.startswith("SQLITE_FULL") or "disk is full" in text:
            return DiskFull(
                "the disk is full while writing the workspace index; free some space and try again, "
                "nothing half-written was kept",
                path=self.db_path,
            )
        if code.startswith("SQLITE_IOERR") or "disk I/O error" in text:
            # what SQLite says when the disk fills up while it grows its shared-memory or journal file
            return DiskFull(
                f"cannot write the workspace index ({text}: the disk may be full or failing); free some space "
                "and try again, nothing half-written was kept",
                path=self.db_path,
            )
        if code.startswith("SQLITE_READONLY") or "readonly" in text:
            return BadInput(
                f"is read-only ({text}); make it and its folder writable (chmod u+w) or choose another "
                "--workspace",
                path=self.db_path,
            )
        if code.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or "not a database" in text:
            return BadInput(f"is damaged ({text}); {RECOVER}", path=self.db_path)
        if code.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
            return BadInput(
                f"cannot be opened ({text}); it must be a writable file in a writable folder",
                path=self.db_path,
            )
        return None

    @staticmethod
    def _use_wal(db: sqlite3.Connection) -> None:
        """Switch the database to WAL once; the mode is stored in the file, so later connections inherit it.

        Changing the journal mode needs an exclusive lock and SQLite does not always call the busy handler for
        it, so a second process opening the workspace while the first writes retries here instead of failing.
        """
        for attempt in range(100):
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(0.05 * (1 + attempt % 10))
        raise sqlite3.OperationalError("database is locked: could not switch the workspace to WAL")

    def _insert(self, row: dict[str, Any]) -> None:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT OR REPLACE INTO variants (id, kind, parent, model, name, recipe, metrics, artifact, created,"
                " cache_key) VALUES (:id, :kind, :parent, :model, :name, :recipe, :metrics, :artifact, :created,"
                " :cache_key)",
                {
                    **row,
                    "recipe": json.dumps(row.get("recipe") or {}),
                    "metrics": json.dumps(row.get("metrics") or {}),
                    "name": row.get("name") or "",
                    "cache_key": row.get("cache_key"),
                },
            )
            db.execute("COMMIT")

    def _row(self, r: sqlite3.Row) -> dict[str, Any]:
        out = dict(r)
        out["recipe"] = json.loads(out["recipe"])
        out["metrics"] = json.loads(out["metrics"])
        if out["kind"] != "baseline":
            out["artifact"] = str(self._resolve_artifact(out["id"], out["artifact"]))
        return out

    def _with_damage(self, row: dict[str, Any]) -> dict[str, Any]:
        """`missing`: the variant cannot be used as saved; `damage` says why (folder, manifest or files gone).
        Only existence is checked here (listing must stay quick); hashes are checked on re-index and export."""
        row["damage"] = "" if row["kind"] == "baseline" else self._damage(self.variants_dir / row["id"])
        row["missing"] = bool(row["damage"])
        return row

    @staticmethod
    def _damage(folder: Path) -> str:
        if not folder.is_dir():
            return "its folder is gone"
        try:
            files = json.loads((folder / "manifest.json").read_text()).get("files") or {}
        except (OSError, ValueError, AttributeError):
            return "its manifest.json is gone or unreadable"
        gone = sorted(rel for rel in files if not (folder / rel).is_file())
        return f"{len(gone)} of its files are gone ({', '.join(gone[:3])})" if gone else ""

    # -------------------------------------------------------------------------------------------- repair

    def _repair(self) -> OpenReport:
        """Remove work folders of dead jobs; re-index complete variant folders that have no row; move variants
        whose files no longer match their manifest to quarantine/. Nothing the studio did not make is touched."""
        report = OpenReport()
        for entry in sorted(self.tmp_dir.iterdir()):
            if entry.is_symlink() or not entry.is_dir() or not _is_regular(entry / JOB_MARKER):
                report.foreign.append(f"tmp/{entry.name}")
            elif not _job_alive(entry):
                _remove_tree(entry)
                report.removed_tmp.append(entry.name)
        with self._connect() as db:
            known = {r["id"] for r in db.execute("SELECT id FROM variants")}
        for folder in sorted(self.variants_dir.iterdir()):
            if folder.name in known:
                continue
            data = _read_manifest(folder)
            if data is None or data.get("id") != folder.name:
                report.foreign.append(f"variants/{folder.name}")  # no studio manifest: not ours to judge
                continue
            problem = self._files_problem(folder, data.get("files"))
            if not problem:
                self._insert(self._row_from_manifest(data, folder))
                report.reindexed.append(folder.name)
                continue
            place = self._quarantine(folder)
            if place is None:
                report.damaged.append(f"{folder.name}: {problem}")
            else:
                report.quarantined.append(f"{place.name}: {problem}")
        return report

    def _quarantine(self, folder: Path) -> Path | None:
        """Move a damaged variant out of variants/ so it is neither indexed nor checked again; None if it
        cannot be moved (another disk, no permission), in which case it stays and is reported each time."""
        if self.quarantine_dir.is_symlink():
            return None  # a link would move the variant out of the workspace
        try:
            self.quarantine_dir.mkdir(exist_ok=True)
            target = self.quarantine_dir / folder.name
            while target.exists() or target.is_symlink():
                target = self.quarantine_dir / f"{folder.name}-{uuid.uuid4().hex[:4]}"
            os.rename(folder, target)
        except OSError:
            return None
        return target

    def quarantined(self) -> list[str]:
        """Names of the damaged variant folders kept in quarantine/."""
        if not self.quarantine_dir.is_dir() or self.quarantine_dir.is_symlink():
            return []
        return sorted(p.name for p in self.quarantine_dir.iterdir())

    @staticmethod
    def _files_problem(folder: Path, files: Any) -> str:
        """Why the folder is not the variant its manifest describes, or "" when every file matches."""
        if not isinstance(files, dict) or not files:
            return "its manifest lists no files"
        inside = folder.resolve()
        for rel, digest in files.items():
            f = folder / rel
            if f.is_symlink() or not f.resolve().is_relative_to(inside):
                return f"{rel} is a link or lies outside the variant's folder"
            if not f.is_file():
                return f"{rel} is missing"
            if sha256_file(f) != digest:
                return f"{rel} does not match the sha256 in its manifest"
        return ""

    def _row_from_manifest(self, m: dict[str, Any], folder: Path) -> dict[str, Any]:
        return {
            "id": m["id"],
            "kind": m["kind"],
            "parent": m.get("parent"),
            "model": m.get("model", ""),
            "name": m.get("name", ""),
            "recipe": m.get("recipe", {}),
            "metrics": m.get("metrics", {}),
            # stored relative to the workspace, so a moved or copied workspace keeps its variants
            "artifact": (folder / m.get("artifact", "")).relative_to(self.root).as_posix(),
            "created": m.get("created", time.time()),
            "cache_key": None,
        }

    def _resolve_artifact(self, vid: str, stored: str) -> Path:
        """A variant's artifact lies in variants/<id>/: stored relative to the workspace root (absolute in
        workspaces written before that; those are re-based here, so they survive a move too)."""
        path = Path(stored)
        if not path.is_absolute():
            return self.root / path
        parts = path.parts
        if vid in parts:
            return self.variants_dir.joinpath(*parts[parts.index(vid) :])
        return path

    # -------------------------------------------------------------------------------------------- jobs

    def _new_job_dir(self, name: str) -> Path:
        """tmp/<name>, created with the studio's marker already inside (built under a hidden name and renamed),
        so a folder without the marker is never one of ours, whatever moment a crash picks."""
        job = self.tmp_dir / name
        if job.exists() or job.is_symlink():
            raise FileExistsError(f"job folder {job} exists")
        staging = self.tmp_dir / f".new-{name}"
        staging.mkdir()
        (staging / JOB_MARKER).write_text(json.dumps({"pid": os.getpid(), "created": time.time()}))
        os.rename(staging, job)
        return job

    @contextlib.contextmanager
    def job_folder(self, job_id: str | None = None) -> Iterator[Path]:
        """A private work folder for one job, removed when the job ends (whatever way it ends)."""
        job = self._new_job_dir(job_id or uuid.uuid4().hex[:12])
        try:
            yield job
        finally:
            _remove_tree(job)

    def commit_variant(
        self,
        staged: Path,
        *,
        kind: str,
        parent: str | None,
        model: str,
        recipe: dict[str, Any],
        metrics: dict[str, Any],
        files: list[Path] | None = None,
        name: str = "",
    ) -> dict[str, Any]:
        """Move a complete artifact folder into variants/<id> (one rename) and index it.

        If the row cannot be written (disk full, read-only index) the folder is moved back into its job
        folder, so the variant does not reappear at the next open as if it had been saved."""
        vid = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        files = files or sorted(p for p in staged.rglob("*") if p.is_file())
        main = _main_artifact(staged, kind, files)
        manifest = {
            "id": vid,
            "kind": kind,
            "parent": parent,
            "model": model,
            "name": name,
            "recipe": recipe,
            "artifact": main,
            "created": time.time(),
            "files": {str(p.relative_to(staged)): sha256_file(p) for p in files},
            "metrics": metrics,
            **environment(),
        }
        tmp_manifest = staged / "manifest.json.tmp"
        try:
            with tmp_manifest.open("w") as fh:
                fh.write(json.dumps(manifest, indent=2, default=str))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            tmp_manifest.unlink(missing_ok=True)
            raise (disk_full_error(exc, "the variant's manifest") or exc) from exc
        os.replace(tmp_manifest, staged / "manifest.json")
        target = self.variants_dir / vid
        os.replace(staged, target)  # atomic: the folder appears complete or not at all
        row = self._row_from_manifest(manifest, target)
        try:
            self._insert(row)
        except Exception:  # an interrupt is a crash instead: the folder is re-indexed at the next open
            try:
                os.replace(target, staged)  # back into the job folder, removed with it
            except OSError:
                (target / "manifest.json").unlink(missing_ok=True)  # at least not re-indexed as saved
            raise
        return self.get(vid)

    def record_baseline(
        self, model: str, cache_key: str, metrics: dict[str, Any], artifact: str, created: float | None = None
    ) -> dict[str, Any]:
        """Insert or update the baseline of `cache_key`; `created` keeps an updated one's place in the list."""
        bid = "baseline-" + hashlib.sha256(cache_key.encode()).hexdigest()[:12]
        self._insert(
            {
                "id": bid,
                "kind": "baseline",
                "parent": None,
                "model": model,
                "name": f"original {model}",
                "recipe": {},
                "metrics": metrics,
                "artifact": artifact,
                "created": time.time() if created is None else created,
                "cache_key": cache_key,
            }
        )
        return self.get(bid)

    def cached_baseline(self, cache_key: str) -> dict[str, Any] | None:
        with self._connect() as db:
            r = db.execute("SELECT * FROM variants WHERE cache_key = ?", (cache_key,)).fetchone()
        return self._row(r) if r else None

    # -------------------------------------------------------------------------------------------- queries

    def list(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = [self._row(r) for r in db.execute("SELECT * FROM variants ORDER BY created")]
        return [self._with_damage(row) for row in rows]

    def get(self, vid: str) -> dict[str, Any]:
        """The row of the variant `vid`: its full id, or a prefix only one id starts with. Compared as plain
        text, never as a pattern (`%` and `_` are characters like any other)."""
        if not isinstance(vid, str) or not vid.strip():
            raise BadInput("an empty variant id; give an id from `model-studio variants`")
        with self._connect() as db:
            r = db.execute("SELECT * FROM variants WHERE id = ?", (vid,)).fetchone()
            if r is None:
                matches = db.execute(
                    "SELECT * FROM variants WHERE substr(id, 1, ?) = ?", (len(vid), vid)
                ).fetchall()
                if len(matches) == 1:
                    r = matches[0]
                elif len(matches) > 1:
                    raise BadInput(f"variant id '{vid}' is ambiguous ({len(matches)} variants start with it)")
        if r is None:
            raise BadInput(f"no variant '{vid}' in the workspace {self.root}")
        return self._with_damage(self._row(r))

    def folder(self, vid: str) -> Path:
        return self.variants_dir / self.get(vid)["id"]

    def remove(self, vid: str) -> dict[str, Any]:
        row = self.get(vid)
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM variants WHERE id = ?", (row["id"],))
            db.execute("COMMIT")
        folder = self.variants_dir / row["id"]
        if folder.exists() or folder.is_symlink():
            # Moved into a marked job folder first: a crash mid-delete leaves no half folder that looks like a
            # variant, and the next open finishes the delete. A link is moved, never followed.
            trash = self._new_job_dir(f"rm-{row['id']}-{uuid.uuid4().hex[:6]}")
            os.replace(folder, trash / row["id"])
            _remove_tree(trash)
        return row


def _is_regular(path: Path) -> bool:
    return not path.is_symlink() and path.is_file()


def _job_alive(job: Path) -> bool:
    """Whether the process named in a job folder's marker still runs (a marker that cannot be read: dead)."""
    try:
        pid = int(json.loads((job / JOB_MARKER).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:  # it exists, owned by someone else
        return True
    except (OSError, OverflowError):
        return False
    return True


def _remove_tree(folder: Path) -> None:
    """Delete a folder the studio made. rmtree refuses a link at the top and unlinks links inside without
    following them; the check here keeps a link from ever being handed to it."""
    if folder.is_symlink() or not folder.is_dir():
        return
    shutil.rmtree(folder, ignore_errors=True)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    if folder.is_symlink() or not folder.is_dir() or not _is_regular(folder / "manifest.json"):
        return None
    try:
        data = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _main_artifact(folder: Path, kind: str, files: list[Path]) -> str:
    """The file a user means by 'the artifact': model.onnx, the engine, or the folder for torch."""
    suffix = {"onnx": ".onnx", "tensorrt": ".engine", "executorch": ".pte", "openvino": ".xml"}.get(kind)
    if suffix:
        main = [p for p in files if p.suffix == suffix]
        if main:
            return str(main[0].relative_to(folder))
    return ""
