"""`fs datasets add --layout L --root DIR`: each layout on a tiny replica written in its authors' format."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image

from featurestore.cli import cli
from featurestore.datasets.layouts import add_layout_dataset, names, read_layout
from featurestore.errors import ConfigError, DatasetError
from featurestore.store import open_store


# ---- writers of the replicas ---------------------------------------------------------------
def _jpg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)


def _wav(path: Path, seed: int, seconds: float = 0.05) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)


def _clip(path: Path, seed: int) -> None:
    """A real tiny mp4 when PyAV is installed, else a placeholder (decoding is the video backbone's job)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import av
    except ImportError:
        path.write_bytes(b"placeholder clip %d" % seed)
        return
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("flv" if path.suffix == ".flv" else "mpeg4", rate=5)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _counts(df: pl.DataFrame, col: str) -> dict:
    return dict(df.filter(pl.col(col).is_not_null()).group_by(col).len().iter_rows())


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "store", create=True)


def test_every_issue_layout_is_registered():
    assert set(names()) == {"raf-db", "affectnet", "fer2013", "ravdess", "crema-d", "iemocap", "meld", "mosi",
                            "mosei", "dfew", "mafw"}


# ---- images --------------------------------------------------------------------------------
def test_raf_db_basic_release(tmp_path, store):
    root = tmp_path / "RAF"
    lines = ["train_00001.jpg 5", "train_00002.jpg 4", "train_00003.jpg 4", "test_0001.jpg 7", "test_0002.jpg 1",
             "train_00004.jpg 9", "garbage"]
    (root / "basic/EmoLabel").mkdir(parents=True)
    (root / "basic/EmoLabel/list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for i, line in enumerate(lines[:5]):
        stem = line.split()[0][:-4]
        if stem != "train_00003":  # one image missing
            _jpg(root / f"basic/Image/aligned/{stem}_aligned.jpg", i)
    ds = add_layout_dataset(store, "raf", "raf-db", root)
    df = ds.manifest
    assert ds.info["splits"] == {"train": 2, "test": 2}
    assert dict(zip(df["item_id"], df["label"])) == {"train_00001": "sadness", "train_00002": "happiness",
                                                     "test_0001": "neutral", "test_0002": "surprise"}
    assert df["image_key"].null_count() == 0
    rep = ds.info["layout"]
    assert rep["missing_files"] == {"image": 1} and rep["n_problems"] == 3
    reasons = " ".join(p["reason"] for p in rep["problems"])
    assert "class 1-7" in reasons and "image file missing" in reasons


def test_affectnet_csvs_with_va_and_special_codes(tmp_path, store):
    root = tmp_path / "AffectNet"
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
              "expression", "valence", "arousal"]
    train = [["689/a.jpg", 0, 0, 10, 10, "", 1, 0.5, -0.25], ["689/b.jpg", 0, 0, 10, 10, "", 7, -0.5, 0.75],
             ["690/c.jpg", 0, 0, 10, 10, "", 10, -2, -2], ["690/d.jpg", 0, 0, 10, 10, "", "x", 0, 0]]
    val = [["1/e.jpg", 0, 0, 10, 10, "", 6, -0.9, 0.9]]
    _csv(root / "Manually_Annotated_file_lists/training.csv", header, train)
    _csv(root / "Manually_Annotated_file_lists/validation.csv", header, val)
    for i, r in enumerate(train + val):
        _jpg(root / "Manually_Annotated_Images" / r[0], i)
    res = read_layout("affectnet", root)
    df = res.df
    assert _counts(df, "split") == {"train": 3, "test": 1}
    by = {r["item_id"]: r for r in df.iter_rows(named=True)}
    assert by["689/a.jpg"]["label"] == "happiness" and by["689/a.jpg"]["valence"] == 0.5
    assert by["689/a.jpg"]["arousal"] == -0.25
    assert by["689/b.jpg"]["label"] == "contempt"
    assert by["690/c.jpg"]["label"] is None and by["690/c.jpg"]["valence"] is None  # no-face, VA -2
    assert by["690/c.jpg"]["expression_raw"] == "no-face"
    assert by["1/e.jpg"]["label"] == "anger" and by["1/e.jpg"]["split"] == "test"
    assert res.report["layout"]["n_problems"] == 1 and res.report["layout"]["with_va"] == 3
    seven = read_layout("affectnet", root, options={"classes": "7"}).df
    assert seven.filter(pl.col("item_id") == "689/b.jpg")["label"][0] is None


def test_fer2013_pixels_become_content_keyed_pngs_in_the_store(tmp_path, store):
    root = tmp_path / "fer"
    rng = np.random.default_rng(0)
    pix = [rng.integers(0, 256, 48 * 48) for _ in range(4)]
    rows = [[3, " ".join(map(str, pix[0])), "Training"], [0, " ".join(map(str, pix[1])), "PublicTest"],
            [6, " ".join(map(str, pix[2])), "PrivateTest"], [3, " ".join(map(str, pix[0])), "Training"],  # duplicate
            [2, "1 2 3", "Training"], [9, " ".join(map(str, pix[3])), "Training"],
            [-1, " ".join(map(str, pix[3])), "Training"]]
    _csv(root / "fer2013.csv", ["emotion", "pixels", "Usage"], rows)
    ds = add_layout_dataset(store, "fer", "fer2013", root)
    df = ds.manifest
    assert ds.info["splits"] == {"train": 2, "val": 1, "test": 1}
    assert df["label"].to_list() == ["happiness", "anger", "neutral", "happiness"]
    folder = store.dataset_dir("fer") / "images"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 3 and not list(folder.glob(".*"))  # the duplicate is stored once, no temp files left
    first = Path(df["image"][0])
    assert first.parent == folder.resolve()
    back = np.asarray(Image.open(first))
    assert back.shape == (48, 48) and np.array_equal(back.ravel(), pix[0].astype(np.uint8))
    assert df["image_key"][0] == df["image_key"][3] and df["image_key"].null_count() == 0
    assert ds.info["layout"]["n_problems"] == 3
    with pytest.raises(DatasetError, match="already exists"):
        add_layout_dataset(store, "fer", "fer2013", root)
    again = add_layout_dataset(store, "fer", "fer2013", root, replace=True)
    assert again.manifest["image_key"].to_list() == df["image_key"].to_list()


# ---- audio: file names ------------------------------------------------------------------
def test_ravdess_names_give_labels_intensity_and_actor_groups(tmp_path, store):
    root = tmp_path / "RAVDESS"
    names_ = ["03-01-06-01-02-01-12", "03-01-03-02-01-02-01", "03-02-04-01-01-01-02", "03-01-01-01-01-01-01"]
    for i, n in enumerate(names_):
        _wav(root / f"Actor_{n[-2:]}" / f"{n}.wav", i)
    _clip(root / "Video_Speech_Actor_12/Actor_12/01-01-06-01-02-01-12.mp4", 9)  # full AV of the first recording
    _clip(root / "Video_Speech_Actor_05/Actor_05/02-01-05-02-01-01-05.mp4", 8)  # video only, no wav
    (root / "Actor_01/readme.wav").write_bytes(b"x")
    ds = add_layout_dataset(store, "rav", "ravdess", root)
    df = ds.manifest
    assert len(df) == 5
    by = {r["item_id"]: r for r in df.iter_rows(named=True)}
    first = by["01-06-01-02-01-12"]
    assert first["label"] == "fearful" and first["intensity"] == "normal" and first["group"] == "actor12"
    assert first["gender"] == "female" and first["audio"].endswith(".wav") and first["video"].endswith(".mp4")
    assert by["01-03-02-01-02-01"]["intensity"] == "strong" and by["01-03-02-01-02-01"]["group"] == "actor01"
    assert by["02-04-01-01-01-02"]["vocal_channel"] == "song"
    vo = by["01-05-02-01-01-05"]
    assert vo["audio"] is None and vo["video"].endswith("02-01-05-02-01-01-05.mp4")
    assert ds.info["layout"]["n_problems"] == 1  # readme.wav
    groups = df.group_by("group").agg(pl.col("split").n_unique())
    assert groups["split"].max() == 1  # an actor's items share a split
    speech = read_layout("ravdess", root, options={"channel": "speech"}).df
    assert len(speech) == 4


def test_crema_d_names(tmp_path, store):
    root = tmp_path / "CREMA-D"
    for i, n in enumerate(["1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_TIE_SAD_LO", "1091_WSI_NEU_XX"]):
        _wav(root / "AudioWAV" / f"{n}.wav", i)
    _clip(root / "VideoFlash/1001_DFA_ANG_XX.flv", 1)
    (root / "AudioWAV/1003_XXX_ANG_XX.wav").write_bytes(b"x")
    ds = add_layout_dataset(store, "crema", "crema-d", root)
    by = {r["item_id"]: r for r in ds.manifest.iter_rows(named=True)}
    assert set(by) == {"1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_TIE_SAD_LO", "1091_WSI_NEU_XX"}
    assert by["1001_DFA_ANG_XX"]["label"] == "anger" and by["1001_DFA_ANG_XX"]["video"].endswith(".flv")
    assert by["1001_IEO_HAP_HI"]["intensity"] == "high" and by["1002_TIE_SAD_LO"]["intensity"] == "low"
    assert by["1091_WSI_NEU_XX"]["group"] == "actor1091"
    assert by["1001_IEO_HAP_HI"]["transcript"] == "It's eleven o'clock"
    assert ds.info["layout"]["n_problems"] == 1 and ds.info["layout"]["n_groups"] == 3


# ---- IEMOCAP ----------------------------------------------------------------------------
_IEMO = {  # session -> [(turn, code, V, A, D, evaluator categories, words)]
    1: [("Ses01F_impro01_F000", "neu", 2.5, 2.5, 2.5, ["Neutral", "Neutral"], "Excuse me."),
        ("Ses01F_impro01_M000", "exc", 4.0, 4.5, 3.0, ["Excited", "Happiness"], "Do you have your forms?"),
        ("Ses01F_impro01_F001", "fru", 2.0, 3.5, 3.0, ["Frustration", "Anger"], "Yeah.")],
    2: [("Ses02M_script01_1_F000", "ang", 1.5, 4.0, 4.0, ["Anger"], "Get out."),
        ("Ses02M_script01_1_M000", "xxx", 3.0, 3.0, 3.0, ["Sadness", "Neutral"], "Fine.")],
    5: [("Ses05F_impro02_F000", "hap", 4.5, 3.5, 3.0, ["Happiness"], "That's great!"),
        ("Ses05F_impro02_M000", "sad", 1.0, 1.5, 2.0, ["Sadness"], "I know.")],
}


def _iemocap(root: Path, data: dict | None = None, missing: str = "Ses05F_impro02_M000") -> None:
    for ses, turns in (data or _IEMO).items():
        dialogs: dict[str, list] = {}
        for t in turns:
            dialogs.setdefault(t[0].rsplit("_", 1)[0], []).append(t)
        for dialog, ts in dialogs.items():
            base = root / f"Session{ses}" / "dialog"
            lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            words = []
            for k, (turn, code, v, a, d, cats, text) in enumerate(ts):
                lines.append(f"[{k + 1.5:.4f} - {k + 2.5:.4f}]\t{turn}\t{code}\t[{v:.4f}, {a:.4f}, {d:.4f}]")
                lines += [f"C-E{j + 1}:\t{c};\t()" for j, c in enumerate(cats)]
                lines += ["A-E1:\tval 3; act 2; dom  3;\t()", ""]
                words.append(f"{turn} [{k + 1.5:08.4f}-{k + 2.5:08.4f}]: {text}")
                if turn != missing:  # one wav missing
                    _wav(root / f"Session{ses}/sentences/wav/{dialog}/{turn}.wav", k)
            (base / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
            (base / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
            (base / "transcriptions").mkdir(parents=True, exist_ok=True)
            (base / "transcriptions" / f"{dialog}.txt").write_text("\n".join(words) + "\n")


def test_iemocap_sessions_labels_va_text_and_four_class_option(tmp_path, store):
    root = tmp_path / "IEMOCAP_full_release"
    _iemocap(root)
    ds = add_layout_dataset(store, "iemo", "iemocap", root)
    df = ds.manifest
    by = {r["item_id"]: r for r in df.iter_rows(named=True)}
    assert len(df) == 7 and ds.info["splits"] == {"train": 5, "test": 2}
    assert _counts(df, "group") == {"Session1": 3, "Session2": 2, "Session5": 2}
    assert by["Ses01F_impro01_M000"]["label"] == "excitement" and by["Ses01F_impro01_M000"]["emotion_raw"] == "exc"
    assert by["Ses02M_script01_1_M000"]["label"] is None  # xxx: no agreement
    assert by["Ses01F_impro01_M000"]["valence"] == pytest.approx((4.0 - 3) / 2)
    assert by["Ses01F_impro01_M000"]["arousal"] == pytest.approx((4.5 - 3) / 2)
    assert by["Ses05F_impro02_M000"]["valence"] == pytest.approx(-1.0)
    assert by["Ses01F_impro01_F001"]["labels"] == ["anger", "frustration"]
    assert by["Ses01F_impro01_F000"]["text"] == "Excuse me." and by["Ses01F_impro01_F000"]["speaker"] == "Session1F"
    assert by["Ses05F_impro02_M000"]["audio"] is None and by["Ses05F_impro02_M000"]["text"] == "I know."
    assert ds.info["layout"]["missing_files"] == {"audio": 1}
    four = read_layout("iemocap", root, options={"classes": "4"}).df
    got = dict(zip(four["item_id"], four["label"]))
    assert got["Ses01F_impro01_M000"] == "happiness" and got["Ses01F_impro01_F001"] is None
    assert set(four["label"].drop_nulls()) == {"neutral", "happiness", "anger", "sadness"}
    assert four.filter(pl.col("item_id") == "Ses01F_impro01_F001")["emotion_raw"][0] == "fru"


# ---- video datasets ----------------------------------------------------------------------
def test_meld_split_csvs_and_clips(tmp_path, store):
    root = tmp_path / "MELD.Raw"
    header = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
              "Episode", "StartTime", "EndTime"]
    train = [[1, "Oh my God, he\u2019s lost it.", "Monica", "surprise", "negative", 0, 0, 8, 21, "", ""],
             [2, "Hi Joey!", "Chandler", "joy", "positive", 0, 1, 8, 21, "", ""],
             [3, "bad", "Ross", "joy", "positive", "x", 2, 8, 21, "", ""]]
    dev = [[1, "Okay.", "Ross", "neutral", "neutral", 0, 0, 4, 7, "", ""]]
    test = [[1, "Why?", "Rachel", "anger", "negative", 3, 1, 2, 2, "", ""]]
    _csv(root / "train_sent_emo.csv", header, train)
    _csv(root / "dev_sent_emo.csv", header, dev)
    _csv(root / "test_sent_emo.csv", header, test)
    _clip(root / "train_splits/dia0_utt0.mp4", 0)
    _clip(root / "train_splits/dia0_utt1.mp4", 1)
    _clip(root / "output_repeated_splits_test/dia3_utt1.mp4", 3)  # the dev clip is missing
    ds = add_layout_dataset(store, "meld", "meld", root)
    df = ds.manifest
    by = {r["item_id"]: r for r in df.iter_rows(named=True)}
    assert set(by) == {"train/dia0_utt0", "train/dia0_utt1", "val/dia0_utt0", "test/dia3_utt1"}
    assert by["train/dia0_utt0"]["text"] == "Oh my God, he\u2019s lost it." and by["train/dia0_utt0"]["group"] == "Monica"
    assert by["train/dia0_utt1"]["label"] == "joy" and by["train/dia0_utt1"]["sentiment"] == "positive"
    assert by["train/dia0_utt0"]["video"] == by["train/dia0_utt0"]["audio"]
    assert by["train/dia0_utt0"]["video_key"] != by["train/dia0_utt0"]["audio_key"]  # keyed per modality
    assert by["val/dia0_utt0"]["video"] is None and by["val/dia0_utt0"]["text"] == "Okay."
    assert ds.info["modalities"]["video"] == 3 and ds.info["modalities"]["text"] == 4
    rep = ds.info["layout"]
    assert rep["missing_files"] == {"video": 1, "audio": 1} and rep["n_problems"] == 3
    sent = read_layout("meld", root, options={"label": "sentiment"}).df
    assert _counts(sent, "label") == {"negative": 2, "positive": 1, "neutral": 1}


def _mmsa(root: Path, emotions: bool) -> None:
    header = ["video_id", "clip_id", "text", "label", "label_T", "label_A", "label_V", "annotation", "mode"]
    rows = [["vidA", "1", "i loved it", 2.4, 2, 2, 2, "Positive", "train"],
            ["vidA", "2", "it was bad", -1.8, -2, -1, -1, "Negative", "valid"],
            ["vidB", "1", "it is a movie", 0.0, 0, 0, 0, "Neutral", "test"],
            ["vidB", "2", "broken", "n/a", 0, 0, 0, "Neutral", "train"]]
    if emotions:
        header += ["happy", "sad", "anger", "surprise", "disgust", "fear"]
        emo = [[2.0, 0, 0, 0.3, 0, 0], [0, 1.0, 0.6, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
        rows = [r + e for r, e in zip(rows, emo)]
    _csv(root / "label.csv", header, rows)
    _clip(root / "Raw/vidA/1.mp4", 1)
    _wav(root / "Raw/vidA/2.wav", 2)


@pytest.mark.parametrize("layout", ["mosi", "mosei"])
def test_mosi_mosei_mmsa_layout(tmp_path, store, layout):
    root = tmp_path / layout.upper()
    _mmsa(root, emotions=layout == "mosei")
    ds = add_layout_dataset(store, layout, layout, root)
    df = ds.manifest
    by = {r["item_id"]: r for r in df.iter_rows(named=True)}
    assert set(by) == {"vidA/1", "vidA/2", "vidB/1"}
    assert ds.info["splits"] == {"train": 1, "val": 1, "test": 1}
    assert by["vidA/1"]["sentiment"] == 2.4 and by["vidA/1"]["valence"] == pytest.approx(0.8)
    assert by["vidA/1"]["label"] == "non-negative" and by["vidA/2"]["label"] == "negative"
    assert by["vidA/1"]["video"] and by["vidA/1"]["audio"] == by["vidA/1"]["video"]
    assert by["vidA/2"]["video"] is None and by["vidA/2"]["audio"].endswith("2.wav")
    assert by["vidB/1"]["video"] is None and by["vidB/1"]["text"] == "it is a movie"
    assert by["vidA/1"]["group"] == by["vidA/2"]["group"] == "vidA"
    if layout == "mosei":
        assert by["vidA/1"]["labels"] == ["happy", "surprise"] and by["vidA/2"]["labels"] == ["sad", "anger"]
        assert by["vidB/1"]["labels"] == []
    else:
        assert all(v is None for v in df["labels"].to_list())
    assert ds.info["layout"]["n_problems"] == 2  # the bad score; vidB/1 has no clip
    three = read_layout(layout, root, options={"label": "polarity3"}).df
    assert dict(zip(three["item_id"], three["label"]))["vidB/1"] == "neutral"


def _dfew(root: Path) -> dict[str, tuple[str, int]]:
    """20 clips in 5 folds of 4; returns clip -> (label, fold)."""
    classes = ["happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"]
    truth = {f"{i:05d}": (classes[i % 7], (i - 1) // 4 + 1) for i in range(1, 21)}
    for fold in range(1, 6):
        test = [[int(c), classes.index(lab) + 1] for c, (lab, f) in truth.items() if f == fold]
        train = [[int(c), classes.index(lab) + 1] for c, (lab, f) in truth.items() if f != fold]
        _csv(root / f"EmoLabel_DataSplit/test(single-labeled)/set_{fold}.csv", ["video_name", "label"], test)
        _csv(root / f"EmoLabel_DataSplit/train(single-labeled)/set_{fold}.csv", ["video_name", "label"], train)
    for c in truth:
        if c != "00007":
            _clip(root / f"Clip/original/{c}.mp4", int(c))
    return truth


def test_dfew_official_folds(tmp_path, store):
    root = tmp_path / "DFEW"
    truth = _dfew(root)
    ds = add_layout_dataset(store, "dfew", "dfew", root)
    df = ds.manifest
    # 00007 (fold 2) has no clip: nothing to extract, so it is reported and left out
    assert len(df) == 19 and ds.info["folds"] == {"1": 4, "2": 3, "3": 4, "4": 4, "5": 4}
    for r in df.iter_rows(named=True):
        label, fold = truth[r["item_id"]]
        assert r["label"] == label and r["fold"] == str(fold)
        assert r["split"] == ("test" if fold == 1 else "train")
    assert ds.info["layout"]["missing_files"] == {"video": 1, "audio": 1}
    assert "00007" not in df["item_id"].to_list()
    other = read_layout("dfew", root, options={"split_fold": "3"}).df
    assert sorted(other.filter(pl.col("split") == "test")["item_id"]) == ["00009", "00010", "00011", "00012"]


def test_mafw_official_folds_single_and_compound(tmp_path, store):
    root = tmp_path / "MAFW"
    classes = ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt", "anxiety",
               "helplessness", "disappointment"]
    base = root / "Train & Test Set/single/no_caption"
    comp = root / "Train & Test Set/compound"
    clips = [f"{i:05d}" for i in range(1, 16)]
    for fold in range(1, 6):
        test = [c for i, c in enumerate(clips) if i % 5 == fold - 1]
        train = [c for c in clips if c not in test]
        for folder, label_of in ((base, lambda c: classes[int(c) % 11]),
                                 (comp, lambda c: f"{classes[int(c) % 11]}_sadness")):
            (folder / f"set_{fold}").mkdir(parents=True, exist_ok=True)
            (folder / f"set_{fold}/test.txt").write_text("".join(f"{c}.mp4 {label_of(c)}\n" for c in test))
            (folder / f"set_{fold}/train.txt").write_text("".join(f"{c}.mp4 {label_of(c)}\n" for c in train))
    with open(base / "set_2/test.txt", "a") as fh:
        fh.write("00099.mp4 joyful\n")
    for c in clips:
        _clip(root / f"data/clips/{c}.mp4", int(c))
    ds = add_layout_dataset(store, "mafw", "mafw", root)
    df = ds.manifest
    assert len(df) == 15 and ds.info["folds"] == {str(k): 3 for k in range(1, 6)}
    for r in df.iter_rows(named=True):
        i = int(r["item_id"])
        assert r["label"] == classes[i % 11] and r["fold"] == str((i - 1) % 5 + 1)
        assert r["video"].endswith(f"{r['item_id']}.mp4")
    assert ds.info["layout"]["n_problems"] == 1
    compound = read_layout("mafw", root, options={"set": "compound"}).df
    first = compound.filter(pl.col("item_id") == "00001").row(0, named=True)
    assert first["label"] == "disgust_sadness" and first["labels"] == ["disgust", "sadness"]


# ---- bad input: one clear line ---------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted({"raf-db", "affectnet", "fer2013", "iemocap", "meld", "mosi", "mosei",
                                           "dfew", "mafw"}))
def test_missing_label_files_are_one_line(tmp_path, store, layout):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as err:
        add_layout_dataset(store, "x", layout, tmp_path / "empty")
    assert "\n" not in str(err.value) and "docs/datasets.md" in str(err.value)


@pytest.mark.parametrize("layout", ["ravdess", "crema-d"])
def test_folders_without_items_are_one_line(tmp_path, store, layout):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable items"):
        add_layout_dataset(store, "x", layout, tmp_path / "empty")


def test_missing_root_and_bad_options(tmp_path, store):
    with pytest.raises(DatasetError, match="not a folder"):
        add_layout_dataset(store, "x", "raf-db", tmp_path / "nope")
    with pytest.raises(ConfigError, match="no option 'colour'"):
        read_layout("iemocap", tmp_path, options={"colour": "red"})
    with pytest.raises(ConfigError, match="must be one of"):
        read_layout("iemocap", tmp_path, options={"classes": "5"})


def test_cli_layout_add_reports_what_it_found(tmp_path):
    root = tmp_path / "DFEW"
    _dfew(root)
    runner = CliRunner()
    st = str(tmp_path / "store")
    out = runner.invoke(cli, ["--store", st, "datasets", "add", "dfew", "--layout", "dfew", "--root", str(root)])
    assert out.exit_code == 0, out.output
    assert "19 items" in out.output and "folds (--cv fold): 1: 4, 2: 3" in out.output
    assert "files missing: audio 1, video 1" in out.output and "00007" in out.output
    shown = runner.invoke(cli, ["--store", st, "datasets", "show", "dfew"])
    assert shown.exit_code == 0 and "folds (--cv fold): 1: 4, 2: 3" in shown.output and "layout:" not in shown.output
    js = runner.invoke(cli, ["--store", st, "datasets", "show", "dfew", "--json"])
    assert json.loads(js.output)["layout"]["folds"] == {"1": 4, "2": 3, "3": 4, "4": 4, "5": 4}
    bad = runner.invoke(cli, ["--store", st, "datasets", "add", "x", "--layout", "meld", "--root", str(root)])
    assert bad.exit_code == 5 and bad.output.count("\n") == 1 and "train_sent_emo.csv" in bad.output
    noroot = runner.invoke(cli, ["--store", st, "datasets", "add", "x", "--layout", "meld"])
    assert noroot.exit_code == 2 and "--root" in noroot.output
    opt = runner.invoke(cli, ["--store", st, "datasets", "add", "y", "--layout", "dfew", "--root", str(root),
                              "-o", "split_fold=9"])
    assert opt.exit_code == 2 and "split_fold" in opt.output
    lay = runner.invoke(cli, ["datasets", "layouts"])
    assert lay.exit_code == 0 and "iemocap" in lay.output and "classes" in lay.output


def test_an_unterminated_quote_swallows_the_rest_into_one_recorded_bad_row(tmp_path, store):
    root = tmp_path / "MOSI"
    _mmsa(root, emotions=False)
    with open(root / "label.csv", "a") as fh:
        fh.write('vidC,1,"never closed,1.0,0,0,0,Positive,train\nvidC,2,x,1.0,0,0,0,Positive,train\n')
    res = read_layout("mosi", root)
    assert sorted(res.df["item_id"]) == ["vidA/1", "vidA/2", "vidB/1"]
    bad = [p for p in res.report["layout"]["problems"] if p["item"] == "label.csv:7"]
    assert len(bad) == 1 and "sentiment score" in bad[0]["reason"]


def test_files_linked_from_outside_the_root_need_allow_outside_root(tmp_path):
    root = tmp_path / "RAF"
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel/list_patition_label.txt").write_text("train_00001.jpg 4\ntest_0001.jpg 7\n")
    _jpg(root / "Image/aligned/train_00001_aligned.jpg", 0)
    _jpg(tmp_path / "elsewhere/test_0001_aligned.jpg", 1)
    (root / "Image/aligned/test_0001_aligned.jpg").symlink_to(tmp_path / "elsewhere/test_0001_aligned.jpg")
    st = str(tmp_path / "store")
    runner = CliRunner()
    refused = runner.invoke(cli, ["--store", st, "datasets", "add", "raf", "--layout", "raf-db", "--root", str(root)])
    assert refused.exit_code == 5 and "--allow-outside-root" in refused.output
    ok = runner.invoke(cli, ["--store", st, "datasets", "add", "raf", "--layout", "raf-db", "--root", str(root),
                             "--allow-outside-root"])
    assert ok.exit_code == 0, ok.output
    assert "2 items" in ok.output


# ---- every documented code, written out by hand from the datasets' own documentation ----------
# (docs/datasets.md quotes it); the expected values below never come from the layouts' tables.
def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def _by_id(df: pl.DataFrame) -> dict:
    return {r["item_id"]: r for r in df.iter_rows(named=True)}


def test_raf_db_every_class_code_and_original_images(tmp_path):
    root = tmp_path / "RAF"
    # RAF-DB basic README: 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral
    lines = [f"train_0000{k}.jpg {k}" for k in range(1, 8)] + ["test_0001.jpg 2", "test_0002.jpg 3"]
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel/list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        name = line.split()[0]
        _touch(root / f"Image/aligned/{name[:-4]}_aligned.jpg")
        _touch(root / f"Image/original/{name}")
    by = _by_id(read_layout("raf-db", root).df)
    assert {k: r["label"] for k, r in by.items()} == {
        "train_00001": "surprise", "train_00002": "fear", "train_00003": "disgust", "train_00004": "happiness",
        "train_00005": "sadness", "train_00006": "anger", "train_00007": "neutral",
        "test_0001": "fear", "test_0002": "disgust"}
    assert {k: r["split"] for k, r in by.items() if k.startswith("test")} == {"test_0001": "test", "test_0002": "test"}
    orig = _by_id(read_layout("raf-db", root, options={"images": "original"}).df)
    assert orig["train_00001"]["image"].endswith("Image/original/train_00001.jpg")
    assert by["train_00001"]["image"].endswith("Image/aligned/train_00001_aligned.jpg")


def test_affectnet_every_expression_code_and_va_bounds(tmp_path):
    root = tmp_path / "AffectNet"
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
              "expression", "valence", "arousal"]
    # AffectNet: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger, 7 Contempt, 8 None,
    # 9 Uncertain, 10 No-Face; valence/arousal on [-1, 1], -2 = not annotated
    va = {0: (-1.0, 1.0), 1: (1.0, -1.0), 2: (-2, -2), 3: (0.0, 0.0)}
    rows = [[f"1/{c}.jpg", 0, 0, 10, 10, "", c, *va.get(c, (0.1, 0.2))] for c in range(11)]
    _csv(root / "Manually_Annotated_file_lists/training.csv", header, rows)
    for r in rows:
        _touch(root / "Manually_Annotated_Images" / r[0])
    by = _by_id(read_layout("affectnet", root).df)
    raw = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt", "none",
           "uncertain", "no-face"]
    assert [by[f"1/{c}.jpg"]["expression_raw"] for c in range(11)] == raw
    assert [by[f"1/{c}.jpg"]["label"] for c in range(11)] == raw[:8] + [None, None, None]
    assert (by["1/0.jpg"]["valence"], by["1/0.jpg"]["arousal"]) == (-1.0, 1.0)  # the bounds are in range
    assert (by["1/1.jpg"]["valence"], by["1/1.jpg"]["arousal"]) == (1.0, -1.0)
    assert by["1/2.jpg"]["valence"] is None and by["1/2.jpg"]["arousal"] is None
    assert (by["1/3.jpg"]["valence"], by["1/3.jpg"]["arousal"]) == (0.0, 0.0)


def test_fer2013_every_emotion_code_and_usage(tmp_path):
    root = tmp_path / "fer"
    usage = ["Training", "PublicTest", "PrivateTest", "Training", "PublicTest", "PrivateTest", "Training"]
    rows = [[code, " ".join([str(code * 30)] * (48 * 48)), usage[code]] for code in range(7)]
    _csv(root / "fer2013.csv", ["emotion", "pixels", "Usage"], rows)
    df = read_layout("fer2013", root, workdir=tmp_path / "work").df
    # FER2013: 0=Angry, 1=Disgust, 2=Fear, 3=Happy, 4=Sad, 5=Surprise, 6=Neutral;
    # Training -> train, PublicTest -> val, PrivateTest -> test
    assert df["item_id"].to_list() == [f"fer{i:05d}" for i in range(7)]
    assert df["label"].to_list() == ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
    assert df["split"].to_list() == ["train", "val", "test", "train", "val", "test", "train"]


def test_ravdess_every_emotion_code_and_name_field(tmp_path):
    root = tmp_path / "RAVDESS"
    # modality-channel-emotion-intensity-statement-repetition-actor; emotion 01 neutral, 02 calm, 03 happy,
    # 04 sad, 05 angry, 06 fearful, 07 disgust, 08 surprised
    for e in range(1, 9):
        _touch(root / f"Actor_01/03-01-0{e}-01-01-01-01.wav")
    _touch(root / "Actor_03/03-02-03-02-02-01-03.wav")  # song, strong, "Dogs ...", first repetition, actor 3
    _touch(root / "Actor_04/03-01-04-01-01-02-04.wav")  # speech, normal, "Kids ...", second repetition, actor 4
    by = _by_id(read_layout("ravdess", root).df)
    assert {e: by[f"01-0{e}-01-01-01-01"]["label"] for e in range(1, 9)} == {
        1: "neutral", 2: "calm", 3: "happy", 4: "sad", 5: "angry", 6: "fearful", 7: "disgust", 8: "surprised"}
    song = by["02-03-02-02-01-03"]
    assert (song["vocal_channel"], song["label"], song["intensity"], song["statement"], song["repetition"],
            song["group"], song["gender"]) == ("song", "happy", "strong", "Dogs are sitting by the door", 1,
                                               "actor03", "male")
    speech = by["01-04-01-01-02-04"]
    assert (speech["statement"], speech["repetition"], speech["gender"]) == ("Kids are talking by the door", 2,
                                                                             "female")
    assert read_layout("ravdess", root, options={"channel": "song"}).df["item_id"].to_list() == ["02-03-02-02-01-03"]


def test_crema_d_every_emotion_and_level_code(tmp_path):
    root = tmp_path / "CREMA-D"
    # actor_sentence_emotion_level: ANG anger, DIS disgust, FEA fear, HAP happy, NEU neutral, SAD sad;
    # LO low, MD medium, HI high, XX unspecified
    names_ = ["1001_DFA_ANG_LO", "1001_DFA_DIS_MD", "1001_DFA_FEA_HI", "1001_DFA_HAP_XX", "1002_TSI_NEU_XX",
              "1002_ITS_SAD_MD"]
    for n in names_:
        _touch(root / f"AudioWAV/{n}.wav")
    by = _by_id(read_layout("crema-d", root).df)
    assert {n: (by[n]["label"], by[n]["intensity"]) for n in names_} == {
        "1001_DFA_ANG_LO": ("anger", "low"), "1001_DFA_DIS_MD": ("disgust", "medium"),
        "1001_DFA_FEA_HI": ("fear", "high"), "1001_DFA_HAP_XX": ("happy", "unspecified"),
        "1002_TSI_NEU_XX": ("neutral", "unspecified"), "1002_ITS_SAD_MD": ("sad", "medium")}
    assert by["1002_TSI_NEU_XX"]["transcript"] == "The surface is slick"
    assert by["1002_TSI_NEU_XX"]["group"] == "actor1002"


def test_iemocap_rare_codes_dominance_scale_ends_and_test_session(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    data = {3: [("Ses03F_impro01_F000", "fea", 5.0, 1.0, 2.0, ["Fear"], "Oh no."),
                ("Ses03F_impro01_M000", "sur", 3.0, 5.0, 4.0, ["Surprise", "Excited"], "Really?"),
                ("Ses03F_impro01_F001", "dis", 2.0, 2.0, 1.0, ["Disgust"], "Ugh."),
                ("Ses03F_impro01_M001", "oth", 3.0, 3.0, 5.0, ["Other"], "Hm.")],
            4: [("Ses04M_script01_1_F000", "exc", 4.0, 4.0, 3.0, ["Excited"], "Yes!")]}
    _iemocap(root, data, missing="")
    by = _by_id(read_layout("iemocap", root, options={"test_session": "3"}).df)
    # codes: fea fear, sur surprise, dis disgust, oth other, exc excitement
    assert {k: r["label"] for k, r in by.items()} == {
        "Ses03F_impro01_F000": "fear", "Ses03F_impro01_M000": "surprise", "Ses03F_impro01_F001": "disgust",
        "Ses03F_impro01_M001": "other", "Ses04M_script01_1_F000": "excitement"}
    assert {k: r["split"] for k, r in by.items()} == {
        "Ses03F_impro01_F000": "test", "Ses03F_impro01_M000": "test", "Ses03F_impro01_F001": "test",
        "Ses03F_impro01_M001": "test", "Ses04M_script01_1_F000": "train"}
    fear = by["Ses03F_impro01_F000"]  # 1-5 -> [-1, 1]: 1 -> -1, 2 -> -0.5, 3 -> 0, 4 -> 0.5, 5 -> 1
    assert (fear["valence"], fear["arousal"], fear["dominance"]) == (1.0, -1.0, -0.5)
    assert by["Ses03F_impro01_M000"]["dominance"] == 0.5 and by["Ses03F_impro01_M001"]["dominance"] == 1.0
    assert by["Ses03F_impro01_F001"]["dominance"] == -1.0
    assert by["Ses03F_impro01_M000"]["labels"] == ["excitement", "surprise"]  # evaluators: Surprise; Excited
    assert by["Ses04M_script01_1_F000"]["labels"] == ["excitement"]


def test_meld_cp1252_csv_and_unknown_sentiment(tmp_path):
    root = tmp_path / "MELD.Raw"
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode\r\n"
    body = ("1,\"He\u2019s at the caf\u00e9 \u2013 \u201cnow\u201d.\",Joey,Joy,Positive,0,0,1,1\r\n"
            "2,Hmm.,Ross,Neutral,unsure,0,1,1,1\r\n")
    (root).mkdir()
    (root / "train_sent_emo.csv").write_bytes((header + body).encode("cp1252"))
    for u in (0, 1):
        _touch(root / f"train_splits/dia0_utt{u}.mp4")
    by = _by_id(read_layout("meld", root).df)
    assert by["train/dia0_utt0"]["text"] == "He\u2019s at the caf\u00e9 \u2013 \u201cnow\u201d."
    assert by["train/dia0_utt0"]["label"] == "joy" and by["train/dia0_utt1"]["label"] == "neutral"
    sent = _by_id(read_layout("meld", root, options={"label": "sentiment"}).df)
    assert sent["train/dia0_utt0"]["label"] == "positive"
    assert sent["train/dia0_utt1"]["label"] is None  # not one of the three sentiments


@pytest.mark.parametrize("layout", ["mosi", "mosei"])
def test_mmsa_polarity_thresholds_and_valence_scale(tmp_path, layout):
    root = tmp_path / layout
    scores = {"a": -3.0, "b": -0.4, "c": 0.0, "d": 0.4, "e": 3.0}
    header = ["video_id", "clip_id", "text", "label", "annotation", "mode", "happy", "sad", "anger", "surprise",
              "disgust", "fear"]
    rows = [["vid", c, f"t{c}", s, "Neutral", "train", 2.5, 0, 0, 0, 0, 1.5] for c, s in scores.items()]
    _csv(root / "label.csv", header, rows)
    for c in scores:
        _touch(root / f"Raw/vid/{c}.mp4")

    def labels(**opt):
        df = read_layout(layout, root, options=opt).df
        return {r["item_id"][-1]: r["label"] for r in df.iter_rows(named=True)}
    # polarity2: negative < 0 <= non-negative; polarity3: by the sign
    assert labels() == {"a": "negative", "b": "negative", "c": "non-negative", "d": "non-negative",
                        "e": "non-negative"}
    assert labels(label="polarity3") == {"a": "negative", "b": "negative", "c": "neutral", "d": "positive",
                                         "e": "positive"}
    by = _by_id(read_layout(layout, root).df)
    assert by["vid/a"]["valence"] == -1.0 and by["vid/e"]["valence"] == 1.0 and by["vid/c"]["valence"] == 0.0
    if layout == "mosei":  # intensities on [0, 3] kept as given
        assert by["vid/a"]["happy_intensity"] == 2.5 and by["vid/a"]["fear_intensity"] == 1.5
        assert by["vid/a"]["labels"] == ["happy", "fear"]


def test_mafw_split_follows_split_fold_and_a_clip_in_two_test_lists_keeps_the_first(tmp_path):
    root = tmp_path / "MAFW"
    base = root / "Train & Test Set/single/no_caption"
    clips = {f"{i:05d}": (i - 1) // 2 + 1 for i in range(1, 11)}  # two clips per fold
    for fold in range(1, 6):
        test = [c for c, f in clips.items() if f == fold] + (["00001"] if fold == 4 else [])
        (base / f"set_{fold}").mkdir(parents=True)
        (base / f"set_{fold}/test.txt").write_text("".join(f"{c}.mp4 anger\n" for c in test))
        (base / f"set_{fold}/train.txt").write_text(
            "".join(f"{c}.mp4 anger\n" for c, f in clips.items() if f != fold and c not in test))
    for c in clips:
        _touch(root / f"data/clips/{c}.mp4")
    res = read_layout("mafw", root)
    by = _by_id(res.df)
    assert sorted(k for k, r in by.items() if r["split"] == "test") == ["00001", "00002"]
    assert sorted(k for k, r in by.items() if r["split"] == "train") == [f"{i:05d}" for i in range(3, 11)]
    assert by["00001"]["fold"] == "1"  # also in fold 4's test list: recorded, kept in the first
    assert any("00001" in p["reason"] for p in res.report["layout"]["problems"])
    three = _by_id(read_layout("mafw", root, options={"split_fold": "3"}).df)
    assert sorted(k for k, r in three.items() if r["split"] == "test") == ["00005", "00006"]
