#!/usr/bin/env bash
# Sets up what bench/server.py compares ours with: OpenAI's official self-hosted ChatKit server
# sample, openai-chatkit-advanced-samples examples/customer-support/backend (FastAPI + uvicorn,
# in-memory store, an Agents SDK agent with function tools and a title agent), UNMODIFIED, at
# $SAMPLES_REV, with exactly its uv.lock (`uv sync --frozen`, as its README's `uv sync`), under
# /tmp/peer (never committed). Idempotent.
#   MIRROR=<git dir of github:openai/openai-chatkit-advanced-samples> bench/setup_official.sh
# (the search tool's `fetch` prints one; `git clone --bare` of the repository does too).
# Needs the package index (uv and the sample's locked dependencies) and python3 on PATH.
set -eu
peer=/tmp/peer
rev=${SAMPLES_REV:-9da76b6}
backend=$peer/official/examples/customer-support/backend
venv=$peer/official-venv-customer-support

if [ ! -d $peer/official/.git ]; then
  [ -d "${MIRROR:-}" ] || { echo "set MIRROR to a git directory of openai/openai-chatkit-advanced-samples"; exit 1; }
  mkdir -p $peer
  git clone -q "$MIRROR" $peer/official
fi
git -C $peer/official -c advice.detachedHead=false checkout -q "$rev"
[ -f "$backend/uv.lock" ] || { echo "no $backend/uv.lock at $rev"; exit 1; }

# uv, the samples' tool, in its own venv; its cache under /tmp/peer; python from PATH
[ -x $peer/uv-venv/bin/uv ] || { python3 -m venv $peer/uv-venv && $peer/uv-venv/bin/pip install -q uv; }
if ! "$venv/bin/python" -c "import chatkit, agents, fastapi, uvicorn" 2>/dev/null; then
  (cd "$backend" && UV_CACHE_DIR=$peer/uv-cache UV_PROJECT_ENVIRONMENT=$venv UV_PYTHON_DOWNLOADS=never \
     UV_PYTHON=$(command -v python3) $peer/uv-venv/bin/uv sync --frozen --quiet)
fi
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
print("official sample deps:", ", ".join(f"{p} {version(p)}" for p in
      ["openai-chatkit", "openai-agents", "openai", "fastapi", "starlette", "uvicorn", "uvloop", "pydantic"]))
PY
# CURRENT_SDKS=1: the same unmodified sample on the SDKs ours uses (its lock pins older ones), to
# tell the sample's own cost from SDK versions: bench/server.py --official-python
# /tmp/peer/chatkit-venv/bin/python. agents 0.24 needs starlette>=1.3, so fastapi/uvicorn move too.
if [ "${CURRENT_SDKS:-0}" = 1 ]; then
  latest=$peer/chatkit-venv
  [ -x $latest/bin/python ] || python3 -m venv $latest
  $latest/bin/python -c "import chatkit, agents, fastapi, uvicorn, uvloop" 2>/dev/null ||
    $latest/bin/pip install -q "openai-chatkit==1.6.5" "openai-agents==0.24.0" "openai==3.57.0" \
      "pydantic==2.14.4" "fastapi==0.165.0" "starlette==1.10.0" "uvicorn[standard]==0.54.0" "httpx==0.28.1"
  echo "current SDKs: $latest/bin/python"
fi
echo "ready: $backend (python $venv/bin/python); bench/server.py uses these paths by default"
