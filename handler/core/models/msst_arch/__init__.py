"""Checkpoint-compatible architectures of the MSST (Music-Source-Separation-Training) family.

Module names, parameter names and shapes follow the training repository's classes (as
audio-separator 0.47.1 ships them), so its public ``.ckpt`` state dicts load strictly; the
arithmetic is the same up to float rounding (tests/test_msst_equivalence.py).
"""
