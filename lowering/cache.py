"""The kernel cache: generated Triton sources as files, keyed by a hash of the source.

Triton's JIT reads a kernel's source from its file, so a generated kernel is written to
``$OPTCC_CACHE_DIR`` (default ``~/.cache/optcc/kernels``) as ``<name>_<hash>.py`` and
imported from there; the same region source is written once and reused by every later
compile and process. Writes are atomic (a temporary file in the same folder, then
``os.replace``), so two processes compiling the same region at once both end up
importing one complete file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading
from pathlib import Path
from types import ModuleType

_loaded: dict[Path, ModuleType] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "optcc" / "kernels"
    path = Path(os.environ.get("OPTCC_CACHE_DIR", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_path(name: str, source: str) -> Path:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return cache_dir() / f"{name}_{digest}.py"


def write_source(name: str, source: str) -> Path:
    """The cache file holding ``source`` (written atomically when missing)."""
    path = source_path(name, source)
    if path.exists() and path.read_text() == source:
        return path
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(source)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_kernel(name: str, source: str):
    """The ``@triton.jit`` function ``name`` defined by ``source`` (cached per file)."""
    path = write_source(name, source)
    with _lock:
        module = _loaded.get(path)
        if module is None:
            spec = importlib.util.spec_from_file_location(f"optcc_kernel_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _loaded[path] = module
    return getattr(module, name)
