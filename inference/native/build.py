"""Building the native decode kernels, at install time only (``python manage.py build_kernels``):
compile kernels.cpp with torch's cpp_extension into the build directory and write the stamp that
``inference.native.load`` checks. Serving never imports this module."""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from inference.native import (
    CFLAGS,
    LDFLAGS,
    NAME,
    SOURCE,
    STAMP,
    NativeUnavailable,
    build_lock,
    file_sha256,
    inputs,
    mismatch,
    read_stamp,
)

logger = logging.getLogger(__name__)

# A build takes 1-3 minutes on 2 cores (longer on a busy machine): a second build started
# meanwhile waits this long for it, then says who holds the lock.
BUILD_WAIT_SECONDS = 900.0


@dataclasses.dataclass(frozen=True)
class Built:
    directory: Path
    isa: str
    seconds: float  # of the compile that made it
    compiled: bool  # False: it was up to date (or another process built it while this one waited)


def build(directory, *, source=SOURCE, wait=BUILD_WAIT_SECONDS, verbose=False):
    """Compile ``source`` into ``directory`` unless its stamp already matches; return what is there.
    Raises NativeUnavailable when the build fails or another one holds the lock past ``wait``."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    expected = inputs(source)
    # The up-to-date check under a shared lock: `make` runs it often, and it must not make a
    # server loading the kernels at that moment wait.
    with build_lock(directory, shared=True, wait=wait, missing_ok=True):
        done = _up_to_date(directory, expected)
    if done:
        return done
    with build_lock(directory, shared=False, wait=wait):
        done = _up_to_date(directory, expected)  # built by the process this one waited for
        if done:
            return done
        return _compile(directory, source, expected, verbose=verbose)


def _up_to_date(directory, expected):
    stamp = read_stamp(directory)
    if mismatch(stamp, expected) or not (directory / stamp["library"]).is_file():
        return None
    # make's stamp target compares mtimes: an up-to-date build counts as just made.
    os.utime(directory / STAMP)
    return Built(directory, stamp["isa"], stamp["seconds"], compiled=False)


def _compile(directory, source, expected, *, verbose):
    from torch.utils import cpp_extension

    _clear(directory)
    _ninja_on_path()
    started = time.monotonic()
    try:
        module = cpp_extension.load(
            name=_module_name(expected),
            sources=[str(source)],
            # Copies: torch appends its own libraries to the list it is given, and the stamp's
            # flags (and every later load's) must stay ours.
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            verbose=verbose,
        )
    except (OSError, RuntimeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NativeUnavailable(
            f"the native decode kernels need a C++ compiler (g++) and ninja to build into {directory}: {first}"
        ) from exc
    seconds = time.monotonic() - started
    # torch adds _v1, _v2... when one process builds one name into several directories.
    library = Path(module.__file__).name
    stamp = {
        **expected,
        "library": library,
        "library_sha256": file_sha256(directory / library),
        "isa": module.isa(),
        "seconds": round(seconds, 1),
    }
    # Written last and atomically: a stamp is only ever next to a complete build.
    partial = directory / f"{STAMP}.partial"
    partial.write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(partial, directory / STAMP)
    logger.debug("native decode kernels (%s) built into %s in %.1f s", stamp["isa"], directory, seconds)
    return Built(directory, stamp["isa"], stamp["seconds"], compiled=True)


def _module_name(expected):
    """Named after its inputs: a process keeps the first module of a name it imports, and gives
    it again for a library of another build of that name (a test loads several)."""
    return f"{NAME}_{hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:12]}"


def _clear(directory):
    """Remove the stamp first (so that no load trusts what follows), then every output of an
    earlier build: a new torch's headers may be older than the objects, and ninja would keep
    them. Also torch's ``lock``: no build holds it while this process holds build.lock, so one
    there was left by a build that was killed, and torch would wait on it forever."""
    (directory / STAMP).unlink(missing_ok=True)
    stale = directory / "lock"
    if stale.exists():
        logger.warning("removed %s, left behind by a build that was stopped", stale)
        stale.unlink(missing_ok=True)
    patterns = (f"{NAME}*.so", "*.o", "build.ninja", ".ninja_log", ".ninja_deps")
    for pattern in patterns:
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)


def _ninja_on_path():
    """torch builds with the ``ninja`` it finds on PATH; the pip package's sits in the
    virtualenv's bin, which is not on PATH when the venv's python is run directly."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # the build then says that ninja is missing
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
