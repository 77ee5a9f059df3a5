"""Middleware of the whole site.

RequestTelemetryMiddleware (outermost): gives each request an id (the X-Request-ID it came with
when that is a safe one, else a new one), binds it to every log line written while the request is
served (a stream's too, event by event), returns it in the X-Request-ID response header, and
counts the request and its duration by URL pattern for /metrics.

DatabaseUnavailableMiddleware (innermost): a database outage answers 503, not 500: JSON with
Retry-After under /api/ and /v1/ (in each API's error shape), a short page elsewhere (the
admin). The driver's message, which names the database's host and port, goes to the log only."""

import time

from django.db import DatabaseError

from inference import telemetry
from inference.errors import database_unavailable_response


class RequestTelemetryMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        request_id = telemetry.request_id_accept(request.headers.get(telemetry.REQUEST_ID_HEADER))
        request.request_id = request_id
        with telemetry.request_id_bound(request_id):
            response = self.get_response(request)
        response[telemetry.REQUEST_ID_HEADER] = request_id
        # A stream's body is made after this returns, as the server sends it: each event is made
        # with the id bound, and the request is counted once the server closes the response.
        streamed = response.streaming and not getattr(response, "is_async", False)
        if streamed:
            response.streaming_content = _bound_stream(response.streaming_content, request_id)
        close = response.close

        def close_bound():
            # What runs at close, with the id: a stream's clean-up when its client left (the
            # view's generator ends there), request_finished's receivers.
            try:
                with telemetry.request_id_bound(request_id):
                    close()
            finally:
                if streamed:
                    observe()

        def observe():
            telemetry.http_observe(
                route=telemetry.route_label(request),
                method=request.method,
                status=response.status_code,
                seconds=time.perf_counter() - started,
            )

        response.close = close_bound
        if not streamed:
            observe()
        return response


def _bound_stream(content, request_id):
    iterator = iter(content)
    while True:
        # Bound around each step only: between two events the thread is the server's.
        with telemetry.request_id_bound(request_id):
            try:
                chunk = next(iterator)
            except StopIteration:
                return
        yield chunk


class DatabaseUnavailableMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if isinstance(exception, DatabaseError):
            return database_unavailable_response(request, exception)
        return None
