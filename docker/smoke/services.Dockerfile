# Stand-ins for the official postgres, redis and nginx images that docker/compose.yml names, made
# from Debian's packages, for docker/smoke.sh on machines that reach no image registry. Same
# interface where compose uses it: POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB and a data folder
# at /var/lib/postgresql/data; redis-server as the command; nginx reading /etc/nginx/conf.d/.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS postgres
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data \
 && chown -R postgres /var/lib/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY docker/smoke/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
# The package makes the user; its number is whatever apt gives it.
# hadolint ignore=DL3066
USER postgres
ENTRYPOINT ["sh", "/usr/local/bin/postgres-entrypoint.sh"]

FROM ${BASE_IMAGE} AS redis
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis /data
WORKDIR /data
# hadolint ignore=DL3066
USER redis
CMD ["redis-server"]

FROM ${BASE_IMAGE} AS nginx
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default
CMD ["nginx", "-g", "daemon off;"]
