"""`lexicon`: text VA from word ratings, with negation and intensifiers.

The text is lower-cased and split into word tokens (apostrophes kept, so "don't" is one
token) and punctuation runs; `. , ; : ! ?` end a clause, and nothing carries across a
clause boundary. Each word found in the lexicon contributes its (valence, arousal):

- an intensifier ("very", "extremely", ...) up to 3 tokens before it pushes the value
  away from 0 by `booster` (x1, x0.95, x0.9 at distance 1, 2, 3), a dampener
  ("slightly", "barely", ...) pulls it towards 0 by the same amounts (never past 0);
- a negator ("not", "never", "no", any "...n't") up to `negation_window` tokens before
  it multiplies valence by `negation` (VADER's -0.74) and arousal by
  `negation_arousal` (0.74: "not angry" is calmer, not the opposite of angry).

The text's score is the mean over the matched words, per dimension (a word with no
arousal rating does not count towards arousal); with no matched word the dimension is
NaN (unknown). Negators and intensifiers are modifiers and never scored themselves.

The default lexicon is VADER's human valence ratings (mean of ten raters on -4..4,
divided by 4; arousal unknown). A user lexicon is a CSV/TSV file with a word column and
valence and/or arousal columns on a declared scale (`scale=0..1` for NRC-VAD,
`scale=1..9` for Warriner et al.), mapped linearly to [-1, 1]; a value outside the
declared scale refuses the whole file, naming the offending rows.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import field
from ..errors import BadItemError, ConfigError
from ..hashing import file_digest, normalise_text
from .base import ScorerConfig, VAScorer, parse_range, to_unit_range

__all__ = ["LexiconScorer", "LexiconConfig", "Lexicon", "read_lexicon", "vader", "NEGATORS", "BOOSTERS",
           "DAMPENERS", "tokenize"]

NEGATORS = frozenset("""not no never none nobody nothing neither nor nowhere cannot without
    cant dont doesnt didnt isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt aint
    mustnt neednt darent""".split())
BOOSTERS = frozenset("""very extremely really so totally absolutely completely incredibly highly hugely
    especially particularly remarkably super utterly deeply truly exceptionally enormously entirely
    greatly intensely thoroughly tremendously unbelievably most more amazingly awfully""".split())
DAMPENERS = frozenset("""slightly somewhat barely hardly marginally mildly partly kinda sorta scarcely
    fairly less least rather""".split())
_DISTANCE = (1.0, 0.95, 0.9)  # booster weight by distance, as VADER scales it
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]+|_+")
_BOUNDARY = re.compile(r"[.,;:!?]")

_WORD_NAMES = ("word", "term", "token", "english word")
_VALENCE_NAMES = ("valence", "v", "v.mean.sum", "valence_mean", "pleasure")
_AROUSAL_NAMES = ("arousal", "a", "a.mean.sum", "arousal_mean", "activation")


@dataclasses.dataclass(frozen=True)
class LexiconConfig(ScorerConfig):
    lexicon: str = field("", "CSV/TSV file of word ratings (empty: VADER's valence ratings, arousal unknown)")
    scale: str = field("", "the file's rating scale as LOW..HIGH, e.g. 0..1 (NRC-VAD), 1..9 (Warriner); "
                           "required with lexicon=")
    word_column: str = field("", "column holding the words (empty: word/term/token, else the first column)")
    valence_column: str = field("", "valence column (empty: one named valence/v/V.Mean.Sum; with no header "
                                    "row, the second column; 'none': no valence)")
    arousal_column: str = field("", "arousal column (empty: one named arousal/a/A.Mean.Sum; with no header "
                                    "row, the third column; 'none': no arousal)")
    negation: float = field(-0.74, "factor on a negated word's valence (VADER: -0.74)")
    negation_arousal: float = field(0.74, "factor on a negated word's arousal (towards the midpoint)")
    negation_window: int = field(3, "a negator affects this many following tokens (0: ignore negation)")
    booster: float = field(0.073, "how far an intensifier moves a value from 0 on [-1, 1] "
                                  "(VADER's 0.293 on its -4..4 scale)")

    def __post_init__(self):
        if self.lexicon and not self.scale:
            raise ConfigError(f"lexicon={self.lexicon!r} needs its rating scale: add scale=LOW..HIGH, "
                              "e.g. scale=0..1 for NRC-VAD or scale=1..9 for the Warriner norms")
        if self.scale:
            parse_range(self.scale, "scale")
        if self.negation_window < 0:
            raise ConfigError(f"negation_window={self.negation_window} must be 0 or more")
        if not 0 <= self.booster <= 1:
            raise ConfigError(f"booster={self.booster} must be on [0, 1]")


@dataclasses.dataclass(frozen=True)
class Lexicon:
    """Word -> (valence, arousal) on [-1, 1], NaN where the lexicon has no rating."""

    entries: dict[str, tuple[float, float]]
    origin: str
    digest: str

    def provides(self) -> tuple[bool, bool]:
        if not self.entries:
            return False, False
        arr = np.array(list(self.entries.values()), dtype=np.float64)
        return bool(np.isfinite(arr[:, 0]).any()), bool(np.isfinite(arr[:, 1]).any())


def vader() -> Lexicon:
    """VADER's valence ratings (packaged with vaderSentiment) on [-1, 1]."""
    from ..datasets.demo import _package_file, vader_lexicon

    path = _package_file("vaderSentiment", "vader_lexicon.txt")
    entries = {w.lower(): (max(-1.0, min(1.0, v / 4.0)), float("nan")) for w, v in vader_lexicon().items()}
    return Lexicon(entries, f"vaderSentiment/{path.name}", file_digest(path))


def read_lexicon(path: str | Path, *, scale: str, word_column: str = "", valence_column: str = "",
                 arousal_column: str = "") -> Lexicon:
    """Read a CSV/TSV lexicon and map its ratings from `scale` to [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"lexicon file {str(path)!r} " + ("is a folder; give the CSV/TSV file of word ratings"
                                                           if path.is_dir() else "does not exist"))
    lo, hi = parse_range(scale, "scale")
    rows = _read_rows(path)
    header, body, first_line = _split_header(rows)
    cols = _pick_columns(path, header, word_column, valence_column, arousal_column)
    entries, bad = {}, []
    for line, row in enumerate(body, start=first_line):
        if not row or not row[0].strip():
            continue
        word = normalise_text(row[cols[0]]).lower() if cols[0] < len(row) else ""
        vals = [_cell(row, c, lo, hi, line, word, dim, bad) for c, dim in zip(cols[1:], ("valence", "arousal"))]
        if word and word not in entries:
            entries[word] = tuple(float(to_unit_range(v, lo, hi)) for v in vals)
    if bad:
        shown = "; ".join(bad[:10]) + (f"; ... ({len(bad)} in all)" if len(bad) > 10 else "")
        raise ConfigError(f"lexicon {str(path)!r}: {len(bad)} value(s) outside the declared scale {scale} or "
                          f"not numbers: {shown}. Fix the rows, or declare the scale the file uses")
    if not entries:
        raise ConfigError(f"lexicon {str(path)!r} holds no words")
    if not any(math.isfinite(v) for pair in entries.values() for v in pair):
        raise ConfigError(f"lexicon {str(path)!r} holds {len(entries)} word(s) but no valence or arousal rating; "
                          "give a CSV/TSV with a word column and rating columns (valence_column=, arousal_column=)")
    return Lexicon(entries, str(path), file_digest(path))


def _read_rows(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8-sig")
    first = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first or path.suffix.lower() in (".tsv", ".tab") else ","
    return list(csv.reader(text.splitlines(), delimiter=delimiter))


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _split_header(rows: list[list[str]]) -> tuple[list[str] | None, list[list[str]], int]:
    """A first row whose second cell is not a number is a header."""
    if rows and len(rows[0]) > 1 and not _is_number(rows[0][1].strip()):
        return [c.strip().lower() for c in rows[0]], rows[1:], 2
    return None, rows, 1


def _pick_columns(path: Path, header: list[str] | None, word: str, valence: str, arousal: str) -> list[int | None]:
    def pick(given: str, names: Sequence[str], position: int, what: str) -> int | None:
        if given.lower() == "none":
            return None
        if header is None:
            if given:
                raise ConfigError(f"lexicon {str(path)!r} has no header row, so {what}={given!r} cannot be "
                                  "found; its columns are read as word, valence, arousal")
            return position
        if given:
            if given.lower() not in header:
                raise ConfigError(f"lexicon {str(path)!r} has no column {given!r}; columns: {header}")
            return header.index(given.lower())
        for name in names:
            if name in header:
                return header.index(name)
        return position if position < len(header) and what == "word_column" else None

    cols = [pick(word, _WORD_NAMES, 0, "word_column"), pick(valence, _VALENCE_NAMES, 1, "valence_column"),
            pick(arousal, _AROUSAL_NAMES, 2, "arousal_column")]
    if cols[1] is None and cols[2] is None:
        raise ConfigError(f"lexicon {str(path)!r}: no valence or arousal column found in {header}; "
                          "name them with valence_column=... arousal_column=...")
    return cols


def _cell(row: list[str], col: int | None, lo: float, hi: float, line: int, word: str, dim: str,
          bad: list[str]) -> float:
    if col is None or col >= len(row) or not row[col].strip():
        return float("nan")
    text = row[col].strip()
    try:
        value = float(text)
    except ValueError:
        bad.append(f"line {line} {word!r}: {dim} {text!r} is not a number")
        return float("nan")
    if not (lo <= value <= hi):  # also refuses NaN and inf written in the file
        bad.append(f"line {line} {word!r}: {dim} {text}")
    return value


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens and punctuation runs; curly apostrophes become straight ones."""
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


class LexiconScorer(VAScorer):
    """Averages the VA ratings of the lexicon words in a text (text only)."""

    name = "lexicon"
    description = "text: mean lexicon VA over matched words, with negation and intensifiers (default VADER)"
    modality_hint = "text"
    Config = LexiconConfig
    nan_is_unknown = True  # no lexicon word in the text: no evidence, not a failure
    volatile = ("lexicon",)
    uses_torch = False

    def modalities(self) -> tuple[str, ...]:
        return ("text",)

    def _load(self) -> None:
        c = self.config
        self.lexicon = read_lexicon(c.lexicon, scale=c.scale, word_column=c.word_column,
                                    valence_column=c.valence_column, arousal_column=c.arousal_column) \
            if c.lexicon else vader()

    def provides(self) -> tuple[bool, bool]:
        self.load()
        return self.lexicon.provides()

    def spec(self) -> dict:
        self.load()
        return {"lexicon_digest": self.lexicon.digest, "entries": len(self.lexicon.entries),
                "tokenizer": "lower+apostrophe-words+punct-runs, clause breaks .,;:!?",
                "origin": {"lexicon": self.lexicon.origin}}

    def prepare(self, raw: bytes | str, modality: str) -> str:
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadItemError(f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        return raw

    def score(self, batch: Sequence[str], modality: str = "text") -> np.ndarray:
        self.load()
        return np.array([self.score_text(t) for t in batch], dtype=np.float64).reshape(len(batch), 2)

    def score_text(self, text: str) -> tuple[float, float]:
        """(valence, arousal) of one text, NaN where no matched word rates that dimension."""
        self.load()
        sums, counts = np.zeros(2), np.zeros(2)
        for value in self._word_values(tokenize(text)):
            known = np.isfinite(value)
            sums[known] += value[known]
            counts[known] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        return float(np.clip(out[0], -1, 1)), float(np.clip(out[1], -1, 1))

    def _word_values(self, tokens: list[str]):
        c, entries = self.config, self.lexicon.entries
        clause_start = 0
        for i, tok in enumerate(tokens):
            if tok not in entries and _BOUNDARY.search(tok):
                clause_start = i + 1
                continue
            if tok not in entries or _is_negator(tok) or tok in BOOSTERS or tok in DAMPENERS:
                continue
            value = np.array(entries[tok], dtype=np.float64)
            before = tokens[max(clause_start, i - 3):i][::-1]  # nearest first
            for dist, prev in enumerate(before):
                step = c.booster * _DISTANCE[dist]
                if prev in BOOSTERS:
                    value = np.sign(value) * (np.abs(value) + step)
                elif prev in DAMPENERS:
                    value = np.sign(value) * np.maximum(np.abs(value) - step, 0.0)
            window = tokens[max(clause_start, i - c.negation_window):i] if c.negation_window else []
            flips = sum(_is_negator(t) for t in window)
            value = value * np.array([c.negation ** flips, c.negation_arousal ** flips])
            yield np.clip(value, -1.0, 1.0)


def _is_negator(token: str) -> bool:
    return token in NEGATORS or token.endswith("n't")
