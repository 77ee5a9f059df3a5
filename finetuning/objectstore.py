"""The bucket behind MODEL_STORE_URL: the only module that talks to boto3.

Names here are paths relative to the model store ("versions/x/manifest.json");
the bucket's prefix is added and removed here, so nothing else needs to know it.
Credentials come from boto3's own chain (AWS_ACCESS_KEY_ID and friends, a profile,
an instance role), never from settings.
"""

import logging
import os
import threading
from contextlib import contextmanager
from urllib.parse import urlparse

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)


class ObjectStoreError(Exception):
    """The bucket could not be read or written; the log has the server's answer."""


def _is_missing(exc):
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 404 or exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class Bucket:
    def __init__(self, url, endpoint_url=""):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
            raise ImproperlyConfigured(f"MODEL_STORE_URL must look like s3://bucket/optional/prefix, not {url!r}")
        self.name = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint_url = endpoint_url or None
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Plain retries with backoff: a brief outage of the bucket should not fail a job's upload.
            config = Config(retries={"max_attempts": 5, "mode": "standard"}, **self._compatible())
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def _compatible(self):
        """Checksums only where S3 requires them, for servers other than AWS: botocore 1.36 and
        later add new checksum headers to every upload, which some S3-compatible servers (Cloud
        Storage's interoperability API among them) refuse."""
        import botocore

        major, minor = (int(part) for part in botocore.__version__.split(".")[:2])
        if self.endpoint_url is None or (major, minor) < (1, 36):
            return {}
        return {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}

    def reachable(self, *, timeout):
        """Says "ok" when the bucket answers within about ``timeout`` seconds, else why not (the
        server's answer goes to the log). One attempt, on a client of its own: for a probe."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        config = Config(
            connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1}, **self._compatible()
        )
        client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
        try:
            client.head_bucket(Bucket=self.name)
        except (BotoCoreError, ClientError) as exc:
            logger.error("Readiness: bucket %s does not answer: %s", self.name, exc)
            return "the model store's bucket does not answer (the log says why)"
        return "ok"

    def key(self, name):
        return f"{self.prefix}/{name}" if self.prefix else name

    @contextmanager
    def _failing(self, what, name, *, missing=None):
        """Turn boto3's errors into ObjectStoreError (the detail goes to the log, with the
        bucket and key: a client sees only the store path). A missing object raises
        _Missing when ``missing`` is set, for the caller to answer None or False."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            if missing and _is_missing(exc):
                raise _Missing from exc
            logger.exception("Object store: %s %s in bucket %s failed", what, self.key(name), self.name)
            raise ObjectStoreError(f"the object store could not {what} {name} (the server log says why)") from exc

    def read(self, name):
        """The object's bytes, or None when there is no such object."""
        try:
            with self._failing("read", name, missing=True):
                return self.client.get_object(Bucket=self.name, Key=self.key(name))["Body"].read()
        except _Missing:
            return None

    def exists(self, name):
        try:
            with self._failing("find", name, missing=True):
                self.client.head_object(Bucket=self.name, Key=self.key(name))
                return True
        except _Missing:
            return False

    def upload(self, path, name):
        with self._failing("write", name):
            self.client.upload_file(str(path), self.name, self.key(name))

    def download(self, name, path):
        """Write the object to ``path``; False when there is no such object."""
        try:
            with self._failing("read", name, missing=True):
                self.client.download_file(self.name, self.key(name), str(path))
                return True
        except _Missing:
            return False

    def names(self, prefix=""):
        """Every object name under ``prefix`` (a store path ending in "/", or "" for all)."""
        root = f"{self.prefix}/" if self.prefix else ""
        with self._failing("list", prefix or "the bucket"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=root + prefix)
            return [item["Key"][len(root) :] for page in pages for item in page.get("Contents", [])]

    def delete(self, names):
        names = list(names)
        for start in range(0, len(names), 1000):  # the most one DeleteObjects request takes
            chunk = names[start : start + 1000]
            with self._failing("delete", chunk[0]):
                answer = self.client.delete_objects(
                    Bucket=self.name, Delete={"Objects": [{"Key": self.key(name)} for name in chunk]}
                )
            if answer.get("Errors"):
                logger.error("Object store: deleting from bucket %s failed: %s", self.name, answer["Errors"])
                raise ObjectStoreError(f"the object store could not delete {chunk[0]} (the server log says why)")


class _Missing(Exception):
    pass


_buckets = {}
_lock = threading.Lock()


def bucket():
    """The configured bucket, or None when MODEL_STORE_URL is empty (a filesystem-only store)."""
    url = settings.MODEL_STORE_URL
    if not url:
        return None
    # One client per process: a client made before a worker forks must not be shared with the child.
    key = (url, settings.MODEL_STORE_ENDPOINT_URL, os.getpid())
    with _lock:
        if key not in _buckets:
            _buckets[key] = Bucket(url, settings.MODEL_STORE_ENDPOINT_URL)
        return _buckets[key]
