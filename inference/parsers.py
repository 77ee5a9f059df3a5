import io

from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import ParseError

from inference.errors import RequestTooLarge


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, bounded: a body over DATA_UPLOAD_MAX_MEMORY_SIZE gets a 413 (read no
    further than that), and JSON nested too deep for Python's parser a 400, both as JSON."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        data = stream.read(limit + 1) if stream is not None else b""
        if len(data) > limit:
            raise RequestTooLarge(f"the request body is larger than {limit} bytes")
        try:
            return super().parse(io.BytesIO(data), media_type, parser_context)
        except RecursionError as exc:
            raise ParseError("JSON parse error - nested too deeply") from exc
