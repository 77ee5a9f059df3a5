"""A database outage answers 503, not 500: JSON with Retry-After under /api/ and /v1/
(in each API's error shape), a short page elsewhere (the admin). The driver's message,
which names the database's host and port, goes to the log only."""

from django.db import DatabaseError

from inference.errors import database_unavailable_response


class DatabaseUnavailableMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if isinstance(exception, DatabaseError):
            return database_unavailable_response(request, exception)
        return None
