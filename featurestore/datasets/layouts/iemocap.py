"""IEMOCAP: Session1-5 EmoEvaluation files, sentence wavs and transcripts; the session is the group.

An EmoEvaluation file (`SessionN/dialog/EmoEvaluation/<dialog>.txt`) holds per turn a line
`[start - end]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[V, A, D]` (V/A/D on 1-5) followed by
each evaluator's categories (`C-E1:<TAB>Neutral;<TAB>()`). Audio is
`SessionN/sentences/wav/<dialog>/<turn>.wav`, the transcript
`SessionN/dialog/transcriptions/<dialog>.txt` (`<turn> [start-end]: words`).
"""
from __future__ import annotations

import re

from .base import Layout

CODES = {"neu": "neutral", "hap": "happiness", "exc": "excitement", "sad": "sadness", "ang": "anger",
         "fru": "frustration", "fea": "fear", "sur": "surprise", "dis": "disgust", "oth": "other"}
FOUR = {"neutral": "neutral", "happiness": "happiness", "excitement": "happiness", "sadness": "sadness",
        "anger": "anger"}
_EVALUATOR_WORDS = {"neutral": "neutral", "neutral state": "neutral", "happiness": "happiness",
                    "excited": "excitement", "excitement": "excitement", "sadness": "sadness", "anger": "anger",
                    "frustration": "frustration", "fear": "fear", "surprise": "surprise", "disgust": "disgust",
                    "other": "other"}
_TURN = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\S+)\s+\[\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*\]")
_EVAL = re.compile(r"^C-[A-Z]\d*:\s*(.*)$")
_TRANSCRIPT = re.compile(r"^(\S+)\s+\[[^\]]*\]:\s*(.*)$")


class Iemocap(Layout):
    name = "iemocap"
    description = ("IEMOCAP: Session1-5/dialog/EmoEvaluation/*.txt, sentences/wav/<dialog>/<turn>.wav, "
                   "transcriptions; session as group, V/A on [-1, 1]")
    modalities = ("text", "audio")
    options = {"classes": ("all", "all (the 10 categories) or 4 (neutral, happiness with excitement merged in, "
                                  "sadness, anger; other items keep no label); the original is always kept "
                                  "in emotion_raw"),
               "test_session": ("5", "session put in the test split (the others are train); --cv group leaves "
                                     "each session out in turn")}

    def rows(self):
        four = self.choice("classes", ("all", "4")) == "4"
        test_session = self.choice("test_session", ("1", "2", "3", "4", "5"))
        sessions = sorted(p for p in self.root.iterdir() if p.is_dir() and re.fullmatch(r"Session[1-5]", p.name))
        if not sessions:
            self.need("Session1", what="session folder")
        for session in sessions:
            evals = session / "dialog" / "EmoEvaluation"
            if not evals.is_dir():
                self.problem(session.name, "no dialog/EmoEvaluation folder: session skipped")
                continue
            for file in sorted(evals.glob("*.txt")):
                dialog = file.stem
                words = self._transcripts(session / "dialog" / "transcriptions" / f"{dialog}.txt")
                yield from self._turns(session.name, dialog, file, words, four, test_session)

    def _transcripts(self, path):
        out = {}
        if not path.is_file():
            return out
        for line in self.read_text(path).splitlines():
            m = _TRANSCRIPT.match(line.strip())
            if m:
                out[m.group(1)] = m.group(2).strip()
        return out

    def _turns(self, session, dialog, file, words, four, test_session):
        turn = None
        for lineno, line in enumerate(self.read_text(file).splitlines(), 1):
            text = line.strip()
            if text.startswith("["):
                if turn is not None:
                    yield self._finish(turn)
                m = _TURN.match(text)
                if not m:
                    self.problem(f"{file.name}:{lineno}", f"turn line is not '[start - end] TURN code [V, A, D]': "
                                                          f"{text[:80]!r}")
                    turn = None
                    continue
                start, end, name, code, v, a, d = m.groups()
                raw = CODES.get(code)
                if raw is None and code != "xxx":
                    self.problem(name, f"unknown category code {code!r}; kept in emotion_raw with no label")
                label = raw if not four else FOUR.get(raw or "")
                speaker = name.rsplit("_", 1)[-1][:1]
                turn = {"item_id": name, "split": "test" if session == f"Session{test_session}" else "train",
                        "label": label, "emotion_raw": code, "labels": set(),
                        "valence": _unit(float(v)), "arousal": _unit(float(a)), "dominance": _unit(float(d)),
                        "group": session, "speaker": f"{session}{speaker}", "dialog": dialog,
                        "start": float(start), "end": float(end),
                        "audio": f"{session}/sentences/wav/{dialog}/{name}.wav", "text": words.get(name)}
                if name not in words:
                    self.problem(name, "no transcript line: text left empty")
            elif turn is not None:
                m = _EVAL.match(text)
                if m:
                    for word in filter(None, (w.strip().lower() for w in m.group(1).split("(")[0].split(";"))):
                        cat = _EVALUATOR_WORDS.get(word, "other")
                        turn["labels"].add(FOUR.get(cat) if four else cat)
        if turn is not None:
            yield self._finish(turn)

    @staticmethod
    def _finish(turn):
        turn["labels"] = sorted(x for x in turn["labels"] if x) or None
        return turn


def _unit(x: float) -> float | None:
    """1-5 ratings to [-1, 1]; out of range -> unknown."""
    return (x - 3.0) / 2.0 if 1.0 <= x <= 5.0 else None
