"""The native decode kernels (kernels.cpp), compiled with the machine's C++ compiler on first
use and kept in ``INFERENCE_NATIVE_DIR``; later processes load the built module in about a
second. Several processes starting at once build it once (torch's lock file)."""

import logging
import os
import shutil
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")

_lock = threading.Lock()
_module = None


class NativeUnavailable(RuntimeError):
    pass


def kernels(directory=None):
    """The compiled module: int8_linear, f32_linear, rms_norm, silu_mul, decode_attention,
    decode_layers, isa."""
    global _module
    with _lock:
        if _module is None:
            _module = _build(directory)
        return _module


def _build(directory):
    import time

    from torch.utils import cpp_extension

    if directory is None:
        from django.conf import settings

        directory = settings.INFERENCE_NATIVE_DIR
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _ninja_on_path()
    started = time.monotonic()
    try:
        module = cpp_extension.load(
            name="genapi_kernels",
            sources=[str(SOURCE)],
            # OpenMP: at::parallel_for splits the work over torch's threads.
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NativeUnavailable(
            f"the native decode kernels need a C++ compiler (g++) and ninja to build into {directory}: {first}"
        ) from exc
    logger.info("native decode kernels ready (%s) in %.1f s", module.isa(), time.monotonic() - started)
    return module


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
