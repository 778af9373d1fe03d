"""Where the preprocessing cache lives, what uses it, and how it is pruned (``anatomask cache``).

One cache per machine by default (:func:`default_cache_dir`), shared by every run and every bundle: entries
are keyed by content (:mod:`anatomask_components.data.datasets`), so runs over the same scans with the same
preprocessing reuse each other's volumes. Layout of the folder:

- ``<key>.pt`` / ``<key>.invalid``: the entries (a preprocessed volume, or a bad-scan marker). An entry's
  modification time is its last use: written when computed, touched when a process first reads it.
- ``datasets/<id>.json``: one record per dataset (the list of its entry keys, where its scans live, the
  transforms' digest, the stored dtype, the last time a run started on it), for the listing per dataset.
- ``leases/<id>.<host>.<pid>.json``: a dataset in use by a running process. Pruning never removes the
  entries of a held dataset. A lease is released when its dataset object is freed or its process exits;
  one left by a killed process is recognised as dead (same host, process gone) and ignored. Leases of other
  hosts (a cache folder on a network share) are always honoured: delete the file by hand once that run is
  over.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from anatomask_components.files import atomic_write

CACHE_ENV = "ANATOMASK_PREPROCESSED_CACHE"
DATASETS_FOLDER = "datasets"
LEASES_FOLDER = "leases"
ENTRY_SUFFIXES = (".pt", ".invalid")
# A temporary file older than this is a leftover of a killed writer, never a write in progress.
STALE_TEMPORARY_SECONDS = 24 * 3600
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def default_cache_dir() -> Path:
    """The machine's preprocessing cache: ``$ANATOMASK_PREPROCESSED_CACHE``, else ``preprocessed/`` in
    ``$ANATOMASK_CACHE``, ``$XDG_CACHE_HOME/anatomask`` or ``~/.cache/anatomask`` (first one set)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("ANATOMASK_CACHE"):
        base = Path(os.environ["ANATOMASK_CACHE"]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "anatomask"
    else:
        base = Path.home() / ".cache" / "anatomask"
    return base / "preprocessed"


class CacheFullError(OSError):
    """The disk (or quota) holding the preprocessing cache is full; the message names the folder."""


def format_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1024, as ``du -h``)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def cache_full_error(folder: Path, error: BaseException) -> CacheFullError | None:
    """A :class:`CacheFullError` naming ``folder`` and its free space if ``error`` (or what caused it) is a
    full disk or quota (ENOSPC, EDQUOT); None for any other error."""
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            try:
                free = f"{format_bytes(shutil.disk_usage(folder).free)} free"
            except OSError:
                free = "free space unknown"
            return CacheFullError(
                error.errno,
                f"no space left for the preprocessing cache in {folder} ({os.strerror(error.errno)}; "
                f"{free}): free space with `anatomask cache --max_size SIZE`, or point the cache elsewhere "
                f"(bundle key cache_dir, or ${CACHE_ENV})",
                str(folder),
            )
        error = error.__cause__ or error.__context__
    return None


def parse_size(size: str | int | float) -> int:
    """``"50GB"``, ``"500 MB"``, ``"1.5T"`` or a number of bytes -> bytes (powers of 1024)."""
    if isinstance(size, (int, float)):
        return int(size)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(size).upper())
    if match is None:
        raise ValueError(f"cannot read the size {size!r}; write e.g. 50GB, 500MB or a number of bytes")
    return int(float(match.group(1)) * 1024 ** "BKMGT".index(match.group(2) or "B"))


def parse_date(date: str | dt.date) -> float:
    """``"2026-12-01"`` (midnight, local time) or ``"2026-12-01T08:30"`` -> seconds since the epoch."""
    if isinstance(date, dt.datetime):
        return date.timestamp()
    if isinstance(date, dt.date):
        return dt.datetime.combine(date, dt.time()).timestamp()
    try:
        return dt.datetime.fromisoformat(str(date)).timestamp()
    except ValueError:
        raise ValueError(
            f"cannot read the date {date!r}; write e.g. 2026-12-01 or 2026-12-01T08:30"
        ) from None


def dataset_name(items: Sequence[Mapping[str, Any]]) -> str:
    """The folder that holds a dataset's files (their common parent), or ``"<n> items"``."""
    paths: list[str] = []
    for item in items:
        for value in item.values():
            for candidate in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(candidate, (str, os.PathLike)) and os.path.exists(candidate):
                    paths.append(os.path.dirname(os.path.abspath(candidate)))
    if not paths:
        return f"{len(items)} items"
    return os.path.commonpath(paths)


def dataset_id(keys: Iterable[str]) -> str:
    """Identifier of a dataset: a digest of its entries' keys (the same scans and transforms, the same id)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def record_dataset(cache_dir: Path, keys: Sequence[str], name: str, transforms: str, cache_dtype: str) -> str:
    """Write (or refresh) the record of a dataset in ``cache_dir/datasets``.

    Args:
        cache_dir: the cache folder.
        keys: the entry key of every item.
        name: where the scans live (:func:`dataset_name`).
        transforms: digest of the cached transforms.
        cache_dtype: the stored dtype of the images.

    Returns:
        the dataset's id.
    """
    identifier = dataset_id(keys)
    record = {
        "name": name,
        "transforms": transforms,
        "cache_dtype": cache_dtype,
        "items": len(keys),
        "last_used": time.time(),
        "keys": sorted(set(keys)),
    }
    folder = cache_dir / DATASETS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"{identifier}.json", lambda f: f.write(json.dumps(record).encode()))
    return identifier


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _release(path: Path, owner: int) -> None:
    # DataLoader workers are forked copies: only the process that took the lease gives it back.
    if os.getpid() == owner:
        path.unlink(missing_ok=True)


def hold(cache_dir: Path, identifier: str, owner: object) -> Path:
    """Mark dataset ``identifier`` as in use until ``owner`` is freed or this process ends.

    Returns:
        the lease file.
    """
    folder = cache_dir / LEASES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    lease = folder / f"{identifier}.{host}.{pid}.{id(owner):x}.json"
    content = {
        "dataset": identifier,
        "host": host,
        "pid": pid,
        "start": _process_start(pid),
        "since": time.time(),
    }
    atomic_write(lease, lambda f: f.write(json.dumps(content).encode()))
    weakref.finalize(owner, _release, lease, pid)
    return lease


def _lease_alive(lease: Mapping[str, Any]) -> bool:
    if lease.get("host") != socket.gethostname():
        return True  # another machine's processes cannot be checked from here
    pid = int(lease.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    started = lease.get("start")
    return started is None or _process_start(pid) in (None, started)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # being replaced, or half-written by a killed process: skipped


def _entries(cache_dir: Path) -> dict[str, dict[str, float]]:
    """key -> {"bytes": size of its files, "used": last use, "valid": holds a volume}."""
    entries: dict[str, dict[str, float]] = {}
    for path in cache_dir.iterdir():
        if path.suffix not in ENTRY_SUFFIXES:
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        entry = entries.setdefault(path.stem, {"bytes": 0, "used": 0.0, "valid": 0})
        entry["bytes"] += stat.st_size
        entry["used"] = max(entry["used"], stat.st_mtime)
        entry["valid"] = entry["valid"] or path.suffix == ".pt"
    return entries


def _datasets(cache_dir: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for path in sorted((cache_dir / DATASETS_FOLDER).glob("*.json")):
        record = _read_json(path)
        if record is not None and isinstance(record.get("keys"), list):
            records[path.stem] = record
    return records


def _leases(cache_dir: Path) -> tuple[dict[str, list[dict[str, Any]]], list[Path]]:
    """Live leases by dataset id, and the lease files of dead processes."""
    alive: dict[str, list[dict[str, Any]]] = {}
    dead: list[Path] = []
    for path in (cache_dir / LEASES_FOLDER).glob("*.json"):
        lease = _read_json(path)
        if lease is None:
            continue
        if _lease_alive(lease):
            alive.setdefault(str(lease.get("dataset")), []).append(lease)
        else:
            dead.append(path)
    return alive, dead


def cache_summary(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Size and last use of a cache folder, per dataset.

    Args:
        cache_dir: the cache folder (default :func:`default_cache_dir`).

    Returns:
        ``{"folder", "entries", "bytes", "free_bytes", "datasets": [...], "unlisted": {"entries", "bytes"}}``;
        every dataset: ``id, name, transforms, cache_dtype, items, cached, invalid, bytes, last_used, in_use``
        (the pids of the processes holding it), most recently used first. An entry shared by two datasets
        counts in both; the totals count it once.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        return {"folder": str(folder), "entries": 0, "bytes": 0, "free_bytes": None, "datasets": [],
                "unlisted": {"entries": 0, "bytes": 0}}  # fmt: skip
    entries = _entries(folder)
    alive, _ = _leases(folder)
    listed: set[str] = set()
    datasets = []
    for identifier, record in _datasets(folder).items():
        present = [entries[k] for k in record["keys"] if k in entries]
        listed.update(record["keys"])
        datasets.append(
            {
                "id": identifier,
                "name": record.get("name", "?"),
                "transforms": str(record.get("transforms", "?"))[:12],
                "cache_dtype": record.get("cache_dtype", "?"),
                "items": int(record.get("items", len(record["keys"]))),
                "cached": sum(1 for e in present if e["valid"]),
                "invalid": sum(1 for e in present if not e["valid"]),
                "bytes": int(sum(e["bytes"] for e in present)),
                "last_used": max([float(record.get("last_used", 0.0))] + [e["used"] for e in present]),
                "in_use": sorted(int(lease["pid"]) for lease in alive.get(identifier, [])),
            }
        )
    datasets.sort(key=lambda d: -d["last_used"])
    unlisted = [e for k, e in entries.items() if k not in listed]
    return {
        "folder": str(folder),
        "entries": len(entries),
        "bytes": int(sum(e["bytes"] for e in entries.values())),
        "free_bytes": shutil.disk_usage(folder).free,
        "datasets": datasets,
        "unlisted": {"entries": len(unlisted), "bytes": int(sum(e["bytes"] for e in unlisted))},
    }


def prune(
    cache_dir: str | os.PathLike | None = None,
    before: str | dt.date | float | None = None,
    max_size: str | int | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Remove the entries no run used since ``before``, then the least recently used ones until the cache
    holds at most ``max_size``. Entries of datasets held by a running process are never removed.

    Args:
        cache_dir: the cache folder (default :func:`default_cache_dir`).
        before: a date (``"2026-12-01"``), or seconds since the epoch; None: no age limit.
        max_size: ``"50GB"`` or bytes; None: no size limit.
        dry_run: only report what would be removed.

    Returns:
        ``{"removed_entries", "removed_bytes", "kept_entries", "kept_bytes", "held_entries"}``.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no preprocessing cache there")
    limit_time = (
        None if before is None else float(before) if isinstance(before, (int, float)) else parse_date(before)
    )
    limit_size = None if max_size is None else parse_size(max_size)
    alive, dead = _leases(folder)
    records = _datasets(folder)
    held = {key for identifier in alive for key in records.get(identifier, {}).get("keys", [])}
    entries = _entries(folder)
    removable = sorted((e["used"], key) for key, e in entries.items() if key not in held)
    total = sum(e["bytes"] for e in entries.values())
    remove: list[str] = []
    for used, key in removable:
        too_old = limit_time is not None and used < limit_time
        too_big = limit_size is not None and total > limit_size
        if too_old or too_big:
            remove.append(key)
            total -= entries[key]["bytes"]
    if not dry_run:
        for key in remove:
            for suffix in ENTRY_SUFFIXES:
                (folder / f"{key}{suffix}").unlink(missing_ok=True)
        for lease in dead:
            lease.unlink(missing_ok=True)
        gone = set(remove)
        for identifier, record in records.items():
            if identifier not in alive and all(k in gone or k not in entries for k in record["keys"]):
                (folder / DATASETS_FOLDER / f"{identifier}.json").unlink(missing_ok=True)
        for temporary in folder.glob("*.tmp"):
            try:
                if time.time() - temporary.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                    temporary.unlink()
            except FileNotFoundError:
                pass
    removed_bytes = sum(entries[k]["bytes"] for k in remove)
    return {
        "removed_entries": len(remove),
        "removed_bytes": int(removed_bytes),
        "kept_entries": len(entries) - len(remove),
        "kept_bytes": int(total),
        "held_entries": len(held & set(entries)),
    }


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M") if timestamp else "-"


def print_summary(summary: Mapping[str, Any]) -> None:
    """Print :func:`cache_summary` as a table, one line per dataset."""
    free = (
        "" if summary["free_bytes"] is None else f", {format_bytes(summary['free_bytes'])} free on its disk"
    )
    print(
        f"[cache] {summary['folder']}: {summary['entries']} entries, {format_bytes(summary['bytes'])}{free}",
        flush=True,
    )
    if summary["datasets"]:
        print(
            f"  {'size':>9}  {'items':>6}  {'cached':>6}  {'bad':>4}  {'dtype':<7}  {'last used':<16}  "
            "dataset"
        )
    for d in summary["datasets"]:
        in_use = f"  (in use: pid {', '.join(map(str, d['in_use']))})" if d["in_use"] else ""
        print(
            f"  {format_bytes(d['bytes']):>9}  {d['items']:>6}  {d['cached']:>6}  {d['invalid']:>4}  "
            f"{d['cache_dtype']:<7}  {_when(d['last_used']):<16}  {d['name']} [transforms {d['transforms']}]"
            f"{in_use}"
        )
    unlisted = summary["unlisted"]
    if unlisted["entries"]:
        print(f"  {format_bytes(unlisted['bytes']):>9}  {unlisted['entries']} entries of no recorded dataset")


def cache_command(
    cache_dir: str | None = None,
    prune_before: str | None = None,
    max_size: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """``anatomask cache``: list the cache per dataset; with ``prune_before`` / ``max_size``, prune it first.

    Returns:
        the summary after pruning (and the pruning report under ``"pruned"`` when pruning was asked).
    """
    pruned = None
    if prune_before is not None or max_size is not None:
        pruned = prune(cache_dir, prune_before, max_size, dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        print(
            f"[cache] {verb} {pruned['removed_entries']} entries ({format_bytes(pruned['removed_bytes'])}); "
            f"{pruned['kept_entries']} kept ({format_bytes(pruned['kept_bytes'])}), of which "
            f"{pruned['held_entries']} belong to runs in progress",
            flush=True,
        )
    summary = cache_summary(cache_dir)
    print_summary(summary)
    return {**summary, **({"pruned": pruned} if pruned is not None else {})}
