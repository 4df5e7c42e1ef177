#!/usr/bin/env bash
# README command 1: set up, then run the main job end to end offline on the embedded defaults:
# a local S3 server (moto) on 127.0.0.1, a generated song uploaded to it, the worker's handler
# fetching it by presigned URL, separating with the packaged model (spleeter_2stems) and
# uploading a mono MP3 instrumental to the bucket. Prints the result URL and a local copy.
source "$(dirname "$0")/env.sh"
python scripts/demo.py "$@"
