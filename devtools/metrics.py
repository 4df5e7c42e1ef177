"""Signal comparisons for equivalence and quality checks."""

from __future__ import annotations

import numpy as np


def snr_db(ref: np.ndarray, est: np.ndarray) -> float:
    """Signal-to-noise ratio of ``est`` against ``ref`` in dB (inf when they are equal)."""
    ref64 = ref.astype(np.float64)
    noise = float(np.sum((ref64 - est) ** 2))
    signal = float(np.sum(ref64 ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))
