# chatkit-flask service image.
#   docker build -t chatkit-flask .
#   docker compose up -d        (see docs/deploy.md)
#
# python:3.11-slim follows 3.11.x patch releases (security fixes) but never jumps to
# another minor version; pin a digest (python:3.11-slim@sha256:...) for byte-identical
# rebuilds. slim has no compiler: every dependency installs from a wheel, so there are
# no build tools to remove afterwards and no multi-stage build is needed.
FROM python:3.11-slim

# No .pyc writes (the root filesystem is read-only at run time anyway), logs unbuffered
# so they reach `docker logs` immediately, no pip cache, no pip self-update check.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Dependencies get their own layer, copied before the source, so code edits do not
# reinstall them. requirements.txt pins runtime AND test/tooling packages; the image
# installs everything EXCEPT the test/tooling packages named below (pytest and its plugins,
# fakeredis, lupa, hypothesis, pyyaml, ruff, playwright, schemathesis, profilers, moto, the
# example hosts' extensions: none is imported at run time; SQLAlchemy, psycopg and Alembic
# stay, for the PostgreSQL store and its migrate one-shot). An exclusion list is
# chosen over "keep only the # Runtime section" because it fails safe: a runtime
# dependency added anywhere in the file is always installed; the worst case is that a
# newly added test tool also lands in the image (bloat, not a broken service).
COPY requirements.txt ./
RUN grep -viE '^(pytest|pytest-timeout|fakeredis|lupa|hypothesis|pyyaml|ruff|playwright|schemathesis|pyinstrument|py-spy|flask-wtf|wtforms|flask-login|flask-sqlalchemy|moto|execnet)\b' \
        requirements.txt > /tmp/requirements-runtime.txt \
    && pip install --no-cache-dir -r /tmp/requirements-runtime.txt \
    && rm -f /tmp/requirements-runtime.txt

# Fixed uid/gid 10001 (not a system id, not 1000 - often a host user) so volume
# permissions and Kubernetes runAsUser/runAsNonRoot can rely on it. No home, no shell.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app \
    && mkdir -p /data && chown 10001:10001 /data && chmod 0700 /data \
    && ln -s /data /app/var
# /data: server mode's SQLite thread store (a named volume in docker-compose.yml, which
# copies this owner when it is first created). The only place the service writes. /app/var,
# the service's instance folder in a checkout, points there, so with CHATKIT_STORE_URL unset
# (plain `docker run`) threads land on /data too.

# Source last. Files stay owned by root and read-only for the service user: a
# compromised worker cannot modify the code it runs.
COPY chatkit_flask/ ./chatkit_flask/
COPY wsgi.py ./
COPY config/ ./config/
# The site's own code (CHATKIT_AGENT=my_agent:agent names site/my_agent.py): site/ is on the
# import path. Copy your modules there before `docker build`, or mount a folder over /app/site
# (docs/deploy.md, "Your own agent").
COPY site/ ./site/

USER 10001:10001

# gunicorn binds $HOST:$PORT (config/gunicorn.conf.py): 127.0.0.1 on a plain host, all
# interfaces here, where the loopback is unreachable from the proxy.
ENV HOST=0.0.0.0 \
    PYTHONPATH=/app/site
EXPOSE 8000

# Python only (the slim image has no curl). /readyz answers non-2xx when the service
# cannot serve (urlopen raises, exit code 1). docker-compose.yml repeats this check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/readyz', timeout=2)"]

# Exec form: gunicorn is PID 1 and receives docker stop's SIGTERM itself (graceful
# shutdown within GUNICORN_GRACEFUL_TIMEOUT).
CMD ["gunicorn", "-c", "config/gunicorn.conf.py", "wsgi:app"]
