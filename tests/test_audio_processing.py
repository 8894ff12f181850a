"""Audio front end: parity with HF's WhisperFeatureExtractor, WAV decoding, resampling, errors."""
import io
import struct
import wave

import numpy as np
import pytest
import torch

from agreement import assert_close_across_shapes
from autoglm_fast.config import AudioConfig
from autoglm_fast.reference.audio_processing import (
    load_audio, log_mel_spectrogram, mel_filter_bank, preprocess_audio, resample)

transformers = pytest.importorskip("transformers")
SR = 16000
# Our implementation repeats HF's torch ops in the same order, so the features match bit for bit
# (measured 0.0); the bound leaves room for BLAS / FFT differences on other machines.
ATOL = 1e-5


def _chirp(seconds: float = 1.3, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    return (0.5 * np.sin(2 * np.pi * (200 * t + 1500 * t**2)) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _hf_features(wave_np: np.ndarray, chunk_length: int) -> torch.Tensor:
    fe = transformers.WhisperFeatureExtractor(feature_size=80, sampling_rate=SR, hop_length=160,
                                              chunk_length=chunk_length, n_fft=400)
    return fe(wave_np, sampling_rate=SR, return_tensors="pt").input_features


@pytest.mark.parametrize("chunk_length,config", [(30, AudioConfig()), (2, AudioConfig(max_source_positions=100))])
def test_log_mel_matches_whisper_feature_extractor(chunk_length, config):
    w = _chirp()
    ours = log_mel_spectrogram(torch.from_numpy(w), config)
    assert ours.shape == (80, 2 * config.max_source_positions) and ours.dtype == torch.float32
    assert (ours - _hf_features(w, chunk_length)[0]).abs().max().item() <= ATOL
    if chunk_length == 2:  # longer than the window: both truncate
        long = np.concatenate([w, w])
        assert (log_mel_spectrogram(torch.from_numpy(long), config) - _hf_features(long, 2)[0]).abs().max() <= ATOL


def test_log_mel_batch_equals_per_clip():
    config = AudioConfig(max_source_positions=100)
    w = _chirp()
    batch = torch.from_numpy(np.stack([w, 0.01 * w[::-1], np.zeros_like(w)]))  # very different maxima
    out = log_mel_spectrogram(batch, config)
    assert out.shape == (3, 80, 200)
    for i in range(3):
        assert_close_across_shapes(out[i], log_mel_spectrogram(batch[i], config))


def test_mel_filter_bank_matches_transformers():
    from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank
    ref = hf_mel_filter_bank(num_frequency_bins=201, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
                             sampling_rate=SR, norm="slaney", mel_scale="slaney")
    ours = mel_filter_bank(AudioConfig())
    assert ours.shape == (201, 80) and ours.dtype == torch.float32
    assert np.abs(ours.double().numpy() - ref).max() <= 1e-6


def test_preprocess_audio():
    config = AudioConfig(max_source_positions=100)
    a, b = _chirp(1.3), _chirp(3.0, seed=1)  # b is longer than the 2 s window
    feats, lengths = preprocess_audio([torch.from_numpy(a), b], config)
    assert feats.shape == (2, 80, 200) and lengths == [a.size, config.chunk_samples]
    assert_close_across_shapes(feats[0], log_mel_spectrogram(torch.from_numpy(a), config))  # a batch vs one clip
    with pytest.raises(ValueError, match="audio"):
        preprocess_audio([np.zeros(0, np.float32)], config)
    with pytest.raises(ValueError, match="empty"):
        preprocess_audio([], config)


# ---- WAV ---------------------------------------------------------------------------------------
def _pcm_wav(samples: np.ndarray, width: int, rate: int = SR) -> bytes:
    """samples float [T, C] in [-1, 1) -> PCM WAV bytes written with the stdlib `wave`."""
    if width == 1:
        raw = np.clip(np.round(samples * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    elif width == 3:
        v = np.clip(np.round(samples * 2**23), -2**23, 2**23 - 1).astype("<i4").reshape(-1, 1).view(np.uint8)
        raw = v[:, :3].tobytes()  # low three bytes, little endian
    else:
        dt = {2: "<i2", 4: "<i4"}[width]
        raw = np.clip(np.round(samples * 2.0 ** (8 * width - 1)), -2.0 ** (8 * width - 1), 2.0 ** (8 * width - 1) - 1
                      ).astype(dt).tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return buf.getvalue()


def _float_wav(samples: np.ndarray, rate: int = SR, extensible: bool = False) -> bytes:
    """IEEE float32 WAV (format tag 3, or WAVE_FORMAT_EXTENSIBLE with the float sub-format)."""
    ch = samples.shape[1]
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else 3, ch, rate, rate * 4 * ch, 4 * ch, 32)
    if extensible:
        guid = struct.pack("<H", 3) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, 32, 0) + guid
    else:
        fmt += struct.pack("<H", 0)  # cbSize
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", 3) + b"abc\x00"
    chunks += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def _tone(n: int = 4000, channels: int = 1) -> np.ndarray:
    t = np.arange(n) / SR
    return np.stack([0.6 * np.sin(2 * np.pi * (300 + 200 * c) * t) for c in range(channels)], axis=1)


@pytest.mark.parametrize("width,channels,tol", [(1, 1, 1 / 128), (2, 1, 1 / 32768), (2, 2, 1 / 32768),
                                                (3, 1, 2**-23), (4, 2, 1e-7)])
def test_pcm_wav_round_trip(width, channels, tol, tmp_path):
    x = _tone(channels=channels)
    data = _pcm_wav(x, width)
    got = load_audio(data)
    assert got.dtype == torch.float32 and got.shape == (x.shape[0],)
    np.testing.assert_allclose(got.numpy(), x.mean(axis=1), atol=tol, rtol=0)
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    assert torch.equal(load_audio(path), got) and torch.equal(load_audio(str(path)), got)


@pytest.mark.parametrize("extensible", [False, True])
def test_float_wav_round_trip(extensible):
    x = _tone(channels=2).astype(np.float32)
    got = load_audio(_float_wav(x, extensible=extensible))
    np.testing.assert_allclose(got.numpy(), x.mean(axis=1), atol=1e-7, rtol=0)


def test_wav_is_resampled_to_target_rate():
    x = _tone(8000)
    got = load_audio(_pcm_wav(x, 2, rate=8000))
    assert got.shape == (16000,)


# ---- resampling --------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [44100, 8000])
def test_resample_sine_matches_analytic(rate):
    n = rate  # one second
    x = torch.sin(2 * np.pi * 440 * torch.arange(n, dtype=torch.float64) / rate).float()
    y = load_audio(x, sampling_rate=rate)
    assert y.shape == (SR,)
    ref = np.sin(2 * np.pi * 440 * np.arange(SR) / SR)
    assert np.abs(y.numpy() - ref)[200:-200].max() <= 2e-3  # edges see the zero padding


def test_resample_identity_and_batch():
    x = torch.randn(2, 1000)
    assert resample(x, SR, SR) is x
    y = resample(x, 48000, SR)
    assert y.shape == (2, 334)
    torch.testing.assert_close(y[1], resample(x[1], 48000, SR))


def test_array_inputs_and_downmix():
    x = _tone(1000, channels=2).astype(np.float32)
    want = x.mean(axis=1)
    for arr in (x, x.T, torch.from_numpy(x), torch.from_numpy(x.T.copy())):
        np.testing.assert_allclose(load_audio(arr, sampling_rate=SR).numpy(), want, atol=1e-7)
    pcm16 = (x[:, 0] * 32768).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm16, sampling_rate=SR).numpy(), x[:, 0], atol=1 / 32768)


# ---- errors ------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="audio.*empty"):
        load_audio(np.zeros(0, np.float32), sampling_rate=SR)
    with pytest.raises(ValueError, match="audio.*not a WAV"):
        load_audio(b"definitely not a wav file, just some garbage bytes")
    with pytest.raises(ValueError, match="audio.*sampling_rate"):
        load_audio(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="audio.*no samples"):
        load_audio(_pcm_wav(np.zeros((0, 1)), 2))
    with pytest.raises(ValueError, match="audio.*corrupt"):
        load_audio(b"RIFF\x10\x00\x00\x00WAVEjunk\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="audio.*unsupported"):
        load_audio(_float_wav(np.zeros((10, 1))).replace(struct.pack("<HH", 3, 1), struct.pack("<HH", 7, 1), 1))
    with pytest.raises(ValueError, match="audio.*NaN"):
        load_audio(np.array([0.0, np.nan], np.float32), sampling_rate=SR)
    with pytest.raises(ValueError, match="audio.*C <= 8"):
        load_audio(np.zeros((20, 30), np.float32), sampling_rate=SR)
    with pytest.raises(ValueError, match="audio.*header"):
        load_audio(_pcm_wav(_tone(100), 2), sampling_rate=44100)
    with pytest.raises(TypeError, match="audio"):
        load_audio(123)
    with pytest.raises(FileNotFoundError, match="audio"):
        load_audio("/nonexistent/clip.wav")
