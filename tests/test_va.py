"""The VA layer: lexicon, model and learned scorers, the VA cache, the reader and the CLI.

Real components throughout: the packaged VADER lexicon and MiniLM, tiny transformers
models built from small configs and saved to a temporary folder (nothing downloaded).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
from _faults import failing_reads

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")

from click.testing import CliRunner  # noqa: E402

from featurestore import va  # noqa: E402
from featurestore.cli import cli  # noqa: E402
from featurestore.datasets import add_dataset, get_dataset, read_manifest_file  # noqa: E402
from featurestore.datasets.manifest import normalise  # noqa: E402
from featurestore.errors import BackboneError, ConfigError, NotFoundError  # noqa: E402
from featurestore.features import list_feature_sets  # noqa: E402
from featurestore.reader import load_split  # noqa: E402
from featurestore.va.cache import VASet, list_va_sets  # noqa: E402
from featurestore.va.labels import dataset_label_va, default_table  # noqa: E402
from featurestore.va.learned import ccc, pearson  # noqa: E402
from featurestore.va.lexicon import read_lexicon  # noqa: E402
from featurestore.jobs.extract import ExtractConfig  # noqa: E402
from featurestore.jobs.extract import run as extract  # noqa: E402
from featurestore.jobs.va import FitConfig, VAConfig, fit, run  # noqa: E402


# ---- helpers ---------------------------------------------------------------------------
def wav_bytes(seconds=0.4, freq=220.0, sr=16000, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def text_dataset(store, name: str, texts: dict[str, str], split="train"):
    df = pl.DataFrame({"item_id": list(texts), "text": list(texts.values()), "split": [split] * len(texts)})
    return add_dataset(store, name, normalise(df, source="test"), root=None, source="test")


def audio_dataset(store, root: Path, name="clips"):
    root.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate((180.0, 330.0, 523.0)):
        (root / f"c{i}.wav").write_bytes(wav_bytes(0.3 + 0.1 * i, f, seed=i))
    (root / "junk.wav").write_bytes(b"not a wav file at all" * 10)
    (root / "m.csv").write_text("id,audio,split\nc0,c0.wav,train\nc1,c1.wav,train\nc2,c2.wav,test\n"
                                "junk,junk.wav,test\n")
    return add_dataset(store, name, read_manifest_file(root / "m.csv"), root=root, source="test")


SPEECH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
              conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), conv_bias=False,
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=12)
AROUSAL_DOMINANCE_VALENCE = {0: "arousal", 1: "dominance", 2: "valence"}


def save_speech_regressor(path: Path, id2label=AROUSAL_DOMINANCE_VALENCE, *, head=True, bias=None) -> Path:
    """A tiny random wav2vec2 with an MSP-Podcast-style 3-output regression head."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification, Wav2Vec2Model

    cfg = Wav2Vec2Config(**SPEECH, num_labels=len(id2label), id2label=id2label,
                         label2id={v: k for k, v in id2label.items()}, problem_type="regression")
    torch.manual_seed(0)
    model = Wav2Vec2ForSequenceClassification(cfg) if head else Wav2Vec2Model(cfg)  # head: labelled, no weights
    if bias is not None:
        with torch.no_grad():
            model.classifier.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    model.eval().save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(path)
    return path


# ---- lexicon ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vader():
    return va.create("lexicon").load()


def test_lexicon_negation_and_intensifiers_on_hand_checked_sentences(vader):
    v = lambda text: vader.score_text(text)[0]  # noqa: E731
    assert v("good") > 0 and v("not good") < 0 and v("very good") > v("good") > v("slightly good") > 0
    assert v("extremely good") > v("good")
    assert v("this movie was never fun") < 0 < v("this movie was fun")
    assert v("I don't like it") < 0 < v("I like it")
    assert v("not very good") < 0 and abs(v("not very good")) > abs(v("not good"))  # boost, then negate
    assert v("terrible") < 0 < v("not terrible")
    assert v("not bad, good") > 0.4  # the comma ends the negation's reach
    assert v("not bad, good") == pytest.approx((-0.74 * v("bad") + v("good")) / 2)
    # VADER's rating of "good" is 1.9 on -4..4; negation multiplies by -0.74
    assert v("good") == pytest.approx(1.9 / 4) and v("not good") == pytest.approx(-0.74 * 1.9 / 4)
    # averaged over matched words only; no matched word: unknown; VADER has no arousal
    assert v("good table chair") == pytest.approx(v("good"))
    assert np.isnan(v("table chair")) and np.isnan(vader.score_text("good")[1])
    assert vader.provides() == (True, False)


def test_user_lexicon_on_declared_scales(tmp_path):
    nrc = tmp_path / "nrc.txt"  # NRC-VAD layout: TSV with a header, 0..1
    nrc.write_text("Word\tValence\tArousal\tDominance\nhappy\t1.000\t0.735\t0.772\ncalm\t0.5\t0.0\t0.4\n")
    lex = va.create("lexicon", {"lexicon": str(nrc), "scale": "0..1"}).load()
    assert lex.score_text("happy") == pytest.approx((1.0, 0.47))
    assert lex.score_text("calm") == pytest.approx((0.0, -1.0))
    assert lex.score_text("not happy")[1] == pytest.approx(0.74 * 0.47)  # arousal dampened, not flipped
    warriner = tmp_path / "w.csv"  # Warriner layout: CSV, 1..9, V.Mean.Sum/A.Mean.Sum columns
    warriner.write_text("Word,V.Mean.Sum,A.Mean.Sum,D.Mean.Sum\nvacation,8.53,5.0,7.0\nabduction,2.05,9,3\n")
    w = va.create("lexicon", {"lexicon": str(warriner), "scale": "1..9"}).load()
    assert w.score_text("vacation") == pytest.approx(((8.53 - 5) / 4, 0.0))
    assert w.score_text("abduction")[1] == pytest.approx(1.0)
    # a new lexicon file is a new source
    assert lex.source("text") != w.source("text") != va.create("lexicon").source("text")


def _vader_word_valence(text: str) -> float:
    """vaderSentiment's own valence (on -4..4) of the last word of `text`, boosters and negators applied."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer, SentiText

    senti = SentiText(text)
    words = senti.words_and_emoticons
    return SentimentIntensityAnalyzer().sentiment_valence(0, senti, words[-1], len(words) - 1, [])[-1]


def test_lexicon_booster_weight_falls_with_distance_as_vader_scales_it(vader):
    # VADER: B_INCR = 0.293 on -4..4, times 1, 0.95, 0.9 at 1, 2, 3 words before; "good" is 1.9 on -4..4.
    # "movie" and "day" are in no lexicon and are not modifiers, so they only push "very" further away.
    b = 0.293
    exact = va.create("lexicon", {"booster": b / 4}).load()  # VADER's booster, mapped to [-1, 1]
    v = lambda scorer, text: scorer.score_text(text)[0]  # noqa: E731
    for text, weight in (("very good", 1.0), ("very movie good", 0.95), ("very movie day good", 0.9)):
        assert v(exact, text) == pytest.approx((1.9 + weight * b) / 4, abs=1e-12), text
        assert v(exact, text) == pytest.approx(_vader_word_valence(text) / 4, abs=1e-12), text  # vaderSentiment
        assert v(vader, text) == pytest.approx(1.9 / 4 + weight * 0.073, abs=1e-12), text  # default booster 0.073
    assert v(exact, "very movie day extra good") == pytest.approx(1.9 / 4)  # 4 words away: no effect
    # negative words are pushed away from 0 the same way: "bad" is -2.5
    assert v(exact, "very movie bad") == pytest.approx(-(2.5 + 0.95 * b) / 4, abs=1e-12)
    # each modifier weighs by its own distance: "very" nearest (+b), "slightly" next (-0.95 b)
    assert v(exact, "slightly very good") == pytest.approx((1.9 + b - 0.95 * b) / 4, abs=1e-12)
    assert v(exact, "very slightly good") == pytest.approx((1.9 - b + 0.95 * b) / 4, abs=1e-12)


def test_lexicon_dampener_moves_a_value_towards_0_and_never_past_it(vader, tmp_path):
    # VADER's ratings: "aboard" 0.1, "amorphous" -0.2 (on -4..4); a dampener takes 0.073 (x0.95, x0.9) off |v|
    v = lambda text: vader.score_text(text)[0]  # noqa: E731
    assert v("aboard") == pytest.approx(0.1 / 4) and v("amorphous") == pytest.approx(-0.2 / 4)
    for text in ("slightly aboard", "barely amorphous", "slightly movie aboard", "barely movie day amorphous"):
        assert v(text) == 0.0, text  # |v| < the step: stops at 0 (VADER itself would cross to the other sign)
    assert v("slightly good") == pytest.approx(1.9 / 4 - 0.073, abs=1e-12)
    assert v("barely bad") == pytest.approx(-(2.5 / 4 - 0.073), abs=1e-12)
    # arousal too: a user lexicon on 0..1 -> [-1, 1]; "meh" valence 0.52 -> 0.04, arousal 0.49 -> -0.02
    lex_file = tmp_path / "l.tsv"
    lex_file.write_text("word\tvalence\tarousal\nmeh\t0.52\t0.49\nyay\t0.9\t0.8\n")
    lex = va.create("lexicon", {"lexicon": str(lex_file), "scale": "0..1"}).load()
    assert lex.score_text("meh") == pytest.approx((0.04, -0.02))
    assert lex.score_text("slightly meh") == (0.0, 0.0)
    assert lex.score_text("slightly yay") == pytest.approx((0.8 - 0.073, 0.6 - 0.073), abs=1e-12)


def test_lexicon_each_negator_in_the_window_multiplies_again(vader, tmp_path):
    # VADER multiplies by N_SCALAR = -0.74 once per negator among the 3 preceding words: two negators
    # give (-0.74)^2 = +0.5476 ("not never good" is mildly positive), three give (-0.74)^3
    v = lambda text: vader.score_text(text)[0]  # noqa: E731
    assert v("not never good") == pytest.approx(0.74 ** 2 * 1.9 / 4, abs=1e-12)
    assert v("not never good") == pytest.approx(_vader_word_valence("not never good") / 4, abs=1e-12)
    assert v("never not bad") == pytest.approx(0.74 ** 2 * -2.5 / 4, abs=1e-12)
    assert v("not never nothing good") == pytest.approx(-(0.74 ** 3) * 1.9 / 4, abs=1e-12)
    # arousal: x0.74 per negator, never flipped
    lex_file = tmp_path / "l.tsv"
    lex_file.write_text("word\tvalence\tarousal\nyay\t0.9\t0.8\n")  # -> (0.8, 0.6)
    lex = va.create("lexicon", {"lexicon": str(lex_file), "scale": "0..1"}).load()
    assert lex.score_text("not never yay") == pytest.approx((0.74 ** 2 * 0.8, 0.74 ** 2 * 0.6), abs=1e-12)
    assert lex.score_text("not yay") == pytest.approx((-0.74 * 0.8, 0.74 * 0.6), abs=1e-12)


def test_lexicon_outside_its_scale_is_refused_with_rows_named(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("word\tvalence\tarousal\nfine\t0.5\t0.5\nwild\t1.7\t0.2\nodd\t0.3\tlots\nlow\t-0.1\t0.9\n")
    with pytest.raises(ConfigError) as err:
        read_lexicon(bad, scale="0..1")
    msg = str(err.value)
    assert "3 value(s)" in msg and "line 3 'wild': valence 1.7" in msg and "'odd'" in msg and "line 5 'low'" in msg
    assert "fine" not in msg
    with pytest.raises(ConfigError, match="scale"):
        va.create("lexicon", {"lexicon": str(bad)})  # a user lexicon must declare its scale
    with pytest.raises(ConfigError, match="LOW..HIGH"):
        va.create("lexicon", {"lexicon": str(bad), "scale": "1..0"})


# ---- cache, reader, wrong modality -------------------------------------------------------
TEXTS = {"a": "What a wonderful day", "b": "I am not happy at all", "c": "the table and the chair",
         "d": "What a wonderful day", "e": "This is very very bad"}


def test_lexicon_pass_caches_by_content_key_and_reader_aligns(store, minilm):
    text_dataset(store, "sent", TEXTS)
    with pytest.raises(ConfigError, match="not audio"):  # refused before any work
        run(VAConfig(dataset="sent", modality="audio", scorer="lexicon"), store)
    assert not list_va_sets(store) and not (store.root / "va").exists()
    res = run(VAConfig(dataset="sent", modality="text", scorer="lexicon", batch_size=2), store)
    assert res.items == 5 and res.unique == 4 and res.computed == 4 and res.unknown == 1 and res.failed_new == 0
    again = run(VAConfig(dataset="sent", modality="text", scorer="lexicon"), store)
    assert again.cache_hit and again.cached == 4 and again.source == res.source
    vs = VASet(store, res.source)
    assert vs.modality == "text" and vs.stats()["valence"] == 3 and vs.stats()["arousal"] == 0
    for seg in vs.segments.segments():  # unknowns are a mask, never NaN on disk
        with h5py.File(seg.path) as f:
            assert np.isfinite(f["arrays/va"][...]).all() and f["arrays/known"].dtype == np.uint8
    assert vs.verify() == []
    extract(ExtractConfig(dataset="sent", modality="text", backbone="minilm"), store, backbone=minilm)
    data = load_split(store, "sent", "train", {"text": "minilm"}, va=True)
    assert data.va_sources == {"text": res.source}
    scorer = va.create("lexicon")
    expect = np.array([scorer.score_text(TEXTS[i]) for i in data.item_ids])
    np.testing.assert_allclose(data.va["text"], expect, rtol=1e-6, equal_nan=True)
    assert data.va["text"][list(data.item_ids).index("b"), 0] < 0 < data.va["text"][list(data.item_ids).index("a"), 0]
    assert load_split(store, "sent", "train", {"text": "minilm"}, va={"text": "lexicon"}).va_sources == data.va_sources
    with pytest.raises(NotFoundError):
        load_split(store, "sent", "train", {"text": "minilm"}, va={"text": "model"})
    assert load_split(store, "sent", "train", {"text": "minilm"}).va == {}


# ---- model scorer ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speech_model(tmp_path_factory) -> Path:
    return save_speech_regressor(tmp_path_factory.mktemp("msp"))


def test_model_scorer_reads_output_order_from_id2label(store, tmp_path, speech_model):
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    from featurestore.backbones import _media

    audio_dataset(store, tmp_path / "clips")
    params = {"model": str(speech_model), "range": "-3..3"}
    scorer = va.create("model", params, device="cpu")
    assert scorer.modalities() == ("audio",)
    with pytest.raises(ConfigError, match="not text"):
        run(VAConfig(dataset="clips", modality="text", scorer="model", params=params), store)
    res = run(VAConfig(dataset="clips", modality="audio", scorer="model", params=params, device="cpu"), store)
    assert res.computed == 3 and res.failed_new == 1 and res.failed_total == 1
    vs = VASet(store, res.source)
    assert vs.spec["columns"] == {"valence": 2, "arousal": 0} and vs.spec["provides"] == [True, True]
    assert vs.errors()[0].item_id == "junk" and "cannot be decoded" in vs.errors()[0].reason
    # the stored VA is the model's own output columns, picked by name, mapped from -3..3
    model = AutoModelForAudioClassification.from_pretrained(speech_model).eval()
    fe = AutoFeatureExtractor.from_pretrained(speech_model)
    ds = get_dataset(store, "clips")
    rows = ds.manifest.filter(pl.col("item_id") != "junk")
    with torch.no_grad():
        logits = np.stack([model(**fe(_media.decode_audio(Path(p).read_bytes(), 16000), sampling_rate=16000,
                                      return_tensors="pt")).logits[0].numpy() for p in rows["audio"]])
    got, present = vs.read(rows["audio_key"].to_numpy().astype("S32"))
    assert present.all()
    np.testing.assert_allclose(got[:, 0], logits[:, 2] / 3, atol=1e-5)  # valence <- column "valence"
    np.testing.assert_allclose(got[:, 1], logits[:, 0] / 3, atol=1e-5)  # arousal <- column "arousal"
    assert not np.allclose(got[:, 0], logits[:, 1] / 3, atol=1e-5)  # ... not dominance
    assert vs.verify() == []


def test_model_scorer_refuses_what_it_cannot_score_honestly(tmp_path):
    no_head = save_speech_regressor(tmp_path / "nohead", head=False)
    with pytest.raises(BackboneError, match="no weights for"):
        va.create("model", {"model": str(no_head)}, device="cpu").load()
    generic = save_speech_regressor(tmp_path / "generic", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(ConfigError, match="labels="):
        va.create("model", {"model": str(generic)}, device="cpu").load()
    named = va.create("model", {"model": str(generic), "labels": "arousal,dominance,valence"}, device="cpu").load()
    assert named.columns == {"valence": 2, "arousal": 0}
    only_v = save_speech_regressor(tmp_path / "v", {0: "Valence"})
    s = va.create("model", {"model": str(only_v)}, device="cpu").load()
    assert s.provides() == (True, False)
    out = s.score([s.prepare(wav_bytes(), "audio")], "audio")
    assert np.isfinite(out[0, 0]) and -1 <= out[0, 0] <= 1 and np.isnan(out[0, 1])


def test_nan_and_inf_from_a_model_are_errors_never_values(store, tmp_path):
    """A model whose every output is NaN or inf is broken: the job stops, nothing is stored or
    recorded (a model that works on other items records these: see the Breaker tests)."""
    from featurestore.errors import BackboneError

    audio_dataset(store, tmp_path / "clips")
    for name, bias in (("nan", [0.0, 0.0, float("nan")]), ("inf", [float("inf"), 0.0, 0.0])):
        broken = save_speech_regressor(tmp_path / name, bias=bias)
        with pytest.raises(BackboneError, match="NaN or inf .* nothing was recorded"):
            run(VAConfig(dataset="clips", modality="audio", scorer="model", params={"model": str(broken)},
                         device="cpu"), store)
    for vs in list_va_sets(store):
        assert len(vs.index(refresh=True)) == 0 and vs.verify() == []
        assert all("NaN or inf" not in e.reason for e in vs.errors(resolved=True))


def test_model_scorer_on_a_text_regressor(store, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] + "what a wonderful day i am not happy".split()
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(words)})
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=2,
                     id2label={0: "valence", 1: "arousal"}, problem_type="regression")
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).eval().save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    text_dataset(store, "sent", TEXTS)
    params = {"model": str(tmp_path / "bert"), "range": "-1..1"}
    assert va.create("model", params).modalities() == ("text",)
    res = run(VAConfig(dataset="sent", modality="text", scorer="model", params=params, device="cpu"), store)
    assert res.computed == 4 and res.failed_new == 0
    values, present = VASet(store, res.source).read(
        get_dataset(store, "sent").manifest["text_key"].to_numpy().astype("S32"))
    assert present.all() and np.isfinite(values).all() and np.abs(values).max() <= 1
    np.testing.assert_array_equal(values[0], values[3])  # same text, same key, same row


def test_model_scorer_on_an_image_regressor(store, tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=37, num_labels=2, id2label={0: "Arousal", 1: "Valence"},
                    problem_type="regression")
    torch.manual_seed(0)
    ViTForImageClassification(cfg).eval().save_pretrained(tmp_path / "vit")
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / f"i{i}.png")
    (root / "bad.png").write_bytes(b"\x89PNG broken")
    (root / "m.csv").write_text("id,image\ni0,i0.png\ni1,i1.png\ni2,i2.png\nbad,bad.png\n")
    add_dataset(store, "faces", read_manifest_file(root / "m.csv"), root=root, source="test")
    params = {"model": str(tmp_path / "vit"), "range": "-1..1"}
    with pytest.raises(ConfigError, match="not audio"):
        run(VAConfig(dataset="faces", modality="audio", scorer="model", params=params), store)
    res = run(VAConfig(dataset="faces", modality="image", scorer="model", params=params, device="cpu"), store)
    assert res.computed == 3 and res.failed_total == 1
    assert VASet(store, res.source).spec["columns"] == {"valence": 1, "arousal": 0}


# ---- one bad item alone in its batch, unreadable storage, out of memory (docs/store.md, Failures) ----
class PoisonedScorer:
    """A real scorer whose score() raises for one chosen input (the failure injection only):
    counts how often that input reaches it."""

    def __init__(self, inner, poison, exc=lambda t: ValueError(f"scorer blew up on {t!r}")):
        self.inner, self.poison, self.exc, self.poison_calls = inner, poison, exc, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, batch, modality):
        if self.poison in list(batch):
            self.poison_calls += 1
            raise self.exc(self.poison)
        return self.inner.score(batch, modality)


def _words(store, demo_df, n):
    add_dataset(store, "words", demo_df.head(n), root=None, source="test")
    return demo_df["item_id"].to_list(), demo_df["text"].to_list()


@pytest.mark.parametrize("n, batch, poison", [(17, 8, 16),  # alone in the last batch (17 mod 8 == 1)
                                              (5, 1, 2)])  # --batch-size 1
def test_a_bad_item_alone_in_its_batch_is_recorded_and_va_scoring_goes_on(store, demo_df, vader, n, batch, poison):
    ids, texts = _words(store, demo_df, n)
    cfg = VAConfig(dataset="words", modality="text", scorer="lexicon", batch_size=batch)
    scorer = PoisonedScorer(vader, texts[poison])
    res = run(cfg, store, scorer=scorer)
    assert (res.computed, res.failed_new, res.failed_total) == (n - 1, 1, 1)
    assert scorer.poison_calls == 1  # recorded from the one failure, not scored a second time
    (err,) = VASet(store, res.source).errors()
    assert err.item_id == ids[poison]
    assert err.reason.startswith("VA scorer failed on this item: ValueError: scorer blew up")
    again = PoisonedScorer(vader, texts[poison])
    second = run(cfg, store, scorer=again)  # the job finished: a rerun has nothing left to do
    assert second.cache_hit and second.failed_total == 1 and again.poison_calls == 0


def test_an_item_that_alone_runs_out_of_memory_is_recorded_not_a_scorer_failure(store, demo_df, vader):
    ids, texts = _words(store, demo_df, 8)
    cfg = VAConfig(dataset="words", modality="text", scorer="lexicon", batch_size=4)
    scorer = PoisonedScorer(vader, texts[5], exc=lambda t: MemoryError(f"cannot allocate for {t!r}"))
    res = run(cfg, store, scorer=scorer)
    assert (res.computed, res.failed_new) == (7, 1) and scorer.poison_calls == 2  # in its batch, then alone
    (err,) = VASet(store, res.source).errors()
    assert err.item_id == ids[5] and "out of memory on this item alone" in err.reason
    retried = run(VAConfig(dataset="words", modality="text", scorer="lexicon", retry_errors=True), store, scorer=vader)
    assert (retried.cached, retried.computed, retried.failed_new, retried.failed_total) == (7, 1, 0, 0)
    assert VASet(store, res.source).errors() == [] and VASet(store, res.source).errors(resolved=True) == [err]


def test_out_of_memory_on_a_one_item_batch_stops_va_scoring_and_records_nothing(store, demo_df, vader):
    ids, texts = _words(store, demo_df, 5)
    scorer = PoisonedScorer(vader, texts[3], exc=lambda t: MemoryError())
    with pytest.raises(BackboneError, match="MemoryError while scoring VA for words.*not about an item"):
        run(VAConfig(dataset="words", modality="text", scorer="lexicon", batch_size=1), store, scorer=scorer)
    (vs,) = list_va_sets(store)
    assert vs.errors() == [] and len(vs.index(refresh=True)) == 3  # what was scored before it is kept


@pytest.mark.parametrize("code", ["EIO", "ESTALE"])
def test_an_io_error_reading_an_input_stops_va_scoring_records_nothing_and_a_rerun_retries(
        store, tmp_path, monkeypatch, speech_model, code):
    import errno

    from featurestore.errors import InputReadError

    audio_dataset(store, tmp_path / "clips")  # c0, c1 | c2, junk (not a wav: a bad item)
    cfg = VAConfig(dataset="clips", modality="audio", scorer="model", params={"model": str(speech_model)},
                   device="cpu", batch_size=2)
    failing_reads(monkeypatch, {"c2.wav": getattr(errno, code)})
    with pytest.raises(InputReadError, match=f"cannot read .*c2.wav: .*{code}.*not the item"):
        run(cfg, store)
    (vs,) = list_va_sets(store)
    assert vs.errors() == []  # nothing recorded against the item (or any other)
    assert len(vs.index(refresh=True)) == 2  # the batch before it is kept
    out = CliRunner().invoke(cli, ["--store", str(store.root), "va", "score", "--dataset", "clips", "--modality",
                                   "audio", "--scorer", "model", "--param", f"model={speech_model}",
                                   "--device", "cpu", "--batch-size", "2"])
    assert out.exit_code == InputReadError.exit_code
    (line,) = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: cannot read") and "not the item" in line and "Traceback" not in out.output
    assert vs.errors() == []
    monkeypatch.undo()  # the disk is back
    again = run(cfg, store)  # no --retry-errors needed
    assert (again.cached, again.computed, again.failed_new, again.failed_total) == (2, 1, 1, 1)
    assert [e.item_id for e in vs.errors()] == ["junk"]


def test_a_missing_dataset_root_stops_va_scoring_and_records_nothing(store, tmp_path, speech_model):
    from featurestore.errors import InputReadError

    root = tmp_path / "clips"
    audio_dataset(store, root)
    root.rename(tmp_path / "unmounted")
    cfg = VAConfig(dataset="clips", modality="audio", scorer="model", params={"model": str(speech_model)},
                   device="cpu", batch_size=2)
    with pytest.raises(InputReadError, match=f"root {root} of dataset 'clips' is missing"):
        run(cfg, store)
    assert all(vs.errors() == [] for vs in list_va_sets(store))
    (tmp_path / "unmounted").rename(root)
    again = run(cfg, store)
    assert (again.computed, again.failed_total) == (3, 1)


# ---- learned scorer on MiniLM embeddings of real human valence ratings ---------------------
@pytest.fixture(scope="module")
def demo_va_store(tmp_path_factory, minilm, demo_df):
    """The demo words that VADER rates (~1,400 in train+test), with their MiniLM rows cached."""
    from featurestore.store import open_store

    store = open_store(tmp_path_factory.mktemp("va") / "store", create=True)
    df = demo_df.filter(pl.col("valence").is_not_null() & pl.col("split").is_in(["train", "test"]))
    add_dataset(store, "demo-va", df, root=None, source="test")
    extract(ExtractConfig(dataset="demo-va", modality="text", backbone="minilm", batch_size=128), store,
            backbone=minilm)
    return store


def test_learned_ridge_on_cached_minilm_predicts_held_out_valence(demo_va_store):
    store = demo_va_store
    res = fit(FitConfig(dataset="demo-va", features="minilm", out="ridge-v"), store)
    val = res.metrics["valence"]
    print(f"\nheld-out valence (ridge, MiniLM, {val['n']} words): Pearson r={val['pearson']:.3f} CCC={val['ccc']:.3f}")
    assert val["n"] > 100 and val["pearson"] > 0.6 and val["ccc"] > 0.5
    assert res.metrics["arousal"]["n"] == 0 and res.n_train["arousal"] == 0  # no labels: skipped
    folder = Path(res.folder)
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json", "metrics.json"}
    assert json.loads((folder / "metrics.json").read_text())["test"]["valence"]["pearson"] == val["pearson"]
    with pytest.raises(ConfigError, match="already exists"):
        fit(FitConfig(dataset="demo-va", features="minilm", out="ridge-v"), store)
    # scoring reads the cached embeddings (a fitted model's name works as a scorer name)
    n_feature_rows = len(list_feature_sets(store)[0].index(refresh=True))
    scored = run(VAConfig(dataset="demo-va", modality="text", scorer="ridge-v"), store)
    assert scored.computed == scored.unique and scored.failed_new == 0 and scored.source.startswith("learned.ridge-v-")
    with pytest.raises(ConfigError, match="not audio"):
        run(VAConfig(dataset="demo-va", modality="audio", scorer="ridge-v"), store)
    test = load_split(store, "demo-va", "test", {"text": "minilm"}, va={"text": "ridge-v"})
    pred = test.va["text"]
    assert np.isnan(pred[:, 1]).all()  # arousal unknown: never fitted
    assert pearson(pred[:, 0], test.valence) == pytest.approx(val["pearson"], abs=2e-3)
    # inputs without a cached embedding are skipped, not encoded
    extra = {"w1": "sunshine and laughter", "w2": "grief and loss"}
    text_dataset(store, "fresh", extra)
    skipped = run(VAConfig(dataset="fresh", modality="text", scorer="ridge-v"), store)
    assert skipped.missing_features == 2 and skipped.computed == 0
    assert len(list_feature_sets(store)[0].index(refresh=True)) == n_feature_rows


def test_learned_mlp_saves_and_reloads_the_same_predictions(demo_va_store):
    store = demo_va_store
    res = fit(FitConfig(dataset="demo-va", features="minilm", out="mlp-v",
                        params={"kind": "mlp", "epochs": "15", "hidden": "64"}), store)
    assert res.metrics["valence"]["pearson"] > 0.5
    test = load_split(store, "demo-va", "test", {"text": "minilm"})
    scorer = va.create("learned", {"model": "mlp-v"}, store=store).load()
    again = va.create("learned", {"model": "mlp-v"}, store=store).load()
    x = test.features["text"]
    np.testing.assert_allclose(scorer.score(x, "text"), again.score(x, "text"), equal_nan=True)
    p = scorer.score(x, "text")[:, 0]
    assert pearson(p, test.valence) == pytest.approx(res.metrics["valence"]["pearson"], abs=1e-4)


# ---- replacing a fitted model is all-or-nothing (review 6) ------------------------------
@pytest.fixture(scope="module")
def va_model_template(tmp_path_factory, minilm, demo_df):
    """40 rated demo words with their MiniLM rows, and a ridge model `v1` fitted on them."""
    from featurestore.store import open_store

    store = open_store(tmp_path_factory.mktemp("vamodel") / "store", create=True)
    df = demo_df.filter(pl.col("valence").is_not_null() & (pl.col("split") == "train")).head(40)
    add_dataset(store, "rated", df, root=None, source="test")
    extract(ExtractConfig(dataset="rated", modality="text", backbone="minilm"), store, backbone=minilm)
    fit(FitConfig(dataset="rated", features="minilm", out="v1", test_split="", params={"alpha": "1"}), store)
    return store


@pytest.fixture
def va_model_store(va_model_template, tmp_path):
    import shutil

    from featurestore.store import open_store

    shutil.copytree(va_model_template.root, tmp_path / "store", symlinks=True)
    return open_store(tmp_path / "store")


def _model_files(store) -> dict:
    root = store.root / "va_models"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


REFIT = ["va", "fit", "--dataset", "rated", "--features", "text=minilm", "--out", "v1", "--test-split", "",
         "-p", "alpha=50", "--replace"]


@pytest.mark.parametrize("at", ["model.safetensors", "safetensors error", "metrics.json", "config.json",
                                "checksums.json"])
def test_a_full_disk_while_replacing_a_va_model_keeps_the_old_model_and_is_exit_11(va_model_store, monkeypatch, at):
    import errno

    import safetensors.numpy

    from featurestore import _io
    from featurestore._io import check_checksums

    store = va_model_store
    before = _model_files(store)
    assert check_checksums(store.root / "va_models" / "v1") == []

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    if at == "model.safetensors":
        monkeypatch.setattr(safetensors.numpy, "save_file", full)
    elif at == "safetensors error":  # what the library raises on a real full disk (not an OSError)
        def lib_full(*args, **kw):
            raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                              'message: "No space left on device" })')
        monkeypatch.setattr(safetensors.numpy, "save_file", lib_full)
    else:
        real = _io.write_bytes_atomic
        monkeypatch.setattr(_io, "write_bytes_atomic",
                            lambda target, data: full() if Path(target).name == at else real(target, data))
    res = CliRunner().invoke(cli, ["--store", str(store.root), *REFIT])
    monkeypatch.undo()
    assert _model_files(store) == before  # old weights, config, metrics and checksums, byte for byte
    assert check_checksums(store.root / "va_models" / "v1") == []
    assert res.exit_code == 11, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("error")]  # one line, no traceback
    assert "disk full writing" in line and "va_models" in line and "Traceback" not in res.output
    verified = CliRunner().invoke(cli, ["--store", str(store.root), "verify", "--json"])
    assert verified.exit_code == 0 and json.loads(verified.output)["unverified"] == [], verified.output
    # and with space again the replacement goes through as one unit
    assert CliRunner().invoke(cli, ["--store", str(store.root), *REFIT]).exit_code == 0
    assert json.loads((store.root / "va_models" / "v1" / "config.json").read_text())["params"]["alpha"] == 50
    assert check_checksums(store.root / "va_models" / "v1") == []
    assert [p.name for p in (store.root / "va_models").iterdir()] == ["v1"]


KILL_AT = """
import os, signal, sys
from featurestore import _io
from featurestore.cli import cli
real = _io.write_bytes_atomic
def write(target, data):
    if os.path.basename(str(target)) == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(target, data)
_io.write_bytes_atomic = write
cli(["--store", sys.argv[1], *sys.argv[3:]])
"""


def test_a_kill_while_replacing_a_va_model_keeps_the_old_model_whole(va_model_store):
    import os
    import subprocess
    import sys
    import time

    from featurestore._io import check_checksums

    store = va_model_store
    before = _model_files(store)
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(store.root), "config.json", *REFIT],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr
    models = store.root / "va_models"
    assert {k: v for k, v in _model_files(store).items() if k.startswith("v1/")} == before
    assert check_checksums(models / "v1") == []
    from featurestore.va.learned import list_models
    assert list_models(store) == ["v1"]  # the half-built folder is not a model
    (leftover,) = [p for p in models.iterdir() if p.name != "v1"]
    assert leftover.name.startswith(".v1.") and leftover.name.endswith(".tmp")
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    assert CliRunner().invoke(cli, ["--store", str(store.root), "gc"]).exit_code == 0
    res = CliRunner().invoke(cli, ["--store", str(store.root), "verify"])
    assert res.exit_code == 0, res.output
    assert _model_files(store) == before


def test_metrics():
    a = np.array([0.1, 0.4, -0.3, 0.8])
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0) and ccc(a, a) == pytest.approx(1.0)
    assert ccc(a, a + 1) < pearson(a, a + 1)  # CCC penalises the offset, Pearson does not


def test_dataset_label_va(store):
    df = pl.DataFrame({"item_id": ["1", "2", "3"], "text": ["x", "y", "z"], "label": ["joy", "calm", "calm"],
                       "valence": [0.9, 0.2, 0.4], "arousal": [0.5, -0.6, None], "split": ["train"] * 3})
    ds = add_dataset(store, "lab", normalise(df, source="test"), root=None, source="test")
    table = dataset_label_va(ds)  # classes sorted: calm (class means), joy (NRC-VAD "happy")
    np.testing.assert_allclose(table[0], [0.3, -0.6])
    np.testing.assert_allclose(table[1], default_table()["happy"])


def test_default_label_table_is_nrc_vad_min_max_normalised_per_column():
    # NRC-VAD (0..1): valence runs from 0.052 (disgust) to 1.000 (happy), arousal from 0.333 (sad)
    # to 0.875 (surprise); each column is mapped on its own range: 2 (x - lo) / (hi - lo) - 1
    val = lambda x: 2 * (x - 0.052) / (1.000 - 0.052) - 1  # noqa: E731
    aro = lambda x: 2 * (x - 0.333) / (0.875 - 0.333) - 1  # noqa: E731
    want = {"happy": (1.0, aro(0.735)), "sad": (val(0.225), -1.0), "anger": (val(0.167), aro(0.865)),
            "surprise": (val(0.875), 1.0), "disgust": (-1.0, aro(0.775)), "fear": (val(0.073), aro(0.840)),
            "neutral": (val(0.5), aro(0.5))}
    table = default_table()
    assert set(table) == set(want)
    for name, (v, a) in want.items():
        assert table[name] == pytest.approx((v, a), abs=1e-12), name
    assert table["happy"][1] == pytest.approx(0.48339483, abs=1e-8)  # 2 * 0.402 / 0.542 - 1
    assert table["neutral"] == pytest.approx((-0.05485232, -0.38376384), abs=1e-8)


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_va_commands_and_extract_va(tmp_path, speech_model):
    root = str(tmp_path / "store")
    runner = CliRunner()
    inv = lambda *args: runner.invoke(cli, ["--store", root, *args], catch_exceptions=False)  # noqa: E731
    assert inv("init").exit_code == 0
    (tmp_path / "m.csv").write_text("id,text\n" + "\n".join(f"{k},{v}" for k, v in TEXTS.items()) + "\n")
    assert inv("datasets", "add", "sent", "--manifest", str(tmp_path / "m.csv")).exit_code == 0
    listed = inv("va", "list")
    assert listed.exit_code == 0 and "lexicon" in listed.output and "learned" in listed.output
    # a VA scorer for the wrong modality stops `fs extract --va` before the backbone runs
    refused = inv("extract", "--dataset", "sent", "--modality", "text", "--backbone", "minilm",
                  "--va", "model", "--va-param", f"model={speech_model}")
    assert refused.exit_code == ConfigError.exit_code and "not text" in refused.output
    assert not (Path(root) / "features").exists()
    both = inv("extract", "--dataset", "sent", "--modality", "text", "--backbone", "minilm", "--va", "lexicon",
               "--json")
    assert both.exit_code == 0, both.output
    both = json.loads(both.output)
    assert both["computed"] == 4 and both["va"]["computed"] == 4 and both["va"]["scorer"] == "lexicon"
    out = inv("va", "score", "--dataset", "sent", "--modality", "text", "--scorer", "lexicon", "--json")
    assert out.exit_code == 0 and json.loads(out.output)["cache_hit"]
    info = inv("info", "sent", "--json")
    cov = json.loads(info.output)["va"]
    assert cov[0]["modality"] == "text" and cov[0]["scored"] == 4 and cov[0]["valence"] == 3
    ls = json.loads(inv("ls", "--json").output)
    assert ls["va_sources"][0]["scorer"] == "lexicon"
    assert inv("verify").exit_code == 0
    src = cov[0]["source"]
    assert inv("va", "info", src).exit_code == 0
    assert json.loads(inv("info", src, "--json").output)["spec"]["scorer"] == "lexicon"  # fs info knows VA too
    with open(next((Path(root) / "va" / src).glob("seg-*.h5")), "r+b") as fh:  # flip one byte
        fh.seek(200)
        b = fh.read(1)
        fh.seek(200)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert inv("verify").exit_code != 0


def test_a_scorer_that_fails_on_every_item_stops_and_records_nothing(store, demo_df, vader):
    from featurestore.errors import BackboneError

    ids, texts = _words(store, demo_df, 40)

    class Broken:
        def __getattr__(self, name):
            return getattr(vader, name)

        def score(self, batch, modality):
            raise RuntimeError("lexicon table has the wrong shape")

    cfg = VAConfig(dataset="words", modality="text", scorer="lexicon", batch_size=8)
    with pytest.raises(BackboneError, match="VA scorer .* failed on all 32 items"):
        run(cfg, store, scorer=Broken())
    (vs,) = list_va_sets(store)
    assert vs.errors(resolved=True) == [] and len(vs.index(refresh=True)) == 0
    res = run(cfg, store, scorer=vader)  # a fixed scorer scores everything, no --retry-errors needed
    assert (res.computed, res.failed_total) == (40, 0)


def test_a_fitted_va_models_feature_set_counts_as_in_use(va_model_store, minilm, demo_df):
    """`fs gc --keep-fingerprints` keeps the features a fitted VA model reads; `fs verify` names the
    model when they are gone."""
    import shutil

    from featurestore.jobs.refresh import gc_fingerprints
    from featurestore.verify import verify_store

    store = va_model_store
    (old,) = list_feature_sets(store)
    newer = extract(ExtractConfig(dataset="rated", modality="text", backbone="minilm", params={"max_length": 64}),
                    store).fingerprint  # the same backbone with other settings: a newer fingerprint
    assert newer != old.fingerprint
    out = gc_fingerprints(store, 1)
    assert out["removed"] == [] and out["kept_in_use"] == {old.fingerprint: ["VA model v1"]}
    shutil.rmtree(old.folder)
    problems = [p["message"] for p in verify_store(store)]
    assert any(f"feature set {old.fingerprint} used by VA model v1 is missing" in m for m in problems)


def test_a_scorer_whose_every_value_is_inf_stops_and_a_few_bad_values_are_recorded(store, demo_df, vader,
                                                                                  monkeypatch):
    from featurestore.errors import BackboneError
    from featurestore.jobs.extract import Breaker

    ids, texts = _words(store, demo_df, 12)

    class Infinite:
        def __init__(self, first):
            self.left = first

        def __getattr__(self, name):
            return getattr(vader, name)

        def score(self, batch, modality):
            values = np.asarray(vader.score(batch, modality), dtype=np.float64)
            n = min(self.left, len(values))
            values[:n] = np.inf  # a model output, not an item's fault, until it has worked
            self.left -= n
            return values

    cfg = VAConfig(dataset="words", modality="text", scorer="lexicon", batch_size=2)
    with pytest.raises(BackboneError, match="failed on all 12 items"):
        run(cfg, store, scorer=Infinite(10**9))
    (vs,) = list_va_sets(store)
    assert vs.errors(resolved=True) == []
    monkeypatch.setattr(Breaker, "LIMIT", 4)
    res = run(cfg, store, scorer=Infinite(3))  # 3 inf rows, then it works: those 3 are recorded
    assert (res.computed, res.failed_new, res.failed_total) == (9, 3, 3)
