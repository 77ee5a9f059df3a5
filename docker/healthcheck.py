"""The image's HEALTHCHECK: exit 0 when this container's web process answers /api/health.

Liveness, not readiness: a web process that is up but still loading its model, or whose database
is down, is healthy (restarting it would not help; /api/ready tells the load balancer instead)."""

import os
import sys
import urllib.request

port = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000").rsplit(":", 1)[-1]
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", said in docker inspect's log
    print(f"unhealthy: {exc}")
    sys.exit(1)
