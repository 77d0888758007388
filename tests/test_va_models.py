"""VA from the unimodal models users run: the audeering dimensional wav2vec2 layout (custom
regression head), an image regression model over faces and video frames, and UniVA's reader
picking the per-modality VA up. Each is checked against a forward written here by hand."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
av = pytest.importorskip("av")

from featurestore import va  # noqa: E402
from featurestore.datasets import add_dataset, read_manifest_file  # noqa: E402
from featurestore.hashing import content_key  # noqa: E402
from featurestore.jobs.va import VAConfig, run  # noqa: E402
from featurestore.va.cache import VASet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SR = 16000


def save_audeering_layout(path: Path, *, architectures=("Wav2Vec2ForSpeechClassification",)) -> Path:
    """A tiny checkpoint laid out as audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim:
    `wav2vec2.*` encoder weights, `classifier.dense.*` and `classifier.out_proj.*`, config with
    id2label arousal/dominance/valence, problem_type regression, a Wav2Vec2FeatureExtractor."""
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                         conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4), conv_bias=True,
                         feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=2, vocab_size=None, final_dropout=0.1,
                         id2label={0: "arousal", 1: "dominance", 2: "valence"},
                         label2id={"arousal": 0, "dominance": 1, "valence": 2}, problem_type="regression",
                         architectures=list(architectures) if architectures else None, pooling_mode="mean")
    torch.manual_seed(3)
    encoder = Wav2Vec2Model(cfg).eval()
    weights = {f"wav2vec2.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    weights |= {"classifier.dense.weight": torch.randn(16, 16, generator=g) * 0.5,
                "classifier.dense.bias": torch.randn(16, generator=g) * 0.1,
                "classifier.out_proj.weight": torch.randn(3, 16, generator=g) * 0.3,
                "classifier.out_proj.bias": torch.tensor([0.5, 0.45, 0.55])}
    path.mkdir(parents=True)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=SR, do_normalize=True, return_attention_mask=True).save_pretrained(path)
    return path


def hand_forward(path: Path, wav: np.ndarray) -> np.ndarray:
    """The checkpoint's outputs by hand: normalise, the transformers encoder, frame mean, then
    tanh(dense) and out_proj from the saved tensors (dropout is off at inference)."""
    from safetensors.torch import load_file
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    t = load_file(str(path / "model.safetensors"))
    encoder = Wav2Vec2Model(Wav2Vec2Config.from_pretrained(path)).eval()
    encoder.load_state_dict({k[len("wav2vec2."):]: v for k, v in t.items() if k.startswith("wav2vec2.")})
    x = torch.tensor(wav, dtype=torch.float32)
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        h = encoder(x[None]).last_hidden_state.mean(dim=1)[0]
        z = torch.tanh(t["classifier.dense.weight"] @ h + t["classifier.dense.bias"])
        return (t["classifier.out_proj.weight"] @ z + t["classifier.out_proj.bias"]).numpy().astype(np.float64)


def wav_file(path: Path, seconds: float, freq: float) -> np.ndarray:
    import soundfile as sf

    t = np.arange(int(SR * seconds)) / SR
    x = (0.4 * np.sin(2 * np.pi * freq * t) + 0.1 * np.sin(2 * np.pi * 3 * freq * t)).astype(np.float32)
    sf.write(path, x, SR, subtype="FLOAT")
    return x


def test_audeering_dimensional_wav2vec2_is_scored_as_its_own_code_does(store, tmp_path):
    model = save_audeering_layout(tmp_path / "msp-dim")
    clips = tmp_path / "clips"
    clips.mkdir()
    wavs = {f"c{i}": wav_file(clips / f"c{i}.wav", 0.4 + 0.2 * i, 150.0 * (i + 1)) for i in range(3)}
    (clips / "m.csv").write_text("id,audio\n" + "".join(f"{k},{k}.wav\n" for k in wavs))
    add_dataset(store, "speech", read_manifest_file(clips / "m.csv"), root=clips, source="test")

    scorer = va.create("model", {"model": str(model)}, device="cpu")
    assert scorer.modalities() == ("audio",)
    res = run(VAConfig(dataset="speech", modality="audio", scorer="model", params={"model": str(model)},
                       device="cpu"), store)
    assert (res.computed, res.failed_new) == (3, 0)
    vs = VASet(store, res.source)
    assert vs.spec["architecture"] == "Wav2Vec2RegressionModel"
    assert vs.spec["columns"] == {"valence": 2, "arousal": 0}
    keys = [content_key("audio", (clips / f"{k}.wav").read_bytes()) for k in wavs]
    got, present = vs.read(np.array(keys, dtype="S32"))
    assert present.all()
    outs = np.stack([hand_forward(model, w) for w in wavs.values()])  # [arousal, dominance, valence] on 0..1
    want = np.clip(np.stack([2 * outs[:, 2] - 1, 2 * outs[:, 0] - 1], axis=1), -1, 1)
    assert np.ptp(want[:, 0]) > 1e-3  # the clips really differ
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got[:, 0], np.clip(2 * outs[:, 1] - 1, -1, 1), atol=1e-4)  # not dominance

    # A config without `architectures` but a checkpoint holding the head: recognised by its weights.
    bare = save_audeering_layout(tmp_path / "bare", architectures=None)
    s = va.create("model", {"model": str(bare)}, device="cpu").load()
    assert type(s.model).__name__ == "Wav2Vec2RegressionModel"
    first = next(iter(wavs))
    np.testing.assert_allclose(s.score([s.prepare((clips / f"{first}.wav").read_bytes(), "audio")], "audio"),
                               got[:1], atol=1e-5)


def test_audeering_head_on_the_soundtrack_of_a_video(tmp_path):
    from test_video import mp4

    model = save_audeering_layout(tmp_path / "msp-dim")
    s = va.create("model", {"model": str(model)}, device="cpu").load()
    raw = mp4(8, sr=SR, tone=220.0)
    with av.open(io.BytesIO(raw)) as c:
        track = np.concatenate([f.to_ndarray() for f in c.decode(c.streams.audio[0])], axis=1)
    out = hand_forward(model, track.astype(np.float32).mean(axis=0))
    got = s.score([s.prepare(raw, "audio")], "audio")[0]
    np.testing.assert_allclose(got, np.clip([2 * out[2] - 1, 2 * out[0] - 1], -1, 1), atol=1e-5)


@pytest.fixture
def vit(tmp_path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=37, num_labels=2, id2label={0: "valence", 1: "arousal"},
                    problem_type="regression")
    torch.manual_seed(0)
    ViTForImageClassification(cfg).eval().save_pretrained(tmp_path / "vit")
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


def test_image_regressor_scores_video_frames_and_univa_reads_them(store, tmp_path, vit):
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessorPil

    from featurestore.jobs.extract import ExtractConfig
    from featurestore.jobs.extract import run as extract
    from featurestore.reader import load_split
    from test_video import all_frames, mp4

    root = tmp_path / "v"
    root.mkdir()
    clips = {"a": mp4(9, audio=False), "b": mp4(4, audio=False)}
    for k, raw in clips.items():
        (root / f"{k}.mp4").write_bytes(raw)
    (root / "bad.mp4").write_bytes(b"\x00" * 300)
    (root / "m.csv").write_text("id,split,label,video\na,train,x,a.mp4\nb,train,y,b.mp4\nbad,train,x,bad.mp4\n")
    add_dataset(store, "clips", read_manifest_file(root / "m.csv"), root=root, source="test")

    params = {"model": str(vit), "range": "-1..1", "frames": "3"}
    assert va.create("model", params).modalities() == ("image", "video")
    res = run(VAConfig(dataset="clips", modality="video", scorer="model", params=params, device="cpu"), store)
    assert (res.computed, res.failed_new) == (2, 1)
    vs = VASet(store, res.source)
    assert vs.spec["config"]["frames"] == 3
    assert "not a readable video container" in vs.errors()[0].reason

    model = ViTForImageClassification.from_pretrained(vit).eval()
    proc = ViTImageProcessorPil.from_pretrained(vit)
    want = []
    for raw in clips.values():
        frames = all_frames(raw)
        picked = [Image.fromarray(frames[int(np.floor((k + 0.5) * len(frames) / 3))]) for k in range(3)]
        with torch.no_grad():
            logits = model(**proc(images=picked, return_tensors="pt")).logits.numpy().astype(np.float64)
        want.append(np.clip(logits.mean(axis=0), -1, 1))  # columns: valence, arousal
    got, present = vs.read(np.array([content_key("video", r) for r in clips.values()], dtype="S32"))
    assert present.all()
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)

    # sampling is part of the source; an image source of the same model is named apart
    other = va.create("model", {**params, "frames": "5"})
    assert other.source("video") != res.source
    assert va.create("model", params).source("image") != res.source

    # UniVA's reader: per-modality VA of the video modality, aligned to the split's rows
    tiny_clip = _tiny_clip(tmp_path)
    extract(ExtractConfig(dataset="clips", modality="video", backbone="clip-image",
                          params={"model": str(tiny_clip), "frames": "3"}), store)
    data = load_split(store, "clips", "train", {"video": "clip-image"}, va={"video": res.source})
    assert data.va["video"].shape == (3, 2)
    np.testing.assert_allclose(data.va["video"][:2], np.stack(want), atol=1e-5)
    assert np.isnan(data.va["video"][2]).all()  # the bad clip has no VA
    assert list(data.item_ids) == ["a", "b", "bad"]


def _tiny_clip(tmp_path: Path) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=8)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(tmp_path / "clipv")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clipv")
    return tmp_path / "clipv"


def test_learned_scorer_fitted_on_video_features_scores_clips(store, tmp_path):
    """`learned` on a dataset's VA labels works for video features like any other modality."""
    from featurestore.jobs.extract import ExtractConfig
    from featurestore.jobs.extract import run as extract
    from featurestore.jobs.va import FitConfig, fit
    from test_video import mp4

    root = tmp_path / "v"
    root.mkdir()
    lines = []
    clips = [mp4(3 + i % 5, audio=False, size=32 + 16 * (i % 2)) for i in range(10)]
    for i in range(12):  # c10 and c11 are byte copies of c0 and c1 (an encoder need not be deterministic)
        (root / f"c{i}.mp4").write_bytes(clips[i % 10])
        lines.append(f"c{i},{'train' if i < 9 else 'test'},x,c{i}.mp4,{(i - 6) / 7:.3f},{(6 - i) / 8:.3f}")
    (root / "m.csv").write_text("id,split,label,video,valence,arousal\n" + "\n".join(lines) + "\n")
    add_dataset(store, "dfew", read_manifest_file(root / "m.csv"), root=root, source="test")
    clip = _tiny_clip(tmp_path)
    fp = extract(ExtractConfig(dataset="dfew", modality="video", backbone="clip-image",
                               params={"model": str(clip), "frames": "2"}), store).fingerprint
    fitted = fit(FitConfig(dataset="dfew", features=fp, out="dfew-va", params={"kind": "ridge"}), store)
    info = json.loads((store.root / "va_models" / "dfew-va" / "config.json").read_text())
    assert info["modality"] == "video" and info["fingerprint"] == fp
    res = run(VAConfig(dataset="dfew", modality="video", scorer="dfew-va", device="cpu"), store)
    assert res.unique == 10 and res.computed == 10 and res.failed_new == 0  # c10, c11 repeat c0, c1
    assert fitted is not None


def test_univa_trains_on_va_from_the_unimodal_models(store, tmp_path, vit):
    """Video and audio features of the same clips, VA from the image regressor (frames) and the
    audeering head (soundtrack): UniVA reads each modality's VA from its own model's source."""
    import featurestore.heads as heads  # noqa: F401  (the layer the job trains)
    from featurestore.jobs.extract import ExtractConfig
    from featurestore.jobs.extract import run as extract
    from featurestore.jobs.train_head import TrainHeadConfig
    from featurestore.jobs.train_head import run as train
    from featurestore.reader import load_split
    from test_video import mp4

    root = tmp_path / "meld"
    root.mkdir()
    lines = []
    for i in range(16):
        (root / f"u{i}.mp4").write_bytes(mp4(3 + i % 4, sr=SR, tone=120.0 + 37 * i, size=32 + 16 * (i % 3)))
        split = "train" if i < 10 else "val" if i < 13 else "test"
        lines.append(f"u{i},{split},{'joy' if i % 2 else 'anger'},u{i}.mp4,u{i}.mp4")
    (root / "m.csv").write_text("id,split,label,video,audio\n" + "\n".join(lines) + "\n")
    add_dataset(store, "meld", read_manifest_file(root / "m.csv"), root=root, source="test")
    extract(ExtractConfig(dataset="meld", modality="video", backbone="clip-image",
                          params={"model": str(_tiny_clip(tmp_path)), "frames": "2"}), store)
    msp = save_audeering_layout(tmp_path / "msp-dim")
    extract(ExtractConfig(dataset="meld", modality="audio", backbone="wav2vec2", params={"model": str(msp)}), store)
    v = run(VAConfig(dataset="meld", modality="video", scorer="model",
                     params={"model": str(vit), "range": "-1..1", "frames": "2"}, device="cpu"), store)
    a = run(VAConfig(dataset="meld", modality="audio", scorer="model", params={"model": str(msp)},
                     device="cpu"), store)
    assert v.computed == a.computed == 16
    res = train(TrainHeadConfig(method="univa", dataset="meld", features={"video": "clip-image", "audio": "wav2vec2"},
                                params={"epochs": 2, "batch_size": 8}), store)
    assert res.lineage["va_sources"] == {"video": v.source, "audio": a.source}
    data = load_split(store, "meld", "train", {"video": "clip-image", "audio": "wav2vec2"}, va=True)
    assert data.va_sources == {"video": v.source, "audio": a.source}
    assert np.isfinite(data.va["video"]).all() and np.isfinite(data.va["audio"]).all()
    assert not np.allclose(data.va["video"], data.va["audio"])


def test_learned_scorer_fitted_on_faces_scores_video_frames(store, tmp_path):
    """A regressor fitted on image features with VA labels (AffectNet-style) scores each sampled
    frame of a clip (the video feature set's frame rows) and averages them."""
    from PIL import Image

    from featurestore.features import FeatureSet
    from featurestore.jobs.extract import ExtractConfig
    from featurestore.jobs.extract import run as extract
    from featurestore.jobs.va import FitConfig, fit
    from test_video import mp4

    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(1)
    lines = []
    for i in range(30):
        img = np.clip(rng.normal(128, 60, (32, 32, 3)) * (0.4 + i / 40), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(faces / f"f{i}.png")
        lines.append(f"f{i},{'train' if i < 24 else 'test'},f{i}.png,{np.tanh((i - 15) / 10):.3f},"
                     f"{np.tanh((10 - i) / 12):.3f}")
    (faces / "m.csv").write_text("id,split,image,valence,arousal\n" + "\n".join(lines) + "\n")
    add_dataset(store, "affectnet", read_manifest_file(faces / "m.csv"), root=faces, source="test")
    clip = str(_tiny_clip(tmp_path))
    image_fp = extract(ExtractConfig(dataset="affectnet", modality="image", backbone="clip-image",
                                     params={"model": clip}), store).fingerprint
    fit(FitConfig(dataset="affectnet", features=image_fp, out="affect-va", params={"kind": "ridge"}), store)

    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(3):
        (clips / f"c{i}.mp4").write_bytes(mp4(4 + 3 * i, audio=False))
    (clips / "m.csv").write_text("id,video\n" + "".join(f"c{i},c{i}.mp4\n" for i in range(3)))
    add_dataset(store, "dfew", read_manifest_file(clips / "m.csv"), root=clips, source="test")
    scorer = va.create("learned", {"model": "affect-va"}, store=store)
    assert scorer.modalities() == ("image", "video")
    with pytest.raises(Exception, match="extract them with"):
        run(VAConfig(dataset="dfew", modality="video", scorer="affect-va"), store)
    video_fp = extract(ExtractConfig(dataset="dfew", modality="video", backbone="clip-image",
                                     params={"model": clip, "frames": "3", "dtype": "float32"}), store).fingerprint
    res = run(VAConfig(dataset="dfew", modality="video", scorer="affect-va"), store)
    assert (res.computed, res.failed_new) == (3, 0)
    vs = VASet(store, res.source)
    assert vs.spec["frames_from"] == video_fp and vs.spec["modality"] == "video"
    keys = np.array([content_key("video", (clips / f"c{i}.mp4").read_bytes()) for i in range(3)], dtype="S32")
    got, present = vs.read(keys)
    assert present.all()
    # independent: ridge on standardised features is affine, so the mean of its frame predictions
    # is its prediction on the mean frame row, which the video feature set stores as the pooled row
    pooled, _ = FeatureSet(store, video_fp).read_pooled(keys, dtype=np.float32)
    image_scorer = va.create("learned", {"model": "affect-va"}, store=store)
    want = image_scorer.score(pooled, "image")
    assert np.abs(want).max() < 1  # nothing clipped, so the identity holds exactly
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert va.create("learned", {"model": "affect-va"}, store=store).source("image") != res.source


@pytest.mark.parametrize("n, d", [(40, 60), (40, 384), (200, 30), (60, 200), (30, 5)])
def test_ridge_chooses_the_alpha_of_exact_leave_one_out(n, d):
    """The learned ridge's alpha is the grid value with the least leave-one-out error: the same one
    scikit-learn's RidgeCV picks (its efficient LOO), and, on the smallest case, the one a brute-force
    refit per held-out item picks. Includes n <= d, where a leverage without the intercept's 1/n
    made the smallest alpha win every time."""
    from sklearn.linear_model import Ridge as SkRidge, RidgeCV

    from featurestore.va.learned import _ALPHAS, FitParams, Ridge

    rng = np.random.default_rng(n * 1000 + d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, d)
    w = rng.normal(size=d) * (rng.random(d) < 0.3)
    y = np.c_[x @ w / np.sqrt(d) + rng.normal(0, 1.0, n), np.full(n, np.nan)]
    ours = Ridge(FitParams()).fit(x, y)
    xs = (x - x.mean(0)) / x.std(0)
    assert ours.alpha_[0] == pytest.approx(RidgeCV(alphas=_ALPHAS).fit(xs, y[:, 0]).alpha_)
    reference = SkRidge(alpha=ours.alpha_[0]).fit(xs, y[:, 0])
    np.testing.assert_allclose(ours.coef_[:, 0], reference.coef_, atol=1e-8)
    if n * d <= 200 * 30:
        errors = [np.mean([(SkRidge(alpha=a).fit(np.delete(xs, i, 0), np.delete(y[:, 0], i))
                            .predict(xs[i:i + 1])[0] - y[i, 0]) ** 2 for i in range(n)]) for a in _ALPHAS]
        assert ours.alpha_[0] == pytest.approx(_ALPHAS[int(np.argmin(errors))])
