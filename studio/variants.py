"""The workspace: variant folders plus an SQLite index (DESIGN.md §2, Workspace).

Layout under the workspace root:
  studio.db            SQLite in WAL mode, one row per variant (and per evaluated baseline)
  variants/<id>/       the artifact and manifest.json (recipe, parent, versions, machine, sha256, metrics)
  tmp/<job>/           work folders of running jobs; a variant moves from here into variants/ only when
                       complete (one rename), then its row is inserted.

A crash can therefore leave only (a) a tmp folder, removed at the next open, or (b) a complete variant folder
whose row was not yet inserted, which is re-indexed from its manifest at the next open. Rows whose folder was
deleted by hand are reported as missing, never silently dropped.
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

from studio.errors import BadInput, disk_full_error

SCHEMA = """
CREATE TABLE IF NOT EXISTS variants (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,            -- torch | onnx | tensorrt | baseline
    parent TEXT,
    model TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    recipe TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    artifact TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    cache_key TEXT                 -- baselines: model + evaluation settings, so they are measured once
);
CREATE INDEX IF NOT EXISTS variants_cache ON variants(cache_key);
"""


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
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "torchao", "tensorrt", "model-studio"):
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
    """What opening the workspace repaired."""

    removed_tmp: list[str] = field(default_factory=list)
    reindexed: list[str] = field(default_factory=list)
    removed_incomplete: list[str] = field(default_factory=list)


class Workspace:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_root()
        self.variants_dir = self.root / "variants"
        self.tmp_dir = self.root / "tmp"
        try:
            self.variants_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"cannot create the workspace ({exc.strerror})", path=self.root) from exc
        self.db_path = self.root / "studio.db"
        with self._connect() as db:
            self._use_wal(db)
            db.executescript(SCHEMA)
        self.report = self._repair()

    # -------------------------------------------------------------------------------------------- database

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=NORMAL")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

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

    # -------------------------------------------------------------------------------------------- repair

    def _repair(self) -> OpenReport:
        """Remove work folders of dead jobs; re-index complete variant folders that have no row."""
        report = OpenReport()
        for job in self.tmp_dir.iterdir():
            pid_file = job / ".pid"
            alive = False
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                os.kill(pid, 0)
                alive = True
            if not alive:
                shutil.rmtree(job, ignore_errors=True)
                report.removed_tmp.append(job.name)
        with self._connect() as db:
            known = {r["id"] for r in db.execute("SELECT id FROM variants")}
        for folder in self.variants_dir.iterdir():
            if folder.name in known:
                continue
            manifest = folder / "manifest.json"
            try:
                data = json.loads(manifest.read_text())
                complete = data.get("id") == folder.name and self._files_match(folder, data.get("files", {}))
            except (OSError, json.JSONDecodeError):
                complete = False
            if complete:
                self._insert(self._row_from_manifest(data, folder))
                report.reindexed.append(folder.name)
            else:
                shutil.rmtree(folder, ignore_errors=True)
                report.removed_incomplete.append(folder.name)
        return report

    @staticmethod
    def _files_match(folder: Path, files: dict[str, str]) -> bool:
        for rel, digest in files.items():
            f = folder / rel
            if not f.is_file() or sha256_file(f) != digest:
                return False
        return bool(files)

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

    @contextlib.contextmanager
    def job_folder(self, job_id: str | None = None) -> Iterator[Path]:
        """A private work folder for one job, removed when the job ends (whatever way it ends)."""
        job = self.tmp_dir / (job_id or uuid.uuid4().hex[:12])
        job.mkdir(parents=True, exist_ok=False)
        (job / ".pid").write_text(str(os.getpid()))
        try:
            yield job
        finally:
            shutil.rmtree(job, ignore_errors=True)

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
        """Move a complete artifact folder into variants/<id> (one rename) and index it."""
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
        self._insert(row)
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
        for row in rows:
            row["missing"] = row["kind"] != "baseline" and not Path(row["artifact"]).exists()
        return rows

    def get(self, vid: str) -> dict[str, Any]:
        with self._connect() as db:
            r = db.execute("SELECT * FROM variants WHERE id = ?", (vid,)).fetchone()
            if r is None:
                matches = db.execute("SELECT * FROM variants WHERE id LIKE ?", (vid + "%",)).fetchall()
                if len(matches) == 1:
                    r = matches[0]
                elif len(matches) > 1:
                    raise BadInput(f"variant id '{vid}' is ambiguous ({len(matches)} variants start with it)")
        if r is None:
            raise BadInput(f"no variant '{vid}' in the workspace {self.root}")
        row = self._row(r)
        row["missing"] = row["kind"] != "baseline" and not Path(row["artifact"]).exists()
        return row

    def folder(self, vid: str) -> Path:
        return self.variants_dir / self.get(vid)["id"]

    def remove(self, vid: str) -> dict[str, Any]:
        row = self.get(vid)
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM variants WHERE id = ?", (row["id"],))
            db.execute("COMMIT")
        folder = self.variants_dir / row["id"]
        if folder.exists():
            # Rename first so a crash mid-delete leaves no half folder that looks like a variant.
            trash = self.tmp_dir / f"rm-{row['id']}"
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return row


def _main_artifact(folder: Path, kind: str, files: list[Path]) -> str:
    """The file a user means by 'the artifact': model.onnx, the engine, or the folder for torch."""
    suffix = {"onnx": ".onnx", "tensorrt": ".engine"}.get(kind)
    if suffix:
        main = [p for p in files if p.suffix == suffix]
        if main:
            return str(main[0].relative_to(folder))
    return ""
