"""The self-hosted HTTP service: RunPod's job API and the predecessors' routes over the same
job flow as the RunPod handler and the CLI (``python -m handler.server``)."""
