import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create the admin user if it does not exist. The password comes from GENAPI_ADMIN_PASSWORD, "
        "or is generated and printed once."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default=os.environ.get("GENAPI_ADMIN_USER", "admin"))

    def handle(self, *args, username, **options):
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            self.stdout.write(f"Admin user {username!r} already exists.")
            return
        password = os.environ.get("GENAPI_ADMIN_PASSWORD", "")
        generated = not password
        password = password or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        if generated:
            self.stdout.write(self.style.WARNING(f"Created admin user {username!r} with password: {password}"))
            self.stdout.write("This password is shown only once.")
        else:
            self.stdout.write(f"Created admin user {username!r} (password from GENAPI_ADMIN_PASSWORD).")
