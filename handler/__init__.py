"""Vocal/instrumental separation worker: fetch → decode → separate → encode → store."""

__version__ = "0.1.0"
