"""Datasets that cache the deterministic preprocessing on disk and can skip bad scans.

The cache key of an item combines (1) every input file's path, size and modification time (for a DICOM
folder: those of its files) and (2) a digest of the deterministic transforms' parameters (every attribute
of every transform before the first random one, plus this package's version). Changing a parameter
(spacing, normalisation, fingerprint values, label mapping, ROI padding, ...) or replacing a file gives a
new key, so stale volumes are never used; old files are simply left behind (delete the folder to reclaim
space).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import pickle
import tempfile
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose, RandomizableTrait, Transform
from monai.utils import convert_to_tensor

import anatomask_components
from anatomask_components.data.readers import is_resource_error
from anatomask_components.data.validation import InvalidScanError, find_invalid_scan_error

# Bump when the cached content changes without any transform parameter changing.
CACHE_FORMAT_VERSION = 1


def cache_safe_globals() -> list[Any]:
    """The only Python globals a cache file may name: MONAI's MetaTensor and its metadata keys, and the
    NumPy pieces of the arrays in its metadata (``original_affine``, ``spatial_shape``, the transform
    history). Data only: none of them runs code when unpickled.

    Found by loading real cache files (NIfTI, NRRD, MHA and DICOM inputs; every preprocessing pipeline) with
    ``weights_only=True`` until torch stopped refusing. MONAI also registers its own types globally; they
    are listed here so that the load does not depend on that.
    """
    from monai.data import MetaObj, MetaTensor
    from monai.utils import MetaKeys, SpaceKeys, TraceKeys

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x, e.g. next to MONAI Label (numpy<2), whose _core shim may be partial
        from numpy.core.multiarray import _reconstruct
    allowed: list[Any] = [MetaTensor, MetaObj, MetaKeys, SpaceKeys, TraceKeys]
    allowed += [_reconstruct, np.ndarray, np.dtype]
    # NumPy >= 1.25 pickles dtypes through their classes; older versions need only np.dtype.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [dtypes.Float64DType, dtypes.Int64DType]
    return allowed


_allow_lock = threading.Lock()
_allow_users = 0
_allow_context: Any = None


@contextlib.contextmanager
def _cache_globals_allowed() -> Iterator[None]:
    """Allow :func:`cache_safe_globals` for weights-only loads while any thread is inside this block.

    torch's ``safe_globals`` edits one process-wide set and removes its globals on exit, so two threads
    each using it would pull the allow-list from under each other: the first to enter adds the globals,
    the last to leave removes them. Globals registered before (MONAI registers MetaTensor) are left alone.
    """
    global _allow_users, _allow_context
    with _allow_lock:
        if _allow_users == 0:
            registered = torch.serialization.get_safe_globals()
            missing = [g for g in cache_safe_globals() if g not in registered]
            _allow_context = torch.serialization.safe_globals(missing)
            _allow_context.__enter__()
        _allow_users += 1
    try:
        yield
    finally:
        with _allow_lock:
            _allow_users -= 1
            if _allow_users == 0:
                _allow_context.__exit__(None, None, None)
                _allow_context = None


def _short_reason(error: BaseException) -> str:
    """The informative line of a load error (torch's weights-only refusal spans a dozen lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    keywords = ("unsupported global", "but got")
    line = next((x for x in lines if any(k in x.lower() for k in keywords)), lines[0] if lines else "")
    return f"{type(error).__name__}: {line}"


def _describe(obj: Any, seen: set[int]) -> Any:
    """A JSON-able, address-free description of an object's configuration, for hashing."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, enum.Enum):
        return f"{type(obj).__qualname__}.{obj.name}"
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (np.ndarray, np.generic, torch.Tensor)):
        array = np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj)
        return {
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
        }
    if isinstance(obj, (torch.dtype, np.dtype)):
        return str(obj)
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, Mapping):
        return {str(k): _describe(v, seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_describe(v, seen) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(json.dumps(_describe(v, seen), sort_keys=True) for v in obj)
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    if id(obj) in seen:
        return f"<cycle {type(obj).__qualname__}>"
    if hasattr(obj, "__dict__"):
        seen.add(id(obj))
        # Thread-locals hold run-time flags (MONAI's tracing state), not configuration.
        state = {k: v for k, v in vars(obj).items() if not isinstance(v, threading.local)}
        return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", "state": _describe(state, seen)}
    text = repr(obj)
    return type(obj).__qualname__ if " at 0x" in text else text


def transform_digest(transforms: Sequence[Callable]) -> str:
    """sha256 of the configuration of ``transforms`` (and of the package and cache format versions).

    Args:
        transforms: the deterministic transforms whose output is cached.

    Returns:
        a hex digest that changes whenever any of their parameters does.
    """
    description = {
        "anatomask_components": anatomask_components.__version__,
        "cache_format": CACHE_FORMAT_VERSION,
        "transforms": [_describe(t, set()) for t in transforms],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _file_identity(value: Any) -> Any:
    """Replace existing paths by (path, size, mtime) so that a rewritten file changes the key."""
    if isinstance(value, (list, tuple)):
        return [_file_identity(v) for v in value]
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        path = Path(value).resolve()
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return {"path": str(path), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}
    return _describe(value, set())


def item_digest(item: Mapping[str, Any]) -> str:
    """sha256 of a datalist item with its files' identities (path, size, modification time)."""
    description = {str(k): _file_identity(v) for k, v in sorted(item.items(), key=lambda kv: str(kv[0]))}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def split_at_first_random(transform: Callable | Sequence[Callable]) -> tuple[Compose, int | None]:
    """Wrap ``transform`` in a Compose and find where its random part starts (as PersistentDataset does).

    Returns:
        the Compose and the index of its first random (or non-MONAI) transform, None if there is none.
    """
    compose = transform if isinstance(transform, Compose) else Compose(transform)
    first_random = compose.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
    )
    return compose, first_random


class CachedScanDataset(Dataset):
    """Dataset that stores the deterministic preprocessing of every item on disk, reused across epochs.

    The transforms up to the first random one run once per item and file version; their output is saved
    under ``cache_dir`` (``<key>.pt``) and memory-mapped on later epochs, so a random crop reads only the
    part of the volume it needs. The random transforms run on every access. Writes are atomic (temporary
    file + rename), so several DataLoader workers or processes can share one folder.

    Bad scans (:class:`InvalidScanError` anywhere in the deterministic part):

    - ``on_invalid="raise"`` (default, fine-tuning): the error is raised as is, naming the file.
    - ``on_invalid="warn"`` (pretraining on large unchecked folders): one warning, the item is marked
      invalid in the cache (``<key>.invalid``, so later epochs and workers don't read it again) and the
      next valid item is returned in its place.

    Resource errors (MemoryError; OSError such as too many open files, I/O error, disk full: see
    :func:`~anatomask_components.data.readers.is_resource_error`) always propagate and mark nothing, even
    when they lie behind an :class:`InvalidScanError`: the next access tries the item again.

    Cache files are read with ``torch.load(weights_only=True)`` allowing only the types of
    :func:`cache_safe_globals`; a file that needs anything else (tampered with, or truncated) is recomputed
    with a warning, never unpickled.

    Args:
        data: datalist items.
        transform: a Compose (or sequence of transforms), e.g. from
            :mod:`anatomask_components.data.preprocessing`.
        cache_dir: cache folder (created); None disables caching but keeps the bad-scan policy.
        on_invalid: ``"raise"`` or ``"warn"``.
        mmap: memory-map cached volumes instead of reading them whole.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | Sequence[Callable],
        cache_dir: str | os.PathLike | None,
        on_invalid: str = "raise",
        mmap: bool = True,
    ):
        if on_invalid not in ("raise", "warn"):
            raise ValueError(f"on_invalid must be 'raise' or 'warn', got {on_invalid!r}")
        compose, self.first_random = split_at_first_random(transform)
        super().__init__(data, compose)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.on_invalid = on_invalid
        self.mmap = mmap
        self.transform_hash = transform_digest(compose.transforms[: self.first_random])
        self._invalid: set[int] = set()

    def cache_path(self, index: int) -> Path | None:
        """The cache file of item ``index`` (None without a cache folder)."""
        if self.cache_dir is None:
            return None
        key = hashlib.sha256((item_digest(self.data[index]) + self.transform_hash).encode()).hexdigest()
        return self.cache_dir / f"{key}.pt"

    def _deterministic(self, index: int) -> Any:
        item = dict(self.data[index])
        path = self.cache_path(index)
        if path is None:
            return self.transform(item, end=self.first_random, threading=True)
        marker = path.with_suffix(".invalid")
        if marker.exists():
            raise InvalidScanError(marker.read_text(encoding="utf-8"))
        if path.exists():
            try:
                # Anyone who can write to the cache folder could plant a pickle that runs code: only the
                # data types our own files hold are allowed, for this load only.
                with _cache_globals_allowed():
                    return torch.load(path, weights_only=True, mmap=self.mmap)
            except (RuntimeError, EOFError, pickle.UnpicklingError) as error:  # a full disk, or a refusal
                warnings.warn(
                    f"unreadable cache file {path} ({_short_reason(error)}); recomputing it", stacklevel=2
                )
                path.unlink(missing_ok=True)
        try:
            result = self.transform(item, end=self.first_random, threading=True)
        except Exception as error:
            invalid = find_invalid_scan_error(error)
            # The marker is permanent, so only a file that cannot be parsed earns it, never a lack of
            # memory or file handles (even one that some transform reported as an InvalidScanError).
            if invalid is not None and self.on_invalid == "warn" and not is_resource_error(error):
                _atomic_write(marker, lambda f: f.write(str(invalid).encode()))
            raise
        _atomic_write(path, lambda f: torch.save(convert_to_tensor(result, track_meta=True), f))
        return result

    def _transform(self, index: int) -> Any:
        for offset in range(len(self.data)):
            candidate = (index + offset) % len(self.data)
            if candidate in self._invalid:
                continue
            try:
                pre = self._deterministic(candidate)
            except Exception as error:
                invalid = find_invalid_scan_error(error)
                if invalid is None or is_resource_error(error):
                    raise
                if self.on_invalid == "raise":
                    raise invalid from error
                self._invalid.add(candidate)
                warnings.warn(f"skipping invalid scan: {invalid}", stacklevel=2)
                continue
            if self.first_random is None:
                return pre
            return self.transform(pre, start=self.first_random)
        raise RuntimeError(f"all {len(self.data)} items of the dataset are invalid scans")


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a partial file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cached_dataset(
    data: Sequence[Mapping[str, Any]],
    transform: Callable | Sequence[Callable],
    cache_dir: str | os.PathLike | None,
    on_invalid: str = "raise",
) -> CachedScanDataset:
    """A :class:`CachedScanDataset` (convenience for bundle configs and scripts).

    Args:
        data: datalist items.
        transform: preprocessing, e.g. ``pretrain_transforms(...)``.
        cache_dir: cache folder; None disables caching.
        on_invalid: ``"raise"`` or ``"warn"`` (skip bad scans with a warning).

    Returns:
        the dataset.
    """
    return CachedScanDataset(data, transform, cache_dir, on_invalid=on_invalid)
