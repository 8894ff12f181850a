"""Audio front end for the Whisper encoder: WAV loading, resampling and Whisper's log-mel features.

`log_mel_spectrogram` reproduces `WhisperFeatureExtractor._torch_extract_fbank_features` (HF
transformers) op for op. Only torch, numpy and the standard library are used.
"""
from __future__ import annotations

import functools
import io
import math
import struct
import wave
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from autoglm_fast.config import AudioConfig

_MAX_CHANNELS = 8


# ---- log-mel features ------------------------------------------------------------------------
def _hz_to_mel(f: np.ndarray) -> np.ndarray:  # slaney: linear below 1 kHz, log above
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), 3.0 * f / 200.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), 200.0 * m / 3.0)


@functools.lru_cache(maxsize=8)
def _mel_filter_bank(n_freqs: int, n_mels: int, sampling_rate: int) -> torch.Tensor:
    mel_max = _hz_to_mel(np.array(sampling_rate / 2, dtype=np.float64))
    hz = _mel_to_hz(np.linspace(0.0, mel_max, n_mels + 2))  # filter edges / centres
    fft_freqs = np.linspace(0, sampling_rate // 2, n_freqs)  # HF uses integer Nyquist here
    slopes = hz[None, :] - fft_freqs[:, None]
    down, up = -slopes[:, :-2] / np.diff(hz)[:-1], slopes[:, 2:] / np.diff(hz)[1:]
    fb = np.maximum(0.0, np.minimum(down, up)) * (2.0 / (hz[2:] - hz[:-2]))  # slaney area norm
    return torch.from_numpy(fb).float()


def mel_filter_bank(config: AudioConfig) -> torch.Tensor:
    """Slaney mel filters [n_fft // 2 + 1, num_mel_bins], 0 Hz to Nyquist (as Whisper)."""
    return _mel_filter_bank(config.n_fft // 2 + 1, config.num_mel_bins, config.sampling_rate).clone()


def log_mel_spectrogram(waveform: torch.Tensor, config: AudioConfig) -> torch.Tensor:
    """Whisper log-mel of [T] or [B, T] waveforms -> [..., num_mel_bins, 2 * max_source_positions].

    Each clip is zero-padded / truncated to `config.chunk_samples`; the dynamic-range clamp (max - 8) is
    per clip, so a batch gives what each clip gives alone (to rounding: BLAS may
    pick another kernel for the batched shape).
    """
    if waveform.dim() not in (1, 2):
        raise ValueError(f"audio waveform must be [T] or [B, T], got shape {tuple(waveform.shape)}")
    x = waveform.float()
    n = config.chunk_samples
    x = torch.nn.functional.pad(x, (0, n - x.shape[-1])) if x.shape[-1] < n else x[..., :n]
    window = torch.hann_window(config.n_fft, device=x.device)
    stft = torch.stft(x, config.n_fft, config.hop_length, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # Whisper drops the last frame
    fb = _mel_filter_bank(config.n_fft // 2 + 1, config.num_mel_bins, config.sampling_rate)
    mel = fb.to(x.device).T @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


# ---- WAV decoding ----------------------------------------------------------------------------
def _riff_wav(data: bytes) -> tuple[int, int, int, int, bytes]:
    """(format tag, channels, rate, bits, sample bytes) from RIFF chunks; for what `wave` rejects."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("audio: not a WAV (RIFF/WAVE) file; only WAV is supported")
    fmt, samples, pos = None, None, 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt " and len(body) >= 16:
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: real tag opens the GUID
                fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
        elif cid == b"data":
            samples = body
        pos += 8 + size + (size & 1)  # chunks are word aligned
    if fmt is None or samples is None:
        raise ValueError("audio: WAV file has no 'fmt ' or 'data' chunk (corrupt?)")
    tag, channels, rate, _, _, bits = fmt
    return tag, channels, rate, bits, samples


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """WAV bytes -> (float32 samples [T, C] in [-1, 1], rate)."""
    try:
        with wave.open(io.BytesIO(data)) as w:  # PCM (format tag 1)
            tag, channels, rate, bits = 1, w.getnchannels(), w.getframerate(), 8 * w.getsampwidth()
            samples = w.readframes(w.getnframes())
    except (wave.Error, EOFError, struct.error):
        tag, channels, rate, bits, samples = _riff_wav(data)
    if channels < 1 or rate < 1:
        raise ValueError(f"audio: invalid WAV header ({channels} channels, {rate} Hz)")
    width = bits // 8
    samples = samples[:len(samples) // (width * channels) * width * channels] if width else b""
    if tag == 3 and bits in (32, 64):  # IEEE float
        x = np.frombuffer(samples, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    elif tag == 1 and bits == 8:  # 8-bit PCM is unsigned
        x = (np.frombuffer(samples, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == 1 and bits in (16, 32):
        x = np.frombuffer(samples, dtype=f"<i{width}").astype(np.float32) / float(2 ** (bits - 1))
    elif tag == 1 and bits == 24:
        b = np.frombuffer(samples, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = ((v << 8) >> 8).astype(np.float32) / float(2 ** 23)  # sign-extend 24 -> 32 bits
    else:
        raise ValueError(f"audio: unsupported WAV encoding (format tag {tag}, {bits} bits); "
                         "use PCM 8/16/24/32-bit or 32/64-bit float")
    if x.size == 0:
        raise ValueError("audio: WAV file contains no samples")
    return x.reshape(-1, channels), rate


# ---- resampling ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, width_zc: int = 6, rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    """Hann-windowed sinc polyphase kernel [new, 1, K] (torchaudio's `_get_sinc_resample_kernel`)."""
    base = min(orig, new) * rolloff  # cutoff a bit below the lower Nyquist to leave room for the roll-off
    width = math.ceil(width_zc * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx) * base
    t = t.clamp(-width_zc, width_zc)
    window = torch.cos(t * math.pi / width_zc / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    return kernel.float(), width


def resample(x: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling of [..., T] from `orig_rate` to `new_rate` (output length ceil(T * new / orig))."""
    if orig_rate == new_rate:
        return x
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    if new * (orig + 2 * math.ceil(6 * orig / min(orig, new))) > 2 ** 24:  # kernel would be huge
        raise ValueError(f"audio: cannot resample {orig_rate} -> {new_rate} Hz (reduced ratio {orig}:{new} "
                         "is too fine); convert to a common rate such as 16000 or 48000 first")
    kernel, width = _sinc_kernel(orig, new)
    shape, length = x.shape, x.shape[-1]
    y = torch.nn.functional.pad(x.reshape(-1, 1, length).float(), (width, width + orig))
    y = torch.nn.functional.conv1d(y, kernel.to(y.device), stride=orig)  # [N, new, frames]: one row per phase
    y = y.transpose(1, 2).reshape(y.shape[0], -1)[:, :math.ceil(new * length / orig)]
    return y.reshape(*shape[:-1], -1)


# ---- loading ---------------------------------------------------------------------------------
def _array_samples(source: Any) -> np.ndarray:
    """numpy / torch samples -> float32 [T, C]; integer PCM dtypes are scaled to [-1, 1]."""
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu()
        source = (source.float() if source.is_floating_point() else source).numpy()  # numpy has no bf16
    x = np.asarray(source)
    if x.dtype == np.uint8:
        x = (x.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(x.dtype, np.signedinteger):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise ValueError(f"audio samples must be a float or integer array, got dtype {x.dtype}")
    if x.ndim == 1:
        return x[:, None]
    if x.ndim != 2 or min(x.shape) > _MAX_CHANNELS:
        raise ValueError(f"audio samples must be [T], [T, C] or [C, T] with C <= {_MAX_CHANNELS}, got {x.shape}")
    return x if x.shape[1] <= x.shape[0] else x.T  # the smaller dim is channels


def load_audio(source: Any, sampling_rate: int | None = None, target_rate: int = 16000) -> torch.Tensor:
    """Load mono float32 samples [T] at `target_rate`.

    `source`: a WAV path (str / Path), WAV bytes, or samples as a numpy array / torch tensor shaped [T],
    [T, C] or [C, T] (C <= 8; the smaller dim is taken as channels). Arrays need `sampling_rate`; WAV data
    carries its own rate (a different `sampling_rate` is an error). Channels are averaged; other rates
    are resampled with a windowed-sinc filter.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"audio file not found: {str(source)!r}")
        source = path.read_bytes()
    if isinstance(source, (bytes, bytearray, memoryview)):
        x, rate = _decode_wav(bytes(source))
        if sampling_rate is not None and sampling_rate != rate:
            raise ValueError(f"audio: sampling_rate={sampling_rate} but the WAV header says {rate} Hz")
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        if sampling_rate is None:
            raise ValueError("audio given as raw samples needs sampling_rate=")
        x, rate = _array_samples(source), sampling_rate
    else:
        raise TypeError(f"audio must be a WAV path, WAV bytes, or a numpy array / torch tensor of samples, "
                        f"got {type(source).__name__}")
    if not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r > 0 for r in (rate, target_rate)):
        raise ValueError(f"audio: sampling rates must be positive ints, got {rate!r} -> {target_rate!r}")
    if x.shape[0] == 0:
        raise ValueError("audio is empty (0 samples)")
    if not np.isfinite(x).all():
        raise ValueError("audio contains NaN or infinite samples")
    return resample(torch.from_numpy(x.mean(axis=1)), int(rate), int(target_rate))


def audio_batch(clips: Any | Sequence[Any], config: AudioConfig) -> tuple[torch.Tensor, list[int]]:
    """Clips -> (waveforms [N, chunk_samples] at the model's rate, zero-padded / truncated, samples per clip):
    the host part of `preprocess_audio` (decoding, down-mixing, resampling). The log-mel then runs wherever
    the waveforms are (the engine computes it on the model's device, at admission).

    `clips` is one clip or a list. A 1-D array / tensor is taken as a mono waveform at
    `config.sampling_rate`; anything else goes through `load_audio` (WAV path / bytes, [T, C] arrays).
    Clips longer than `config.chunk_samples` are truncated to that one window (only the first
    ~chunk_samples / sampling_rate seconds are heard), and the returned length is the truncated one.
    """
    if not isinstance(clips, (list, tuple)):
        clips = [clips]
    if len(clips) == 0:
        raise ValueError("preprocess_audio got an empty list of audio clips")
    rate = config.sampling_rate
    waves = [load_audio(c, sampling_rate=rate if isinstance(c, (np.ndarray, torch.Tensor)) else None,
                        target_rate=rate) for c in clips]
    lengths = [min(w.shape[0], config.chunk_samples) for w in waves]
    batch = torch.stack([torch.nn.functional.pad(w[:n], (0, config.chunk_samples - n)) for w, n in zip(waves, lengths)])
    return batch, lengths


def preprocess_audio(clips: Any | Sequence[Any], config: AudioConfig) -> tuple[torch.Tensor, list[int]]:
    """Clips -> (log-mel batch [N, num_mel_bins, 2 * max_source_positions], samples per clip): `audio_batch`
    then `log_mel_spectrogram`."""
    batch, lengths = audio_batch(clips, config)
    return log_mel_spectrogram(batch, config), lengths
