"""The `video` modality: real mp4s written with PyAV here, frames sampled as specified, per-frame rows
and their mean stored, audio tracks of videos, bad videos recorded with reasons.

Expected numbers come from an independent path: frames decoded here with PyAV directly, indices
computed here from the sampling rule, and the tiny CLIP vision model run directly on them."""
from __future__ import annotations

import fractions
import io
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
torch = pytest.importorskip("torch")

from featurestore import backbones  # noqa: E402
from featurestore.backbones import _media, _video  # noqa: E402
from featurestore.datasets import add_dataset, read_manifest_file  # noqa: E402
from featurestore.errors import BadItemError, ConfigError  # noqa: E402
from featurestore.features import FeatureSet  # noqa: E402
from featurestore.hashing import content_key  # noqa: E402
from featurestore.jobs.extract import ExtractConfig, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LEVEL = 20  # frame i is a solid grey of level i * LEVEL


def mp4(n: int, *, audio: bool = True, fps: int = 10, pts_ms=None, size: int = 32, fmt: str = "mp4",
        codec: str = "libx264", sr: int = 22050, tone: float = 440.0) -> bytes:
    """A clip of `n` solid-grey frames (frame i at level i*LEVEL), optionally a sine soundtrack;
    `pts_ms` gives each frame its own timestamp (a variable frame rate)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as c:
        v = c.add_stream(codec, rate=1000 if pts_ms else fps)
        v.width = v.height = size
        v.pix_fmt = "yuv420p"
        if pts_ms:
            v.codec_context.time_base = fractions.Fraction(1, 1000)
        a = c.add_stream("aac", rate=sr, layout="mono") if audio else None
        if n == 0:
            c.start_encoding()  # the header alone: a video stream with no frames
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), i * LEVEL, np.uint8), format="rgb24")
            if pts_ms:
                frame.pts, frame.time_base = pts_ms[i], fractions.Fraction(1, 1000)
            for p in v.encode(frame):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if a is not None:
            t = np.arange(int(sr * n / fps)) / sr
            x = (0.3 * np.sin(2 * np.pi * tone * t)).astype(np.float32)[None]
            af = av.AudioFrame.from_ndarray(x, format="fltp", layout="mono")
            af.sample_rate, af.pts = sr, 0
            for p in a.encode(af):
                c.mux(p)
            for p in a.encode():
                c.mux(p)
    return buf.getvalue()


def all_frames(raw: bytes) -> list[np.ndarray]:
    """Every frame, decoded here with PyAV on its own (RGB arrays)."""
    with av.open(io.BytesIO(raw)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def levels(frames) -> list[int]:
    return [int(round(float(np.asarray(f).mean()) / LEVEL)) for f in frames]


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=24)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clipv")
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


# ---- sampling ----------------------------------------------------------------------------
@pytest.mark.parametrize("n,f", [(10, 4), (9, 3), (7, 7), (4, 9), (1, 5)])
def test_uniform_sampling_picks_the_centre_of_each_stretch(n, f):
    raw = mp4(n, audio=False)
    assert len(all_frames(raw)) == n
    # independent: frame k is the one under the centre of the k-th of f equal stretches of [0, n)
    expected = [int(np.floor((k + 0.5) * n / f)) for k in range(f)]
    got = _video.decode_frames(raw, _video.Sampling(frames=f))
    assert len(got) == f and all(img.size == (32, 32) and img.mode == "RGB" for img in got)
    assert levels(got) == expected


def test_fps_sampling_follows_timestamps_of_a_variable_frame_rate():
    pts = [0, 40, 300, 350, 700, 1000]  # ms: uneven gaps
    raw = mp4(len(pts), audio=False, pts_ms=pts)
    for fps in (4.0, 2.5, 10.0):
        times = np.arange(0, pts[-1] / 1000 + 1e-9, 1 / fps)
        expected = [max(j for j, p in enumerate(pts) if p / 1000 <= t + 1e-9) for t in times]
        assert levels(_video.decode_frames(raw, _video.Sampling(fps=fps))) == expected
    assert levels(_video.decode_frames(raw, _video.Sampling(fps=10, max_frames=3))) == [0, 1, 1]


def test_bad_videos_are_bad_items_with_reasons():
    cases = {
        b"": "empty",
        b"not a video at all" * 20: "not a readable video container",
        mp4(6)[:400]: "not a readable video container",
        mp4(0, audio=False, fmt="avi", codec="mpeg4"): "zero frames",
    }
    for raw, reason in cases.items():
        with pytest.raises(BadItemError, match=reason):
            _video.decode_frames(raw, _video.Sampling())
    with pytest.raises(BadItemError, match="no audio track"):
        _media.decode_audio(mp4(3, audio=False), 16000)
    with pytest.raises(ConfigError):
        backbones.create("clip-image", {"fps": "-1"}, modality="video")
    with pytest.raises(ConfigError, match="seq_cap"):
        backbones.create("clip-image", {"seq_cap": "4"}, modality="video")


def test_audio_track_of_a_video_is_decoded_and_resampled():
    raw = mp4(10, sr=22050)
    with av.open(io.BytesIO(raw)) as c:  # independent decode: planar float AAC frames, channels averaged
        track = np.concatenate([f.to_ndarray() for f in c.decode(c.streams.audio[0])], axis=1)
    want = _media.resample(track.astype(np.float32).mean(axis=0, dtype=np.float64), 22050, 16000)
    got = _media.decode_audio(raw, 16000)
    np.testing.assert_allclose(got, want.astype(np.float32), atol=1e-6)
    assert abs(len(got) - 16000) < 1200  # ~1 s of sound (AAC pads a little)
    np.testing.assert_array_equal(_media.decode_audio(raw, 16000, max_samples=4000), got[:4000])


# ---- extraction end to end ---------------------------------------------------------------
def _direct_frame_embeds(path: Path, frames: list[np.ndarray]) -> np.ndarray:
    from PIL import Image
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(path).eval()
    proc = CLIPImageProcessorPil.from_pretrained(path)
    with torch.no_grad():
        pixels = proc(images=[Image.fromarray(f) for f in frames], return_tensors="pt")["pixel_values"]
        return model(pixel_values=pixels).image_embeds.numpy()


def test_extract_video_stores_frame_rows_and_their_mean(store, tmp_path, clip_vision):
    clips = {"a": mp4(10), "b": mp4(5, audio=False), "c": mp4(13)}
    bad = {"corrupt": b"\x00garbage" * 64, "empty": b"", "noframes": mp4(0, audio=False, fmt="avi", codec="mpeg4")}
    rows = []
    for name, raw in {**clips, **bad}.items():
        (tmp_path / f"{name}.mp4").write_bytes(raw)
        rows.append(f"{name},train,x,{name}.mp4")
    (tmp_path / "m.csv").write_text("id,split,label,video\n" + "\n".join(rows) + "\n")
    add_dataset(store, "vids", read_manifest_file(tmp_path / "m.csv"), root=tmp_path, source="test")

    params = {"model": str(clip_vision), "frames": "4", "dtype": "float32", "decode_workers": "2"}
    res = run(ExtractConfig(dataset="vids", modality="video", backbone="clip-image", params=params,
                            batch_size=2), store)
    assert (res.computed, res.failed_new) == (3, 3)
    fs = FeatureSet(store, res.fingerprint)
    assert fs.modality == "video" and fs.backbone == "clip-image"
    assert fs.spec["preprocessing"]["sampling"] == {"mode": "uniform", "frames": 4, "index": "floor((k+0.5)*N/F)"}
    keys = [content_key("video", raw) for raw in clips.values()]
    pooled, present = fs.read_pooled(keys, dtype=np.float32)
    seqs, _ = fs.read_sequences(keys, dtype=np.float32)
    assert present.all()
    for (name, raw), row, seq in zip(clips.items(), pooled, seqs):
        decoded = all_frames(raw)
        picked = [decoded[int(np.floor((k + 0.5) * len(decoded) / 4))] for k in range(4)]
        want = _direct_frame_embeds(clip_vision, picked)
        assert seq.shape == (4, 24)
        np.testing.assert_allclose(seq, want, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(row, want.mean(axis=0), atol=2e-5, err_msg=name)
    reasons = {e.item_id: e.reason for e in fs.errors()}
    assert set(reasons) == set(bad)
    assert "not a readable video container" in reasons["corrupt"]
    assert "empty" in reasons["empty"] and "zero frames" in reasons["noframes"]

    # sampling is in the fingerprint; how many threads decode is not; the image fingerprint differs
    fp = res.fingerprint
    same = backbones.create("clip-image", {**params, "decode_workers": "1", "frame_batch": "3"}, modality="video")
    assert same.fingerprint() == fp
    for other in ({"frames": "8"}, {"fps": "2"}, {"sequence": "false"}):
        assert backbones.create("clip-image", {**params, **other}, modality="video").fingerprint() != fp
    image_params = {k: v for k, v in params.items() if k in ("model", "dtype")}
    assert backbones.create("clip-image", image_params).fingerprint() != fp

    # a second run is a cache hit; frame_batch and decode workers change nothing
    again = run(ExtractConfig(dataset="vids", modality="video", backbone="clip-image",
                              params={**params, "decode_workers": "1", "frame_batch": "3"}), store)
    assert again.fingerprint == fp and again.computed == 0 and again.cached == 3


def test_audio_modality_on_video_paths(store, tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                         conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4), conv_bias=False,
                         num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, vocab_size=12)
    torch.manual_seed(0)
    w2v = tmp_path / "w2v"
    model = Wav2Vec2Model(cfg).eval()
    model.save_pretrained(w2v)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(w2v)
    (tmp_path / "s.mp4").write_bytes(mp4(6, tone=300.0))
    (tmp_path / "mute.mp4").write_bytes(mp4(6, audio=False))
    (tmp_path / "m.csv").write_text("id,split,label,audio\ns,train,x,s.mp4\nmute,train,x,mute.mp4\n")
    add_dataset(store, "tracks", read_manifest_file(tmp_path / "m.csv"), root=tmp_path, source="test")
    res = run(ExtractConfig(dataset="tracks", modality="audio", backbone="wav2vec2",
                            params={"model": str(w2v), "dtype": "float32"}), store)
    assert (res.computed, res.failed_new) == (1, 1)
    fs = FeatureSet(store, res.fingerprint)
    assert [e.reason for e in fs.errors()] == ["the video has no audio track"]
    row, ok = fs.read_pooled([content_key("audio", (tmp_path / "s.mp4").read_bytes())], dtype=np.float32)
    # independent: the track decoded here, resampled, normalised as the feature extractor does, mean-pooled
    with av.open(str(tmp_path / "s.mp4")) as c:
        track = np.concatenate([f.to_ndarray() for f in c.decode(c.streams.audio[0])], axis=1)
    wav = _media.resample(track.astype(np.float32).mean(axis=0, dtype=np.float64), 22050, 16000)
    x = torch.tensor(wav, dtype=torch.float32)
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        want = model(x[None]).last_hidden_state.mean(1)[0].numpy()
    assert ok.all()
    np.testing.assert_allclose(row[0], want, atol=1e-4)


def test_fer_over_video_frames_equals_fer_on_the_frames(tmp_path):
    pytest.importorskip("fer")
    from PIL import Image

    raw = mp4(7, audio=False)
    video = backbones.create("fer", {"frames": "3"}, modality="video").load()
    enc = video.encode([video.prepare(raw)])
    image = backbones.create("fer").load()
    decoded = all_frames(raw)
    picked = [decoded[int(np.floor((k + 0.5) * 7 / 3))] for k in range(3)]
    pngs = []
    for f in picked:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="PNG")
        pngs.append(image.prepare(buf.getvalue()))
    want = image.encode(pngs).pooled
    np.testing.assert_allclose(enc.sequences[0], want, atol=1e-5)
    np.testing.assert_allclose(enc.pooled[0], want.mean(0), atol=1e-5)


def test_cli_extract_video_and_show_video_params(tmp_path, clip_vision):
    import json

    from click.testing import CliRunner

    from featurestore.cli import cli

    (tmp_path / "a.mp4").write_bytes(mp4(5))
    (tmp_path / "b.mp4").write_bytes(b"\x00broken" * 40)
    (tmp_path / "m.csv").write_text("id,split,label,video\na,train,x,a.mp4\nb,train,y,b.mp4\n")
    runner = CliRunner()

    def fs(*args):
        return runner.invoke(cli, ["--store", str(tmp_path / "store"), *args], catch_exceptions=False)

    assert fs("datasets", "add", "v", "--manifest", str(tmp_path / "m.csv"), "--root", str(tmp_path)).exit_code == 0
    res = fs("extract", "--dataset", "v", "--modality", "video", "--backbone", "clip-image", "--model",
             str(clip_vision), "--param", "frames=2", "--json")
    assert res.exit_code == 10, res.output  # finished, one clip recorded as failed
    out = json.loads(res.output)
    assert (out["computed"], out["failed_new"], out["modality"]) == (1, 1, "video")
    res = fs("extract", "--dataset", "v", "--modality", "video", "--backbone", "wav2vec2")
    assert res.exit_code == 2 and "pick an image backbone" in res.output
    shown = json.loads(fs("backbones", "show", "clip-image", "--json").output)
    assert {p["param"] for p in shown["video_params"]} >= {"frames", "fps", "max_frames", "sequence"}


def test_datasets_registered_before_video_existed_still_load(store, tmp_path, demo_df):
    """A manifest written without video columns reads as having no video inputs."""
    import json

    import polars as pl

    from featurestore._io import write_checksums
    from featurestore.datasets import get_dataset
    from featurestore.hashing import file_digest
    from featurestore.va.cache import split_va

    ds = add_dataset(store, "old", demo_df.head(20), root=None, source="test")
    folder = store.dataset_dir("old")  # as written then: manifest.parquet, no video columns, checksums.json
    info = json.loads((folder / "dataset.json").read_text())
    path = folder / "manifest.parquet"
    pl.read_parquet(folder / info["manifest_file"]).drop(["video", "video_key"]).write_parquet(path)
    (folder / info["manifest_file"]).unlink()
    legacy = {k: v for k, v in info.items() if k not in ("manifest_file", "info_sha256")}
    (folder / "dataset.json").write_text(json.dumps({**legacy, "manifest_hash": file_digest(path)}))
    write_checksums(folder, ["manifest.parquet", "dataset.json"])
    old = get_dataset(store, "old")
    assert old.manifest["video_key"].null_count() == 20 and old.modalities == ds.modalities
    assert split_va(store, old.manifest, True) == ({}, {})
    with pytest.raises(ConfigError, match="no video inputs"):
        run(ExtractConfig(dataset="old", modality="video", backbone="clip-image"), store)
