"""Deterministic synthetic songs with known stems (tests, bench, demo, samples), and writers.

A harmonic "voice" (vibrato melody, vowel formants, syllable envelope, a little breath noise)
panned centre over synthesized drums, bass and chords. Everything is vectorised numpy, so ten
seconds take well under a second to build.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

BPM = 112.0
# Vowel formants (Hz, bandwidth Hz, gain): roughly /a/, /e/, /i/, /o/, /u/.
_VOWELS = np.array([
    [[800, 80, 1.0], [1150, 90, 0.5], [2900, 120, 0.25]],
    [[400, 60, 1.0], [1700, 100, 0.4], [2600, 120, 0.3]],
    [[300, 50, 1.0], [2300, 100, 0.4], [3000, 120, 0.3]],
    [[450, 70, 1.0], [800, 80, 0.6], [2830, 100, 0.15]],
    [[325, 50, 1.0], [700, 60, 0.4], [2530, 100, 0.1]],
], dtype=np.float64)
# Chord progression as semitones above A2 (110 Hz): Am, F, C, G.
_CHORDS = [(0, 3, 7), (-4, 0, 3), (3, 7, 10), (-2, 2, 5)]
_SCALE = np.array([0, 2, 3, 5, 7, 8, 10, 12, 14, 15])  # A natural minor, from A3 (220 Hz)


def _semitones(hz: float, st: np.ndarray | float) -> np.ndarray:
    return hz * 2.0 ** (np.asarray(st, dtype=np.float64) / 12.0)


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average over ``width`` samples (edge values held), via cumsum."""
    width = max(1, int(width))
    padded = np.concatenate([np.full(width, x[0]), x, np.full(width, x[-1])])
    c = np.cumsum(padded)
    avg = (c[width:] - c[:-width]) / width
    start = width - width // 2
    return avg[start:start + len(x)]


def _harmonic_sum(phase: np.ndarray, amps: list, hop: int = 1) -> np.ndarray:
    """sum_k amps[k] * sin((k + 1) * phase). An array amplitude holds one value per ``hop``
    samples (piecewise constant). Harmonics come from complex rotation, cheaper than sin."""
    n = len(phase)
    m = -(-n // hop)
    z1 = np.exp(1j * np.pad(phase, (0, m * hop - n))).astype(np.complex64).reshape(m, hop)
    z = z1.copy()
    out = np.zeros((m, hop), np.float32)
    for amp in amps:
        a = np.asarray(amp, np.float32)
        out += (a[:, None] if a.ndim else a) * z.imag
        z *= z1
    return out.reshape(-1)[:n].astype(np.float64)


def _voice(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    beat = 60.0 / BPM
    # Notes of 1-2 beats, with a short rest between phrases every 4 notes.
    lengths = rng.choice([0.5, 1.0, 1.0, 1.5, 2.0], size=int(n / sr / beat / 0.5) + 8) * beat
    starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
    starts = starts[starts < n / sr]  # the first note always starts at 0
    degrees = np.clip(np.cumsum(rng.integers(-2, 3, size=len(starts))) + 4, 0, len(_SCALE) - 1)
    idx = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(starts) - 1)
    pitch = _SCALE[degrees][idx].astype(np.float64)  # semitones over 220 Hz: 220-460 Hz
    pitch = _smooth(pitch, 0.04 * sr)  # portamento between notes
    vibrato = 0.35 * np.sin(2 * np.pi * 5.5 * t + rng.uniform(0, 2 * np.pi))
    vibrato *= np.clip((t - starts[idx]) / 0.3, 0, 1)  # vibrato grows into each note
    f0 = _semitones(220.0, pitch + vibrato)
    phase = 2 * np.pi * np.cumsum(f0) / sr

    # Syllable envelope: attack, sustain with slow decay, release before the next note.
    into = t - starts[idx]
    dur = np.append(np.diff(starts), n / sr - starts[-1])[idx]
    env = np.clip(into / 0.04, 0, 1) * np.exp(-0.6 * into) * np.clip((dur - into) / 0.08, 0, 1)
    rest = (np.arange(len(starts)) % 4 == 3)[idx] & (into > 0.5 * dur)  # phrase breaths
    env = np.where(rest, 0.0, env)
    env = _smooth(env, 0.01 * sr)

    # Harmonic gains vary slowly: evaluate them once per 32-sample block.
    hop = 32
    coarse = np.arange(0, n, hop)
    # Formants glide between one vowel per note.
    vowel = rng.integers(0, len(_VOWELS), size=len(starts))
    formants = _VOWELS[vowel][idx[coarse]]  # (m, 3, 3)
    for k in range(3):
        for j in range(2):
            formants[:, k, j] = _smooth(formants[:, k, j], 0.06 * sr / hop)
    ks = np.arange(1, int(9000 / 220) + 1)[:, None]
    fk = ks * f0[coarse]  # (K, m)
    gain = np.zeros_like(fk)
    for j in range(3):
        fc, bw, g = (formants[:, j, i] for i in range(3))
        gain += g / (1.0 + ((fk - fc) / bw) ** 2)  # resonance bump per formant
    gain = (gain + 0.02) / ks ** 0.6  # glottal tilt + floor so upper harmonics exist
    gain[fk > 0.45 * sr] = 0.0
    out = _harmonic_sum(phase, list(gain), hop)
    # Breath/sibilance: high-passed noise at note onsets.
    noise = np.diff(rng.standard_normal(n + 1))
    out += 0.15 * noise * np.exp(-into / 0.03) * (into < 0.1)
    return out * env


def _events(n: int, sr: int, times: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Place one-shot ``hit`` at each time (seconds), summing overlaps."""
    out = np.zeros(n + len(hit))
    for s in (times * sr).astype(int):
        if s < n:
            out[s:s + len(hit)] += hit
    return out[:n]


def _drums(n: int, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    beat = 60.0 / BPM
    beats = np.arange(0, n / sr, beat)
    tk = np.arange(int(0.35 * sr)) / sr
    sweep = 50 * tk + 100 * 0.04 * (1 - np.exp(-tk / 0.04))  # 150 Hz falling to 50 Hz
    kick = np.sin(2 * np.pi * sweep) * np.exp(-tk / 0.12)
    ts = np.arange(int(0.25 * sr)) / sr
    snare_noise = rng.standard_normal(len(ts))
    snare_noise = snare_noise - _smooth(snare_noise, 8)  # keep the upper band
    snare = (0.6 * snare_noise * np.exp(-ts / 0.06)
             + 0.5 * np.sin(2 * np.pi * 185 * ts) * np.exp(-ts / 0.05))
    th = np.arange(int(0.06 * sr)) / sr
    hat = np.diff(np.diff(rng.standard_normal(len(th) + 2))) * 0.25 * np.exp(-th / 0.015)
    kicks = _events(n, sr, beats[0::2], kick) + _events(n, sr, beats[3::8] + beat / 2, 0.7 * kick)
    snares = _events(n, sr, beats[1::2], snare)
    hats = _events(n, sr, np.arange(0, n / sr, beat / 2), hat)
    centre = 0.9 * kicks + 0.5 * snares
    return centre + 0.35 * hats * 0.8, centre + 0.35 * hats * 1.2  # hats panned slightly right


def _bass_and_chords(n: int, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(n) / sr
    bar = 4 * 60.0 / BPM
    order = rng.permutation(len(_CHORDS))
    chord_idx = order[(t // bar).astype(int) % len(_CHORDS)]
    beat_pos = (t % (60.0 / BPM))
    pluck = np.exp(-beat_pos / 0.25)  # chords re-struck every beat

    roots = np.array([c[0] for c in _CHORDS])[chord_idx]
    f_bass = _semitones(55.0, roots)
    ph = 2 * np.pi * np.cumsum(f_bass) / sr
    bass = _harmonic_sum(ph, [1 / k for k in range(1, 7)]) * (0.4 + 0.6 * pluck)

    chords = np.zeros(n)
    for v in range(3):
        f = _semitones(220.0, np.array([c[v] for c in _CHORDS])[chord_idx])
        ph = 2 * np.pi * np.cumsum(f) / sr
        chords += _harmonic_sum(ph + v, [0.6 ** k for k in range(1, 9)])
    chords *= 0.15 + 0.85 * pluck
    return 0.35 * bass + 0.18 * chords * 1.3, 0.35 * bass + 0.18 * chords * 0.7


def make_mixture(seconds: float, seed: int = 0, sr: int = 44100) -> dict[str, np.ndarray]:
    """{"mixture", "vocals", "instrumental"}: float32 (2, n) with mixture = vocals + instrumental
    exactly (summed in float32) and the mixture's peak at 0.9."""
    n = max(1, round(seconds * sr))
    rng = np.random.default_rng(seed)
    voice = _voice(n, sr, rng)
    drums_l, drums_r = _drums(n, sr, rng)
    keys_l, keys_r = _bass_and_chords(n, sr, rng)
    vocals = np.stack([voice, voice])
    inst = np.stack([drums_l + keys_l, drums_r + keys_r])
    # Vocals about as loud as the band (RMS), so the mixture's SDR is near 0 dB for either stem.
    v_rms = np.sqrt(np.mean(vocals ** 2)) + 1e-12
    i_rms = np.sqrt(np.mean(inst ** 2)) + 1e-12
    vocals *= i_rms / v_rms
    peak = np.abs(vocals + inst).max()
    scale = 0.9 / peak if peak > 0 else 1.0
    vocals32 = (vocals * scale).astype(np.float32)
    inst32 = (inst * scale).astype(np.float32)
    return {"mixture": vocals32 + inst32, "vocals": vocals32, "instrumental": inst32}


def write_audio(path: Path, audio: np.ndarray, rate: int = 44100, fmt: str | None = None,
                subtype: str | None = None) -> int:
    """Write (channels, n) float audio as ``fmt`` (default: the path's suffix): MP3 through the
    worker's own gapless writer, WAV/FLAC through soundfile. Returns the number of samples."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt == "mp3":
        from handler.core.encode import open_writer

        writer = open_writer(path, "mp3", rate, audio.shape[0], 192)
        writer.write(audio)
        writer.close()
    else:
        import soundfile as sf

        sf.write(str(path), audio.T, rate, format=fmt.upper(), subtype=subtype)
    return audio.shape[1]


def audio_bytes(audio: np.ndarray, rate: int = 44100, fmt: str = "wav",
                subtype: str | None = None) -> bytes:
    """(channels, n) float audio as the bytes of a WAV/FLAC file."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio.T, rate, format=fmt.upper(), subtype=subtype)
    return buf.getvalue()
