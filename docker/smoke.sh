#!/usr/bin/env bash
# Build the images and run the compose stack as an operator would, then check what users meet:
# health and readiness, a generation through nginx, a short fine-tuning job started through the
# API and its version served, and that version exported into the serving image, which must start
# without PostgreSQL, Redis or Celery and write the same text. Prints image sizes and the serving
# image's cold start (container start -> first streamed token). Tears everything down at the end.
#
#   bash docker/smoke.sh            (about 15 minutes on 2 cores, most of it the first build)
#
# Needs a Docker engine (BuildKit) and Compose (`docker compose` or docker-compose 1.29+).
# Environment (all optional):
#   BASE_IMAGE      base of every image (default python:3.11-slim); on a machine that reaches no
#                   registry, one made from Debian's packages (see docs/OPERATIONS.md, "Images")
#   SMOKE_OFFLINE=1 no image registry: build stand-ins for postgres, redis and nginx from
#                   BASE_IMAGE (docker/smoke/services.Dockerfile), use the host's network
#                   (docker/compose.smoke.yml), and take torch from a local wheel instead of
#                   PyTorch's index (TORCH_WHEEL, or the torch-2.13.0 wheel in PIP_FIND_LINKS)
#   PIP_CERT        a CA bundle pip needs (a build secret: never in a layer)
#   DOCKER          the docker client to build with (default: docker)
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
OFFLINE=${SMOKE_OFFLINE:-0}
PROJECT=genapi-smoke
TAG=smoke
WEB_PORT=${SMOKE_WEB_PORT:-8000}
SERVING_PORT=${SMOKE_SERVING_PORT:-8001}
started=$(date +%s)

say() { printf '[smoke %4ss] %s\n' "$(($(date +%s) - started))" "$*"; }
fail() { say "FAILED: $*"; exit 1; }

if $DOCKER compose version >/dev/null 2>&1; then
  compose_cmd=("$DOCKER" compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
else
  fail "no Compose: install the compose plugin or docker-compose"
fi
$DOCKER info >/dev/null 2>&1 || fail "no Docker engine answers ($DOCKER info)"

export SECRET_KEY=${SECRET_KEY:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')}
export POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}
export GENAPI_ADMIN_PASSWORD=${GENAPI_ADMIN_PASSWORD:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(16))')}
export GENAPI_IMAGE=genapi:$TAG BASE_IMAGE COMPOSE_PROJECT_NAME=$PROJECT
export SMOKE_WEB_PORT=$WEB_PORT
files=(-f docker/compose.yml)
build=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -n "${PIP_CERT:-}" ] && build+=(--secret "id=pip_cert,src=$PIP_CERT")
if [ "$OFFLINE" = 1 ]; then
  files+=(-f docker/compose.smoke.yml)
  build+=(--network host --build-arg TORCH_INDEX=)
  wheel=${TORCH_WHEEL:-$(ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-2.13.0*cp311*.whl 2>/dev/null | head -1 || true)}
  [ -n "$wheel" ] || fail "SMOKE_OFFLINE=1 needs TORCH_WHEEL (a torch==2.13.0 CPU wheel)"
  cp -u "$wheel" docker/wheels/
fi
compose() { "${compose_cmd[@]}" "${files[@]}" "$@"; }
if [ "$OFFLINE" = 1 ]; then
  # Host networking publishes nothing: Compose 1.x refuses `ports` beside it, and an override can
  # only add to a list. Run the merged configuration without them (it holds the secrets: 0600).
  merged=$(mktemp --suffix=.yml)
  compose config > "$merged"
  python3 - "$merged" <<'EOF_PY'
import sys

import yaml

path = sys.argv[1]
config = yaml.safe_load(open(path))
for service in config["services"].values():
    if service.get("network_mode") == "host":
        service.pop("ports", None)
yaml.safe_dump(config, open(path, "w"), sort_keys=False)
EOF_PY
  files=(-f "$merged")
fi

serving_container=$PROJECT-serving
cleanup() {
  local status=$?
  say "tearing down"
  $DOCKER rm -f "$serving_container" >/dev/null 2>&1 || true
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "var/serving/$PROJECT"
  [ -z "${merged:-}" ] || rm -f "$merged"
  exit $status
}
trap cleanup EXIT

export DOCKER_BUILDKIT=1
say "building genapi:$TAG from $BASE_IMAGE"
$DOCKER build -q "${build[@]}" -f docker/Dockerfile -t "genapi:$TAG" . >/dev/null
if [ "$OFFLINE" = 1 ]; then
  for service in postgres redis nginx; do
    say "building the stand-in genapi-smoke-$service"
    $DOCKER build -q "${build[@]}" -f docker/smoke/services.Dockerfile --target "$service" -t "genapi-smoke-$service" . >/dev/null
  done
fi

say "starting the stack"
compose up -d --no-build
for _ in $(seq 120); do
  state=$($DOCKER inspect -f '{{.State.Health.Status}}' "$(compose ps -q web)" 2>/dev/null || echo starting)
  [ "$state" = healthy ] && break
  sleep 5
done
[ "$state" = healthy ] || { compose logs --tail 40 setup web; fail "web is $state"; }
say "web is healthy"

api="http://127.0.0.1:$WEB_PORT"
ready=""
for _ in $(seq 60); do
  ready=$(curl -s "$api/api/ready" || true)
  case "$ready" in *'"ready":true'*) break ;; esac
  sleep 5
done
case "$ready" in *'"ready":true'*) say "ready: $ready" ;; *) fail "not ready: $ready" ;; esac

key=$(compose exec -T web python manage.py apikey create --name smoke --owner admin --scopes all | grep -o 'gk_[A-Za-z0-9_-]*' | head -1)
[ -n "$key" ] || fail "no API key was made"
auth=(-H "Authorization: Bearer $key" -H "Content-Type: application/json")

if [ "$OFFLINE" = 1 ]; then proxy=https://127.0.0.1; else proxy=https://127.0.0.1:${HTTPS_PORT:-8443}; fi
say "generating through nginx ($proxy)"
body='{"product": {"name": "Trail Running Shoe", "category": "Shoes", "color": "blue"}, "max_new_tokens": 24, "temperature": 0}'
answer=$(curl -sk --fail-with-body "${auth[@]}" -d "$body" "$proxy/api/generate") || fail "generate: $answer"
say "generated: $answer"
headers=$(curl -sk -o /dev/null -D - "${auth[@]}" -H "X-Request-ID: smoke-$started" -d "$body" "$proxy/api/generate")
echo "$headers" | grep -qi "^x-request-id: smoke-$started" || fail "X-Request-ID did not come back: $headers"
lines=$(compose logs --no-color web | grep -c "\"request_id\": \"smoke-$started\"" || true)
[ "$lines" -gt 0 ] || fail "no log line of web carries the request id smoke-$started"
say "request id smoke-$started: returned, and in $lines JSON log lines of web"
[ "$(curl -sk -o /dev/null -w '%{http_code}' "$proxy/metrics")" = 404 ] || fail "nginx passes /metrics to the outside"
scrape=$(curl -s "$api/metrics")
for metric in genapi_http_requests_total genapi_generated_tokens_total genapi_time_to_first_token_seconds_count genapi_jobs; do
  echo "$scrape" | grep -q "^$metric" || fail "/metrics has no $metric"
done
say "/metrics: $(echo "$scrape" | grep -c '^genapi_') genapi series; $(echo "$scrape" | grep '^genapi_generated_tokens_total' | head -1)"

say "a short fine-tuning job through the API"
compose exec -T web python manage.py load_examples --dataset smoke >/dev/null
job=$(curl -s --fail-with-body "${auth[@]}" -d '{"dataset": "smoke", "hyperparameters": {"max_steps": 3, "batch_size": 2, "max_seq_length": 128}}' "$api/api/jobs") \
  || fail "job start: $job"
job_id=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["id"])' "$job")
for _ in $(seq 120); do
  job=$(curl -s "${auth[@]}" "$api/api/jobs/$job_id")
  status=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["status"])' "$job")
  case "$status" in succeeded|failed|cancelled) break ;; esac
  sleep 5
done
[ "$status" = succeeded ] || { compose logs --tail 40 worker; fail "job $job_id is $status: $job"; }
version=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["model_version"]["name"])' "$job")
say "job $job_id succeeded: version $version"
curl -s --fail "${auth[@]}" "$api/api/models" | grep -q "\"$version\"" || fail "$version is not in /api/models"
body="{\"product\": {\"name\": \"Trail Running Shoe\", \"category\": \"Shoes\", \"color\": \"blue\"}, \"max_new_tokens\": 24, \"temperature\": 0, \"model_version\": \"$version\"}"
full=$(curl -s --fail-with-body "${auth[@]}" -d "$body" "$api/api/generate") || fail "generate with $version: $full"
say "$version generated: $full"

say "exporting $version into the serving image"
compose exec -T web python manage.py export_serving "$version" --output "/var/lib/genapi/serving-$PROJECT" >/dev/null
mkdir -p var/serving
$DOCKER cp "$(compose ps -q web):/var/lib/genapi/serving-$PROJECT" "var/serving/$PROJECT"
$DOCKER build -q "${build[@]}" -f docker/Dockerfile --target serving \
  --build-arg "SERVING_ARTIFACT=var/serving/$PROJECT" -t "genapi-serving:$TAG" . >/dev/null
for image in "genapi:$TAG" "genapi-serving:$TAG"; do
  say "image $image: $(($($DOCKER image inspect -f '{{.Size}}' "$image") / 1000000)) MB (base $BASE_IMAGE included)"
done

# Cold start: from `docker run` to the first streamed token, no database server, broker or worker.
serving=(--name "$serving_container" -e SECRET_KEY -e SECURE_SSL_REDIRECT=false -e "SERVING_API_KEYS=$key")
if [ "$OFFLINE" = 1 ]; then
  serving+=(--network host -e "GUNICORN_BIND=127.0.0.1:$SERVING_PORT")
  serving_api=http://127.0.0.1:$SERVING_PORT
else
  serving+=(-p "127.0.0.1:$SERVING_PORT:8000")
  serving_api=http://127.0.0.1:$SERVING_PORT
fi
stream_body="${body%\}}, \"stream\": true}"
begun=$(date +%s.%N)
$DOCKER run -d "${serving[@]}" "genapi-serving:$TAG" >/dev/null
first=""
for _ in $(seq 600); do
  first=$(curl -sN --max-time 60 "${auth[@]}" -d "$stream_body" "$serving_api/api/generate" 2>/dev/null | head -c 200 || true)
  case "$first" in *data:*) break ;; esac
  sleep 0.1
done
cold=$(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$begun")
case "$first" in *data:*) ;; *) $DOCKER logs --tail 40 "$serving_container"; fail "the serving image never streamed a token" ;; esac
say "serving image cold start (docker run -> first streamed token): $cold s"
served=$(curl -s --fail-with-body "${auth[@]}" -d "$body" "$serving_api/api/generate") || fail "serving generate: $served"
python3 - "$full" "$served" <<'EOF' || fail "the serving image wrote other text than the full service"
import json, sys
full, served = (json.loads(text) for text in sys.argv[1:])
text = [choice["text"] for choice in served["choices"]]
assert [choice["text"] for choice in full["choices"]] == text, (full["choices"], served["choices"])
assert full["model_version"]["name"] == served["model_version"]["name"], (full["model_version"], served["model_version"])
print(f"[smoke] the serving image and the full service wrote the same for {served['model_version']['name']}: {text[0]!r}")
EOF
for service in worker evaluator scheduler; do
  for _ in $(seq 40); do
    state=$($DOCKER inspect -f '{{.State.Health.Status}}' "$(compose ps -q $service)")
    [ "$state" = starting ] || break
    sleep 5
  done
  [ "$state" = healthy ] || fail "$service is $state"
done
say "worker, evaluator and scheduler are healthy (Celery's ping)"
say "serving container's memory after its requests: $($DOCKER stats --no-stream --format '{{.MemUsage}}' "$serving_container")"
say "all checks passed"
