#!/bin/sh
# The images' entry point. MODE_TO_RUN (RunPod's dual-mode convention) picks the mode:
#   serverless (default)  the RunPod serverless worker (handler/handler.py)
#   http                  the self-hosted HTTP service (python -m handler.server; HOST, PORT)
set -eu
case "${MODE_TO_RUN:-serverless}" in
  http) exec python -u -m handler.server "$@" ;;
  serverless | "") exec python -u handler/handler.py "$@" ;;
  *) echo "MODE_TO_RUN must be 'serverless' or 'http' (got '${MODE_TO_RUN}')" >&2; exit 2 ;;
esac
