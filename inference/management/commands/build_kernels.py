"""Build the native decode kernels into INFERENCE_NATIVE_DIR, at install time (`make install`,
`make native`, the image build): serving only loads what this built."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference.native import NativeUnavailable, problem
from inference.native.build import BUILD_WAIT_SECONDS, build


class Command(BaseCommand):
    help = "Compile inference/native/kernels.cpp (a minute or more), unless the build there is up to date."
    # The start-up checks would only warn that the kernels are not built yet.
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument(
            "--directory", default=None, help="where to build (default: INFERENCE_NATIVE_DIR, where serving looks)"
        )
        parser.add_argument(
            "--wait",
            type=float,
            default=BUILD_WAIT_SECONDS,
            help=f"seconds to wait for another build of the same directory (default {BUILD_WAIT_SECONDS:.0f})",
        )

    def handle(self, *args, directory=None, wait, verbosity, **options):
        directory = directory or settings.INFERENCE_NATIVE_DIR
        if verbosity >= 1 and problem(directory):
            self.stdout.write(f"native decode kernels: compiling into {directory} (a minute or more on 2 cores)...")
        try:
            built = build(directory, wait=wait, verbose=verbosity >= 2)
        except NativeUnavailable as exc:
            # The rest of the compiler's output: the message quotes its first line.
            detail = str(exc.__cause__ or "").strip().splitlines()[1:] if verbosity >= 1 else []
            raise CommandError("\n".join([str(exc), *detail])) from exc
        if built.compiled:
            self.stdout.write(
                f"native decode kernels ({built.isa}) built into {built.directory} in {built.seconds:.1f} s"
            )
        elif verbosity >= 1:
            self.stdout.write(f"native decode kernels ({built.isa}) in {built.directory} are up to date")
