"""Where edit-batch puts each edit's outputs: per-file folders (default) or WebDataset shards.

files (default, small runs)
    OUT/<edit_id>/sample_<k>.png, preview.png, record.json   each written atomically, the record last
shards (`--out-format shards`: a million edits are a million files on a parallel filesystem otherwise)
    OUT/shards/edits-<worker>-<seq>.tar  one tar per `shard_size` finished edits of a worker (r<rank>, or
                                         r<rank>x<id> for a helper that joined the batch), written atomically
                                         (temp file + rename): members <edit_id>.sample_<k>.png,
                                         <edit_id>.preview.png, <edit_id>.record.json (webdataset's key.ext
                                         layout: `tar`, the webdataset library, `asset-dist gallery` and
                                         `asset-dist evaluate edits` read them)
    OUT/shards.json                      with the manifest: every tar, its edits, bytes and sha256
An edit is done once its record is in a complete tar; a killed worker loses at most the edits of the tar being
filled (fewer than shard_size) and they are redone (by whoever takes over its claims, or on restart): each edit
ends in exactly one tar, because a worker writes a tar only with the edits of chunks it still holds (`keep`,
asset_dist/infer/claims.py) (a `--retry-failed` rerun adds a newer record for the edit; readers take the newest).
"""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Optional

from asset_dist.utils import atomic_write_bytes, atomic_write_json, check_file_name, check_id, inside

RECORD = "record.json"
SHARDS = "shards"
SHARD_INDEX = "shards.json"
FORMATS = ("files", "shards")
_TAR = re.compile(r"edits-(r\d+(?:x[0-9a-f]+)?)-(\d+)\.tar$")


def _good(rec) -> bool:
    return isinstance(rec, dict) and rec.get("status") in ("ok", "failed")


class FileStore:
    """OUT/<edit_id>/<name> files."""

    kind = "files"

    def __init__(self, out: Path):
        self.out = Path(out)

    def path(self, edit_id: str, name: Optional[str] = None) -> Path:
        """OUT/<edit_id>[/name], refused (UnsafeName) unless both are plain names and it lies inside OUT."""
        parts = [check_id(edit_id)] + ([check_file_name(name, "output")] if name is not None else [])
        return inside(self.out, *parts)

    def read_record(self, edit_id: str) -> Optional[dict]:
        try:
            rec = json.loads(self.path(edit_id, RECORD).read_text())
            return rec if _good(rec) else None
        except (OSError, ValueError):
            return None

    def read_file(self, edit_id: str, name: str) -> bytes:
        return self.path(edit_id, name).read_bytes()

    def begin(self, edit_id: str) -> None:
        for tmp in self.path(edit_id).glob(".*.tmp"):  # left by a killed run: never complete
            tmp.unlink(missing_ok=True)

    def put(self, edit_id: str, files: dict[str, bytes], record: dict, keep=None) -> list[str]:
        """Write the edit now (unless keep([id]) drops it: its claim was lost); returns the edit ids written."""
        if keep is not None and edit_id not in keep([edit_id]):
            return []
        for name, data in files.items():
            atomic_write_bytes(self.path(edit_id, name), data)
        atomic_write_json(self.path(edit_id, RECORD), record)
        return [edit_id]

    def flush(self, keep=None) -> list[str]:
        return []

    def refresh(self) -> None:
        pass

    def finish(self) -> None:
        pass


class ShardStore:
    """OUT/shards/edits-r<rank>-<seq>.tar; see the module doc. Reading indexes every complete tar once."""

    kind = "shards"

    def __init__(self, out: Path, rank: int = 0, shard_size: int = 100, worker: str = ""):
        self.out, self.rank, self.shard_size = Path(out), rank, max(1, int(shard_size))
        self.worker = worker or f"r{rank:04d}"  # the tars' name: one writer per name
        self.dir = self.out / SHARDS
        self.buffer: list[tuple[str, dict[str, bytes]]] = []
        self._index: Optional[dict[str, tuple[Path, dict, dict]]] = None  # id -> (tar, record, members)
        self._seen: set[str] = set()  # tars indexed

    # ---------------------------------------------------------------------------------------------- reading

    def tars(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("edits-r*.tar") if _TAR.search(p.name)) if self.dir.is_dir() else []

    def index(self) -> dict[str, tuple[Path, dict, dict]]:
        if self._index is None:
            self._index, self._seen = {}, set()
            self.refresh()
        return self._index

    def refresh(self) -> None:
        """Index the tars written since the last look (other workers write theirs while we run)."""
        if self._index is None:
            self.index()
            return
        for tar in self.tars():
            if tar.name in self._seen:
                continue
            self._seen.add(tar.name)
            for eid, rec, members in _read_tar_index(tar):
                old = self._index.get(eid)
                if old is None or rec.get("time", 0) >= old[1].get("time", 0):
                    self._index[eid] = (tar, rec, members)

    def read_record(self, edit_id: str) -> Optional[dict]:
        got = self.index().get(edit_id)
        return got[1] if got else None

    def read_file(self, edit_id: str, name: str) -> bytes:
        check_file_name(name, "output")
        got = self.index().get(edit_id)
        if got is None or name not in got[2]:
            raise FileNotFoundError(f"{edit_id}.{name} is in no shard under {self.dir}")
        off, size = got[2][name]
        with open(got[0], "rb") as f:
            f.seek(off)
            return f.read(size)

    # ---------------------------------------------------------------------------------------------- writing

    def begin(self, edit_id: str) -> None:
        if not getattr(self, "_cleaned", False) and self.dir.is_dir():  # this rank's tar a killed run left half
            for tmp in self.dir.glob(f".edits-{self.worker}-*.tmp"):
                tmp.unlink(missing_ok=True)
        self._cleaned = True

    def put(self, edit_id: str, files: dict[str, bytes], record: dict, keep=None) -> list[str]:
        self.buffer.append((edit_id, {**files, RECORD: record}))
        return self.flush(keep) if len(self.buffer) >= self.shard_size else []

    def flush(self, keep=None) -> list[str]:
        """Write the buffered edits as the worker's next tar (atomic), leaving out those keep(ids) drops (their
        claim was lost: another worker writes them). Returns the ids written."""
        if keep is not None and self.buffer:
            kept = keep([eid for eid, _ in self.buffer])
            self.buffer = [b for b in self.buffer if b[0] in kept]
        if not self.buffer:
            return []
        from asset_dist.data.shardwriter import write_tar

        self.dir.mkdir(parents=True, exist_ok=True)
        seq = 1 + max([int(m.group(2)) for p in self.dir.glob(f"edits-{self.worker}-*.tar")
                       if (m := _TAR.search(p.name)) and m.group(1) == self.worker] + [-1])
        path = self.dir / f"edits-{self.worker}-{seq:06d}.tar"
        samples = []
        for eid, parts in self.buffer:
            rec = {**parts[RECORD], "shard": path.name}
            samples.append((eid, {**{k: v for k, v in parts.items() if k != RECORD},
                                  RECORD: json.dumps(rec, sort_keys=True).encode()}))
        write_tar(path, samples)
        ids = [eid for eid, _ in self.buffer]
        self.buffer.clear()
        return ids

    def finish(self) -> None:
        """OUT/shards.json: every tar with its edits, bytes and sha256 (written with the manifest)."""
        import hashlib

        shards = []
        for tar in self.tars():
            h = hashlib.sha256()
            with open(tar, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            shards.append({"name": tar.name, "bytes": tar.stat().st_size, "sha256": h.hexdigest(),
                           "edits": [eid for eid, _, _ in _read_tar_index(tar)]})
        atomic_write_json(self.out / SHARD_INDEX, {"format": "asset_dist edit results", "layout": "webdataset",
                                                   "members": ["sample_<k>.png", "preview.png", RECORD],
                                                   "shards": shards})


def _read_tar_index(path: Path) -> list[tuple[str, dict, dict]]:
    """[(edit id, record, {member name: (offset, size)})] of one tar (a damaged tar: skipped, its edits redone)."""
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for ti in tar:
                if ti.isfile():
                    key, _, name = ti.name.partition(".")
                    groups.setdefault(key, {})[name] = (ti.offset_data, ti.size)
            out = []
            for key, members in groups.items():
                if RECORD not in members:
                    continue
                f = tar.extractfile(tar.getmember(f"{key}.{RECORD}"))
                rec = json.loads(f.read()) if f else None
                if _good(rec):
                    out.append((key, rec, members))
            return out
    except (OSError, tarfile.TarError, ValueError):
        return []


def open_results(out: Path, kind: Optional[str] = None, rank: int = 0, shard_size: int = 100, worker: str = ""):
    """The store of an edit-batch output: `kind` when writing, else detected (a shards/ folder)."""
    out = Path(out)
    if kind is None:
        kind = "shards" if (out / SHARDS).is_dir() else "files"
    if kind not in FORMATS:
        raise ValueError(f"unknown output format {kind!r} (choose {' or '.join(FORMATS)})")
    return ShardStore(out, rank, shard_size, worker) if kind == "shards" else FileStore(out)
