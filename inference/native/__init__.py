"""The native decode kernels (kernels.cpp), loaded at serving time from a build made at install
time (`make native`, i.e. ``python manage.py build_kernels``, part of ``make install`` and of the
image build) into ``INFERENCE_NATIVE_DIR``. Serving never compiles: a build whose stamp does not
match this kernels.cpp, these flags, this torch and this Python is refused with the command to run.

The directory holds the build (``genapi_kernels_<inputs hash>.so``), its stamp
(``genapi_kernels.stamp``: what it was built from, the library and its sha256, written last) and
``build.lock``, which a build holds exclusively and a load holds shared. It is an ``flock``: the kernel drops it when its process dies, so, unlike torch's
own ``lock`` file, a killed build cannot leave a lock behind that stops the next one."""

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sysconfig
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
NAME = "genapi_kernels"
# OpenMP: at::parallel_for splits the work over torch's threads.
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
STAMP = f"{NAME}.stamp"
LOCK = "build.lock"
# Said when there is no earlier build to quote: 50-90 s measured on 2 cores (more when busy).
TYPICAL_SECONDS = 75
# How long a load waits for a build that holds the lock before refusing: long enough for an
# up-to-date check, far shorter than a compile (a model load must not wait for one).
LOAD_WAIT_SECONDS = 5.0

_lock = threading.Lock()
_modules = {}


class NativeUnavailable(RuntimeError):
    pass


def kernels(directory=None):
    """The built module (int8_linear, f32_linear, rms_norm, silu_mul, decode_attention,
    decode_layers, isa), loaded once per process and directory; NativeUnavailable says why not
    and what to run."""
    directory = _directory(directory)
    with _lock:
        if directory not in _modules:
            _modules[directory] = load(directory)
        return _modules[directory]


def load(directory, *, source=SOURCE):
    """Import the build in ``directory`` if its stamp matches ``source`` and this torch/Python;
    about a second (most of it importing torch), no compiler."""
    directory = Path(directory)
    started = time.monotonic()
    with build_lock(directory, shared=True, wait=LOAD_WAIT_SECONDS, missing_ok=True):
        stamp = read_stamp(directory)
        reason = mismatch(stamp, inputs(source))
        if reason:
            raise NativeUnavailable(not_built_message(directory, reason, stamp))
        library = directory / stamp["library"]
        try:
            if file_sha256(library) != stamp.get("library_sha256"):
                raise NativeUnavailable(not_built_message(directory, f"{library.name} changed after its build", stamp))
            import torch  # noqa: F401  (the module links against libtorch, which importing torch loads)

            spec = importlib.util.spec_from_file_location(library.stem, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except (OSError, ImportError) as exc:
            raise NativeUnavailable(
                not_built_message(directory, f"{library.name} does not load: {exc}", stamp)
            ) from exc
    logger.info(
        "native decode kernels (%s) loaded from %s in %.1f s", module.isa(), directory, time.monotonic() - started
    )
    return module


def problem(directory=None, *, source=SOURCE):
    """Why the kernels in ``directory`` cannot be loaded (a sentence ending with the command to
    run), or None. Cheap: reads the stamp and hashes kernels.cpp, imports no torch."""
    directory = _directory(directory)
    stamp = read_stamp(directory)
    reason = mismatch(stamp, inputs(source))
    if not reason and not (directory / stamp["library"]).is_file():
        reason = f"{stamp['library']} is missing"
    return not_built_message(directory, reason, stamp) if reason else None


def inputs(source=SOURCE):
    """What a build depends on: a build made from other inputs is not loaded."""
    return {
        "source_sha256": file_sha256(source),
        "flags": " ".join(CFLAGS + ["|"] + LDFLAGS),
        "torch": _torch_version(),
        "python": sysconfig.get_config_var("EXT_SUFFIX"),
    }


def mismatch(stamp, expected):
    """What differs between a build's stamp and ``expected`` (inputs()), in words, or ''."""
    if stamp is None:
        return "no build"
    described = {
        "source_sha256": "built from another kernels.cpp",
        "flags": "built with other compile flags",
        "torch": f"built for torch {stamp.get('torch')}, this is torch {expected['torch']}",
        "python": f"built for {stamp.get('python')}, this Python needs {expected['python']}",
    }
    return "; ".join(text for key, text in described.items() if stamp.get(key) != expected[key])


def not_built_message(directory, reason, stamp=None):
    seconds = (stamp or {}).get("seconds") or TYPICAL_SECONDS
    return (
        f"the native decode kernels are not built for this source and torch in {directory} ({reason}): "
        f"run `make native` (or `python manage.py build_kernels`; about {seconds:.0f} s)"
    )


def read_stamp(directory):
    try:
        stamp = json.loads((Path(directory) / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and "library" in stamp else None


@contextlib.contextmanager
def build_lock(directory, *, shared, wait, missing_ok=False):
    """Hold ``directory/build.lock`` (shared: loads; exclusive: a build), waiting at most
    ``wait`` seconds for the other kind. ``missing_ok``: go on unlocked where no build ever
    made the file (then there is nothing to load either, and the stamp says so)."""
    path = Path(directory) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        if not missing_ok:
            raise
        yield
        return
    try:
        deadline = time.monotonic() + wait
        announced = False
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            holder = _holder(path)
            if time.monotonic() >= deadline:
                raise NativeUnavailable(
                    f"the native decode kernels are being built by {holder} (it holds {path}); "
                    f"gave up waiting after {wait:.0f} s"
                )
            if not announced:
                logger.info("waiting up to %.0f s for the build of the native kernels by %s (%s)", wait, holder, path)
                announced = True
            time.sleep(0.1)
        if not shared:
            # Who holds it, for the message of whoever waits.
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _holder(path):
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid else "another process"


def _directory(directory):
    if directory is None:
        from django.conf import settings

        directory = settings.INFERENCE_NATIVE_DIR
    return Path(directory).resolve()


def _torch_version():
    # From the installed package's metadata: the start-up check must not import torch (seconds).
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        import torch

        return torch.__version__


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
