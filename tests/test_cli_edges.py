"""Issue 11 (items 3 and 4): no tracebacks, messages that name the real problem, progress only on a terminal.

The messages are checked as a user sees them: through `fs` in a subprocess where the exit code and the
absence of a traceback matter, through click's runner (the same command object) elsewhere.
"""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from featurestore.cli import cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "FS_DEBUG": ""}


def fs_proc(store, *args, code=None, **kw):
    res = subprocess.run([sys.executable, "-m", "featurestore.cli", "--store", str(store), *args],
                         capture_output=True, text=True, env=ENV, timeout=120, **kw)
    if code is not None:
        assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    return res


def invoke(store, *args, code=0):
    res = CliRunner().invoke(cli, ["--store", str(store), *args], catch_exceptions=False)
    assert res.exit_code == code, (res.exit_code, res.output)
    return res


def one_clear_line(res) -> str:
    err = res.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in res.stdout, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A store with the demo (80 rows extracted), a second dataset with other labels, and a linear run."""
    root = tmp_path_factory.mktemp("edges") / "store"
    invoke(root, "init")
    invoke(root, "datasets", "add", "demo", "--builtin", "demo")
    invoke(root, "extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "--limit", "80")
    other = root.parent / "other.csv"
    other.write_text("item_id,text,label,split\na,hello there,happy,test\nb,so sad today,sad,test\n"
                     "c,what a day,angry,test\n")
    invoke(root, "datasets", "add", "other", "--manifest", str(other))
    invoke(root, "extract", "--dataset", "other", "--modality", "text", "--backbone", "minilm")
    invoke(root, "train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
           "--target", "label", "-p", "epochs=2", "--run-id", "lin")
    return root


# ---- the guard at the CLI's edge -------------------------------------------------------------
BOOM = textwrap.dedent("""
    import sys
    import click
    from featurestore.cli import cli

    @cli.command("boom")
    def boom():
        "Fails the way a bug would."
        raise ZeroDivisionError("the numbers ran out")

    cli(sys.argv[1:], prog_name="fs")
""")


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-c", BOOM, "boom"], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 1
    line = one_clear_line(res)
    assert "fs boom failed: ZeroDivisionError: the numbers ran out" in line and "--debug" in line
    res = subprocess.run([sys.executable, "-c", BOOM, "--debug", "boom"], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert res.returncode == 1 and "Traceback" in res.stderr and "ZeroDivisionError" in res.stderr
    res = subprocess.run([sys.executable, "-c", BOOM, "boom"], capture_output=True, text=True,
                         env={**ENV, "FS_DEBUG": "1"}, timeout=120)
    assert "Traceback" in res.stderr


def test_a_bad_optuna_storage_is_one_line(tmp_path):
    invoke(tmp_path / "store", "init")
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    res = fs_proc(tmp_path / "store", "sweep", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
                  "--optuna", "2", "--space", str(space), "--storage", "bogus://x", code=2)
    line = one_clear_line(res)
    assert "--storage 'bogus://x' cannot be opened" in line and "sqlite:///" in line


# ---- devices ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "--device", "gpu"],
    ["extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "--device", "tpu"],
    ["train-head", "--method", "mlp", "--dataset", "demo", "--features", "text=minilm", "-p", "device=gpu"],
    ["train-head", "--method", "xgboost", "--dataset", "demo", "--features", "text=minilm", "-p", "device=tpu"],
    ["query", "--text", "what a day", "--memory", "none", "--device", "tpu"],
    ["va", "score", "--dataset", "demo", "--modality", "text", "--scorer", "vader", "--device", "gpu"],
])
def test_an_unknown_device_lists_the_valid_ones(tmp_path, args):
    invoke(tmp_path / "store", "init")
    res = invoke(tmp_path / "store", *args, code=2)
    assert "is not a device this tool runs on" in res.output
    assert "valid devices: auto, cpu, cuda or cuda:N" in res.output
    assert ("did you mean cuda?" in res.output) == ("gpu" in args[-1])


def test_the_device_message_in_a_subprocess(tmp_path):
    invoke(tmp_path / "store", "init")
    invoke(tmp_path / "store", "datasets", "add", "demo", "--builtin", "demo")
    res = fs_proc(tmp_path / "store", "extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm",
                  "--limit", "5", "--device", "gpu", code=2)
    assert "'gpu' is not a device" in one_clear_line(res)


# ---- parameters and options named as the user types them ------------------------------------
def test_a_bad_dropout_blames_only_dropout(tmp_path):
    invoke(tmp_path / "store", "init")
    res = invoke(tmp_path / "store", "train-head", "--method", "mlp", "--dataset", "demo", "--features",
                 "text=minilm", "-p", "dropout=1.5", code=2)
    assert "dropout=1.5 must be in [0, 1)" in res.output
    assert "hidden" not in res.output and "layers" not in res.output
    res = invoke(tmp_path / "store", "train-head", "--method", "mlp", "--dataset", "demo", "--features",
                 "text=minilm", "-p", "layers=0", code=2)
    assert "layers=0 must be at least 1" in res.output and "dropout" not in res.output


def test_concept_without_a_memory_names_the_option(tmp_path):
    invoke(tmp_path / "store", "init")
    res = invoke(tmp_path / "store", "train-head", "--method", "concept", "--dataset", "demo", "--features",
                 "text=minilm", code=2)
    assert "--memory NAME" in res.output and "memory=FOLDER" not in res.output
    shown = invoke(tmp_path / "store", "heads", "list").output
    assert "memory=FOLDER" not in shown


def test_eval_on_another_label_set_blames_the_run_not_the_dataset(trained):
    res = invoke(trained, "eval", "lin", "--dataset", "other", code=2)
    out = " ".join(res.output.split())
    assert "run 'lin' was trained on dataset 'demo' with classes negative, neutral, positive" in out
    assert "labels it cannot predict: angry, happy, sad" in out
    assert "re-register" not in out and "--replace" not in out
    ok = json.loads(invoke(trained, "eval", "lin", "--dataset", "demo", "--json").output)
    assert ok["n"] > 0


def test_a_non_utf8_csv_names_its_line(tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("item_id,text,label\na,hello,joy\nb,caf\u00e9 ok,sad\n".encode("latin-1"))
    invoke(tmp_path / "store", "init")
    res = fs_proc(tmp_path / "store", "datasets", "add", "x", "--manifest", str(bad), code=5)
    line = one_clear_line(res)
    assert "line 3" in line and "not valid UTF-8" in line and "byte 0xe9" in line


def test_a_bad_cell_is_named_without_polars_advice(tmp_path):
    rows = ["item_id,text,label,valence"] + [f"i{i},t{i},joy,0.{i % 9}" for i in range(12000)] + ["x,y,joy,high"]
    path = tmp_path / "mixed.csv"
    path.write_text("\n".join(rows) + "\n")
    invoke(tmp_path / "store", "init")
    res = invoke(tmp_path / "store", "datasets", "add", "x", "--manifest", str(path), code=5)
    out = " ".join(res.output.split())
    assert "column 'valence' must hold a number" in out and "(item 'x') has 'high'" in out
    for advice in ("infer_schema_length", "schema_overrides", "ignore_errors", "null_values", "strict_cast"):
        assert advice not in out


def test_normal_output_has_no_python_reprs():
    from featurestore.cli.memory_cmd import _accuracy_lines, _describe_input

    assert _describe_input({"text": "what a day"}) == "text: what a day"
    lines = _accuracy_lines({"train": {"demo": {"text": 0.8125}}, "val": {}})
    assert lines == ["  accuracy on train demo: text 0.812"]
    assert not any("{" in ln for ln in lines)


def test_info_prints_lists_not_reprs(trained):
    out = invoke(trained, "info", "demo").output
    assert "label_set: negative, neutral, positive" in out and "['" not in out


# ---- progress ----------------------------------------------------------------------------------
def test_train_head_reports_each_epoch_to_a_progress_bar(trained):
    import io

    from tqdm import tqdm

    from featurestore.jobs.train_head import TrainHeadConfig, run
    from featurestore.store import open_store

    buf = io.StringIO()
    made = []

    def progress(**kw):
        made.append(kw)
        return tqdm(file=buf, mininterval=0, **kw)

    run(TrainHeadConfig(method="mlp", dataset="demo", features={"text": "minilm"}, target="label",
                        params={"epochs": 3}),
        open_store(trained), progress=progress)
    text = buf.getvalue()
    assert made and made[0]["total"] == 3 and made[0]["unit"] == "epoch"
    assert "3/3" in text and "loss=" in text and "val=" in text


def test_cv_and_seeds_show_one_bar_per_fold_and_per_seed(trained):
    import io

    from tqdm import tqdm

    from featurestore.jobs.train_head import TrainHeadConfig, run
    from featurestore.store import open_store

    buf, made = io.StringIO(), []

    def progress(**kw):
        made.append(kw)
        return tqdm(file=buf, mininterval=0, **kw)

    run(TrainHeadConfig(method="mlp", dataset="demo", features={"text": "minilm"}, target="label",
                        params={"epochs": 2, "patience": 0}, cv="3", seeds=2, seed=4), open_store(trained), progress=progress)
    labels = [kw["desc"].strip() for kw in made]
    assert labels == [f"mlp seed {s} ({i + 1}/2) fold {k}/3" for i, s in enumerate((4, 5)) for k in (1, 2, 3)]
    assert all(kw["total"] == 2 and kw["unit"] == "epoch" for kw in made)
    assert buf.getvalue().count("2/2") >= 6


def test_sweep_counts_configurations_and_prints_no_tuple(trained):
    import io

    from tqdm import tqdm

    from featurestore.jobs import sweep
    from featurestore.store import open_store

    buf, said = io.StringIO(), []
    result = sweep.run(sweep.SweepConfig(method="mlp", dataset="demo", features={"text": "minilm"}, target="label",
                                         grid={"lr": ["1e-3", "1e-2"], "dropout": ["0.1", "0.3"]},
                                         params={"epochs": "2"}),
                       open_store(trained), log=said.append,
                       progress=lambda **kw: tqdm(file=buf, mininterval=0, **kw))
    assert result.trained_now == 4
    text = buf.getvalue()
    assert "configurations" in text and "4/4" in text and "best val uar=" in text
    assert not any("(" in s and "," in s and ")" in s for s in said if "training" in s), said


def test_no_progress_without_a_terminal_or_under_json(trained):
    res = CliRunner().invoke(cli, ["--store", str(trained), "train-head", "--method", "mlp", "--dataset", "demo",
                                   "--features", "text=minilm", "--target", "label", "-p", "epochs=2", "--json"], catch_exceptions=False)
    assert res.exit_code == 0
    json.loads(res.stdout)
    assert "epoch" not in res.stderr and "%|" not in res.stderr and res.stderr == ""
    res = fs_proc(trained, "sweep", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
                  "--target", "label", "--grid", "lr=1e-3,1e-2", "-p", "epochs=2", code=0)
    assert "%|" not in res.stderr and "config/s" not in res.stderr


def test_progress_shows_on_a_terminal(trained):
    """stderr on a real pseudo-terminal: the sweep's bars appear there (and only there)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "featurestore.cli", "--store", str(trained), "sweep", "--method",
                             "mlp", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
                             "--grid", "lr=3e-3,3e-2",
                             "-p", "epochs=3"], stdout=subprocess.PIPE, stderr=slave, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    tty = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0
    assert "configurations" in tty and "2/2" in tty and "epoch" in tty
    assert "%|" not in out.decode()


def test_heads_report_epochs_through_the_engine_not_by_printing(capsys):
    """SCL's two stages and a stacked mlp report each epoch to an `on_epoch` listener; nothing is printed."""
    import numpy as np

    from featurestore.heads import create
    from featurestore.heads._engine import on_epoch
    from featurestore.heads.base import Features, Targets

    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = (rng.normal(size=(3, 8))[y] + 0.3 * rng.normal(size=(90, 8))).astype(np.float32)
    X, Y = Features({"text": x}, {"text": np.ones(90, bool)}), Targets("single", y, ["happy", "neutral", "sad"])
    seen = []
    with on_epoch(seen.append):
        create("scl", joint_epochs=2, seq_epochs=3, width=8, proj_width=8, batch_size=32, device="cpu"
               ).fit(X, Y, eval_set=(X, Y))
    stages = [e.stage for e in seen]
    assert stages[:2] == ["joint", "joint"] and all(s.startswith("sequential") for s in stages[2:])
    assert [e.epoch for e in seen[:2]] == [1, 2] and seen[-1].val is not None
    seen.clear()
    with on_epoch(seen.append):
        create("mlp", epochs=4, patience=0, device="cpu").fit(X, Y, eval_set=(X, Y))
    assert [e.epoch for e in seen] == [1, 2, 3, 4] and all(e.epochs == 4 and e.val is not None for e in seen)
    create("mlp", epochs=2, device="cpu").fit(X, Y)  # no listener: nothing reported, nothing printed
    assert capsys.readouterr().out == "" and len(seen) == 4


def test_a_reader_that_goes_away_is_not_an_error(tmp_path):
    """`fs ... | head`: the writes after the reader closed the pipe end quietly with 141, as a shell's
    tools do, not with 'error: ... BrokenPipeError'."""
    import subprocess
    import sys

    code = ("import sys\nfrom featurestore.cli import cli\n"
            "sys.stdout.write('x' * 200000)\n"  # more than a pipe holds: the CLI's first write meets the closed pipe
            "cli(['--store', sys.argv[1], 'heads', 'list'], prog_name='fs')\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "error" not in err and "Traceback" not in err, err


def test_threads_sets_torchs_cpu_threads(tmp_path, monkeypatch):
    import torch

    from _cli import fs

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fs(tmp_path / "store", "train-head", "--threads", "1", "--method", "mlp", "--dataset", "nope",
           "--features", "minilm", code=4)  # set before the command runs, whatever it then does
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("FS_THREADS", "1")
        fs(tmp_path / "store", "sweep", "--method", "mlp", "--dataset", "nope", "--features", "minilm",
           "--grid", "lr=1e-3", code=4)
        assert torch.get_num_threads() == 1
        assert "--threads" in fs(tmp_path / "store", "train-head", "--threads", "-1", "--method", "mlp",
                                 "--dataset", "d", "--features", "minilm", code=2).output
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is there: device=cuda is valid")
def test_a_head_asked_to_train_on_a_missing_gpu_is_refused_before_any_work(trained):
    res = invoke(trained, "train-head", "--method", "mlp", "--dataset", "demo", "--features", "text=minilm",
                 "--target", "label", "-p", "device=cuda", code=2)
    assert "sees no GPU" in res.output and "training" not in res.output


def test_an_epoch_bar_counts_the_first_epochs_time():
    """The bar is made when the first epoch ends (only then is the epoch count known); its clock
    must still start when that epoch began, or the first rate shown is absurd (10,000 epoch/s)."""
    import io
    import time

    from tqdm import tqdm

    from featurestore.heads._engine import notify_epoch
    from featurestore.jobs._progress import epoch_progress

    bars = []

    def factory(**kw):
        bars.append(tqdm(file=io.StringIO(), mininterval=0, **kw))
        return bars[-1]

    with epoch_progress(factory, "mlp"):
        time.sleep(0.3)  # the first epoch
        notify_epoch(1, 4, 1, 1.0, 0.5)
        assert bars[0].format_dict["elapsed"] >= 0.3
        time.sleep(0.2)
        notify_epoch(1, 2, 1, 1.0, 0.5, stage="stage 2")  # a second training: a new bar, its own first epoch
        assert 0.2 <= bars[1].format_dict["elapsed"] < 0.5


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is there: --device cuda is valid")
def test_extract_asked_for_a_missing_gpu_is_refused_even_on_a_cache_hit(trained):
    assert "cache hit" in invoke(trained, "extract", "--dataset", "other", "--modality", "text", "--backbone",
                                 "minilm").output
    res = invoke(trained, "extract", "--dataset", "other", "--modality", "text", "--backbone", "minilm",
                 "--device", "cuda", code=2)
    assert "no CUDA device" in res.output and "cache hit" not in res.output


def test_scl_train_refuses_an_existing_run_name_before_training(trained, monkeypatch):
    from featurestore.heads import scl

    def no_training(*a, **k):
        raise AssertionError("trained before checking the run name")
    monkeypatch.setattr(scl.SCL, "fit", no_training)
    res = invoke(trained, "scl", "train", "--data", "demo:text=minilm", "--run", "lin", code=2)
    assert "run 'lin' already exists" in res.output and "--replace" in res.output


def test_fs_errors_takes_modality_equals_name_as_features_does(trained):
    plain = invoke(trained, "errors", "minilm", "--dataset", "other").output
    assert invoke(trained, "errors", "text=minilm", "--dataset", "other").output == plain
    res = invoke(trained, "errors", "image=minilm", code=2)
    assert "has only text features" in res.output


def test_a_full_disk_wrapped_by_a_library_is_exit_11_not_an_unexpected_error(trained, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError (not an OSError): still exit 11, one line."""
    from safetensors import SafetensorError

    from featurestore.jobs import train_head

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")
    monkeypatch.setattr(train_head, "_publish_run", full)
    res = invoke(trained, "train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
                 "--target", "label", "-p", "epochs=1", code=11)
    assert "disk full writing" in res.output and "Traceback" not in res.output


# ---- hostile input, CLI-wide (a pass over every command) ----------------------------------------
INTERRUPT = BOOM.replace('raise ZeroDivisionError("the numbers ran out")', "raise KeyboardInterrupt")


def test_ctrl_c_is_one_line_and_exit_130_not_aborted_exit_1(tmp_path):
    res = subprocess.run([sys.executable, "-c", INTERRUPT, "boom"], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert res.returncode == 130, (res.returncode, res.stderr)
    assert "Aborted" not in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("interrupted: fs boom stopped") and "fs verify" in res.stderr


def test_sigint_in_the_middle_of_training_exits_130_and_leaves_the_store_verifiable(trained):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "featurestore.cli", "--store", str(trained), "train-head",
                             "--method", "mlp", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
                             "-p", "epochs=100000", "-p", "patience=0", "--run-id", "interrupted"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    while not (seen and seen[-1].startswith("training")) and len(seen) < 10:  # coverage warnings, then the loop
        seen.append(proc.stderr.readline())
    assert seen[-1].startswith("training"), seen
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and "Aborted" not in err and "interrupted: fs train-head stopped" in err
    assert not (trained / "heads" / "interrupted").exists()
    assert not [p for p in (trained / "heads").iterdir() if p.name.startswith(".")]
    assert "ok:" in fs_proc(trained, "verify", code=0).stdout


def test_a_store_root_that_cannot_be_a_store_is_one_clear_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = invoke(tmp_path / "afile" / "sub", "init", code=2)
    assert "store root" in res.output and "afile" in res.output and "is a file" in res.output
    (tmp_path / "s1" / "store.json").mkdir(parents=True)  # a folder where store.json belongs
    res = invoke(tmp_path / "s1", "init", code=8)
    assert "store.json is not a file" in res.output
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "store.json").write_text("[1, 2]\n")  # JSON, but not an object
    for args in (["ls"], ["init"], ["verify"]):
        res = invoke(tmp_path / "s2", *args, code=8)
        assert "store.json is damaged (a JSON list, not an object)" in res.output


@pytest.mark.parametrize("name, text", [
    ("blank.csv", "item_id,text,label,split\na,hi,joy,\nb,yo,sad,train\n"),
    ("blank.jsonl", '{"item_id": "a", "text": "hi", "label": "joy", "split": " "}\n'
                    '{"item_id": "b", "text": "yo", "label": "sad", "split": "train"}\n'),
])
def test_a_row_without_a_split_is_named_and_leaves_nothing(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    root = tmp_path / "store"
    invoke(root, "init")
    res = fs_proc(root, "datasets", "add", "x", "--manifest", str(path), code=5)
    line = one_clear_line(res)
    assert "1 row(s) have an empty split, e.g. item 'a'" in line and "train, val, test" in line
    assert not (root / "datasets" / "x").exists()
    assert "ok:" in invoke(root, "verify").output


def test_a_failed_add_leaves_no_half_registered_dataset(tmp_path, monkeypatch):
    """Whatever fails while the manifest's facts are worked out, nothing is written: no folder with an
    unnamed manifest and no dataset.json, which `fs verify` would report."""
    import featurestore.datasets as datasets
    from featurestore.errors import DatasetError

    def broken(df):
        raise DatasetError("the facts could not be worked out")
    monkeypatch.setattr(datasets, "manifest_warnings", broken)
    path = tmp_path / "m.csv"
    path.write_text("item_id,text,label\na,hi,joy\nb,yo,sad\n")
    root = tmp_path / "store"
    assert "could not be worked out" in invoke(root, "datasets", "add", "x", "--manifest", str(path), code=5).output
    assert not (root / "datasets" / "x").exists()
    monkeypatch.undo()
    assert "ok:" in invoke(root, "verify").output


def test_datasets_show_head_takes_any_size_and_refuses_a_negative_one(trained):
    out = invoke(trained, "datasets", "show", "other", "--head", "99999999999999999999").output
    assert "first 3 items:" in out
    assert len(json.loads(invoke(trained, "datasets", "show", "other", "--head", "99999999999999999999",
                                 "--json").output)["rows"]) == 3
    assert "--head" in invoke(trained, "datasets", "show", "other", "--head", "-1", code=2).output


@pytest.mark.parametrize("args", [
    ["extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "--split", "nope"],
    ["va", "score", "--dataset", "demo", "--modality", "text", "--scorer", "lexicon", "--split", "train",
     "--split", "nope"],
    ["train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
     "--eval-split", "nope"],
])
def test_an_unknown_split_is_named_with_the_splits_there_are(trained, args):
    out = " ".join(invoke(trained, *args, code=5).output.split())
    assert "dataset 'demo' has no items in split 'nope'; splits: test (" in out and "train (" in out
    assert "has no text inputs" not in out and "{" not in out


@pytest.mark.parametrize("args, message", [
    (["--seed", "99999999999999999999999"], "'--seed': 99999999999999999999999 is not in the range 0<=x<=4294967295"),
    (["--seed", "-1", "--cv", "3"], "'--seed': -1 is not in the range"),  # numpy refused it mid-run (exit 1)
    (["-p", "seed=99999999999999999999999"], "seed='99999999999999999999999' must be a whole number from 0 to "
                                             "4294967295"),
    (["-p", "seed=-5"], "seed='-5' must be a whole number from 0 to 4294967295"),
    (["-p", "epochs=99999999999999999999999"], "epochs='99999999999999999999999' is too large"),
    (["-p", "lr=1e400"], "lr='1e400' must be a finite number"),
])
def test_out_of_range_seeds_and_numbers_are_refused_before_training(trained, args, message):
    res = invoke(trained, "train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
                 "--target", "label", *args, code=2)
    assert message in " ".join(res.output.split()) and "training" not in res.output


@pytest.mark.parametrize("args, message", [
    (["sweep", "--method", "linear", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
      "--grid", "lr=nan,1e-3"], "lr='nan' must be a finite number"),
    (["sweep", "--method", "linear", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
      "--grid", "lr=1e-3", "--seed", "4294967296"], "'--seed': 4294967296 is not in the range"),
    # a NaN learning rate was accepted: LoRA then trained on NaN for every epoch
    (["lora", "train", "--backbone", "minilm", "--dataset", "demo", "--out", "a1", "-p", "lr=nan"],
     "lr='nan' must be a finite number"),
    (["lora", "train", "--backbone", "minilm", "--dataset", "demo", "--out", "a1", "-p", "alpha=inf"],
     "alpha='inf' must be a finite number"),
    # a NaN ridge alpha was accepted and saved a model that predicts NaN
    (["va", "fit", "--dataset", "demo", "--features", "text=minilm", "--out", "v", "-p", "alpha=nan"],
     "alpha='nan' must be a finite number"),
    (["scl", "train", "--data", "demo:text=minilm", "-p", "lr=inf"], "lr='inf' must be a finite number"),
    (["train-head", "--method", "xgboost", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
      "-p", "learning_rate=nan"], "learning_rate='nan' must be a finite number"),
    (["extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "-p",
      "max_length=99999999999999999999999"], "max_length='99999999999999999999999' is too large"),
])
def test_nan_inf_and_huge_parameters_are_refused_everywhere(trained, args, message):
    res = invoke(trained, *args, code=2)
    assert message in " ".join(res.output.split())
    assert "training" not in res.output and "to compute" not in res.output
    assert not (trained / "va" / "models" / "v").exists() and not (trained / "adapters" / "a1").exists()


@pytest.mark.parametrize("run_id, message", [("lin", "run 'lin' already exists"), ("a b", "run name 'a b' is not valid"),
                                             ("../x", "run name '../x' is not valid")])
def test_train_head_refuses_a_bad_or_taken_run_id_before_training(trained, monkeypatch, run_id, message):
    import featurestore.heads as heads

    def no_training(*a, **k):
        raise AssertionError("trained before checking the run id")
    monkeypatch.setattr(heads.get("linear"), "fit", no_training)
    res = invoke(trained, "train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
                 "--target", "label", "--run-id", run_id, code=2)
    assert message in res.output and "training" not in res.output


def test_an_scl_run_evaluates_and_predicts_naming_its_datasets(trained, tmp_path):
    """`fs eval` of an `fs scl train` run was an unexpected KeyError 'target'; its accuracy here is checked
    against `fs predict` on the same test texts, scored by hand; predict said 'scl on None'."""
    import polars as pl

    invoke(trained, "scl", "train", "--data", "demo:text=minilm", "--run", "scl-edge", "-p", "joint_epochs=2",
           "-p", "seq_epochs=2", "-p", "width=32", "-p", "proj_width=16")
    ev = json.loads(invoke(trained, "eval", "scl-edge", "--dataset", "demo", "--json").output)
    manifest = next((trained / "datasets" / "demo").glob("manifest.*.parquet"))
    rows = pl.read_parquet(manifest).head(80).filter(pl.col("split") == "test")  # the extracted test items
    assert ev["n"] == len(rows) > 0
    batch = tmp_path / "test.jsonl"
    batch.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows["text"]))
    pred = json.loads(invoke(trained, "predict", "scl-edge", "--batch", str(batch), "--json").output)
    assert pred["dataset"] == "demo"
    hits = sum(r["prediction"] == label for r, label in zip(pred["results"], rows["label"]))
    assert ev["metrics"]["accuracy"] == pytest.approx(hits / len(rows))
    assert "(scl on demo, single-label)" in invoke(trained, "predict", "scl-edge", "--text", "what a day").output
    out = " ".join(invoke(trained, "eval", "scl-edge", "--dataset", "other", code=2).output.split())
    assert "run 'scl-edge' was trained on dataset 'demo' with classes negative, neutral, positive" in out


def test_query_takes_any_k_and_refuses_a_batch_that_is_not_utf8(trained, tmp_path):
    """`--k 99999999999999` was an unexpected MemoryError; a Latin-1 batch an unexpected UnicodeDecodeError
    (fs predict already said 'not UTF-8')."""
    invoke(trained, "scl", "train", "--data", "demo:text=minilm", "--run", "scl-q", "-p", "joint_epochs=1",
           "-p", "seq_epochs=1", "-p", "width=16", "-p", "proj_width=8")
    n = json.loads(invoke(trained, "memory", "build", "mq", "--from", "scl-q", "--json").output)["n"]
    out = json.loads(invoke(trained, "query", "--memory", "mq", "--text", "what a day", "--k", "99999999999999",
                            "--json").output)
    assert len(out["results"][0]["neighbours"]) == n > 0
    bad = tmp_path / "q.jsonl"
    bad.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    res = invoke(trained, "query", "--memory", "mq", "--batch", str(bad), code=2)
    assert f"batch file '{bad}' is not UTF-8 (byte 13); save it as UTF-8" in " ".join(res.output.split())


@pytest.mark.parametrize("space, message", [
    ("[1, 2]", "holds a JSON array; give one JSON object"),  # an unexpected TypeError
    ("{}", "holds no parameter; give one JSON object"),  # said "--random and --optuna need --space FILE"
    ('"lr"', "holds a JSON string; give one JSON object"),
])
def test_a_space_file_that_is_not_an_object_of_parameters_is_named(trained, tmp_path, space, message):
    path = tmp_path / "space.json"
    path.write_text(space)
    res = invoke(trained, "sweep", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
                 "--target", "label", "--random", "3", "--space", str(path), code=2)
    assert f"space file {path} {message}" in " ".join(res.output.split())


@pytest.mark.parametrize("args, message", [
    (["--grid", "lr=1e-3", "--storage", "sqlite:///x.db"], "--storage 'sqlite:///x.db' is the Optuna study's "
                                                           "database: it goes with --optuna N only"),
    (["--grid", "lr=1e-3", "--top", "-1"], "'--top': -1 is not in the range x>=0"),
])
def test_sweep_options_that_would_be_ignored_are_refused(trained, args, message):
    res = invoke(trained, "sweep", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
                 "--target", "label", *args, code=2)
    assert message in " ".join(res.output.split())
    assert not list((trained / "sweeps").glob("*")) or "trained now" not in res.output


GOOD_RECIPE = {"backbone": "minilm", "finetune": {"dataset": "demo"}, "heads": ["lin"]}


@pytest.mark.parametrize("recipe, message", [
    ([GOOD_RECIPE], "holds a list, not one table (JSON object) of settings"),  # an unexpected AttributeError
    ({**GOOD_RECIPE, "trigger": {"min_new_labelled": "abc"}},
     "trigger.min_new_labelled must be a whole number, got 'abc'"),  # an unexpected ValueError
    ({**GOOD_RECIPE, "trigger": "weekly"}, "[trigger] must be a table (JSON object) of settings, got 'weekly'"),
    # a string where a list belongs was read letter by letter: "dataset 'd' is not in the store"
    ({**GOOD_RECIPE, "extract": "demo"}, "extract must be a list of names, e.g. extract = [\"a\", \"b\"], got 'demo'"),
    ({**GOOD_RECIPE, "heads": "lin"}, "heads must be a list of names"),
    ({**GOOD_RECIPE, "heads": [5]}, "heads must be a list of names"),
    ({**GOOD_RECIPE, "backbone": ["minilm"]}, "backbone must be text, got ['minilm']"),
    ({**GOOD_RECIPE, "promote": {"min_delta": "nan"}}, "promote.min_delta must be a finite number, got 'nan'"),
])
def test_a_recipe_of_the_wrong_shape_is_named_key_by_key(tmp_path, recipe, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    invoke(tmp_path / "store", "init")
    for command in ("status", "run"):
        res = invoke(tmp_path / "store", "refresh", command, str(path), code=2)
        assert f"recipe {path}" in res.output and message in " ".join(res.output.split())


def test_va_param_without_va_is_refused_not_ignored(trained):
    res = invoke(trained, "extract", "--dataset", "other", "--modality", "text", "--backbone", "minilm",
                 "--va-param", "negation=0.5", code=2)
    assert "--va-param negation=0.5 is a parameter of the --va scorer; add --va NAME" in res.output
    assert "cache hit" not in res.output


@pytest.mark.parametrize("param, message", [
    ("n_estimators=0", "n_estimators=0 must be at least 1"),  # said "n_estimators and max_depth must be >= 1 ..."
    ("learning_rate=-1", "learning_rate=-1.0 must be a finite number > 0"),
    ("subsample=2", "subsample=2.0 must be in (0, 1]"),
    ("min_child_weight=-1", "min_child_weight=-1.0 must be a finite number >= 0"),  # an XGBoostError mid-run
    ("reg_lambda=-1", "reg_lambda=-1.0 must be a finite number >= 0"),  # an XGBoostError mid-run
    ("early_stopping_rounds=-1", "early_stopping_rounds=-1 must be 0 (never) or more"),
])
def test_xgboost_parameters_are_refused_one_by_one_before_training(trained, param, message):
    res = invoke(trained, "train-head", "--method", "xgboost", "--dataset", "demo", "--features", "text=minilm",
                 "--target", "label", "-p", param, code=2)
    assert f"error: {message}\n" in res.output and "training" not in res.output


@pytest.mark.parametrize("args", [
    ["train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
     "-p", "epochs=1", "-p", "epochs=2"],
    ["extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "-p", "epochs=1", "-p", "epochs=2"],
])
def test_a_parameter_given_twice_is_refused_not_overridden(trained, args):
    res = invoke(trained, *args, code=2)
    assert "parameter 'epochs' is given twice ('1' and '2'); give it once" in res.output
    assert "training" not in res.output and "saved run" not in res.output


def test_a_lexicon_that_is_a_folder_or_has_no_ratings_is_named(trained, tmp_path):
    score = ["va", "score", "--dataset", "other", "--modality", "text", "--scorer", "lexicon", "-p", "scale=0..1"]
    res = invoke(trained, *score, "-p", f"lexicon={tmp_path}", code=2)
    assert f"lexicon file '{tmp_path}' is a folder" in res.output  # said "does not exist"
    words = tmp_path / "words.csv"
    words.write_text("word,valence\nhappy,\nsad,\n")  # was taken: every item scored NaN, exit 0
    res = invoke(trained, *score, "-p", f"lexicon={words}", code=2)
    assert "holds 2 word(s) but no valence or arousal rating" in " ".join(res.output.split())
    assert "scored" not in res.output


def test_scl_train_refuses_a_dataset_given_twice_and_logs_no_list_repr(trained):
    res = invoke(trained, "scl", "train", "--data", "demo:text=minilm", "--data", "demo:text=minilm", "--run", "s2",
                 code=2)  # trained on every row twice
    assert "--data names dataset 'demo' twice; give each dataset once" in res.output and "rows" not in res.output
    res = CliRunner().invoke(cli, ["--store", str(trained), "scl", "train", "--data", "demo:text=minilm", "--run",
                                   "s3", "-p", "joint_epochs=1", "-p", "seq_epochs=1", "-p", "width=16",
                                   "-p", "proj_width=8"], catch_exceptions=False)
    assert res.exit_code == 0 and "rows, modalities text, 3 labels" in res.stderr and "['" not in res.stderr


def test_memory_for_a_head_that_reads_none_names_the_option(trained):
    res = invoke(trained, "train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
                 "--target", "label", "--memory", "m", code=2)
    assert "--memory is for heads that read a replay memory (concept); head 'linear' reads none" in res.output
    assert "unknown parameter 'memory'" not in res.output


@pytest.mark.parametrize("name, text, line", [
    ("ragged.csv", 'item_id,text,label\na,"hi, there",joy\nb,hello, world,sad\n', 3),
    ("quoted.csv", 'item_id,text,label\na,"two\nlines",joy\nb,x,sad,extra\n', 4),  # a quoted newline counts
    ("ragged.tsv", "item_id\ttext\tlabel\na\tx\ty\tz\n", 2),
])
def test_a_row_with_too_many_fields_names_its_line_without_polars_advice(tmp_path, name, text, line):
    path = tmp_path / name
    path.write_text(text)
    res = invoke(tmp_path / "store", "datasets", "add", "x", "--manifest", str(path), code=5)
    out = " ".join(res.output.split())
    assert f"line {line} has 4 fields, the header 3; quote cells that hold a" in out
    assert "truncate_ragged_lines" not in out and "Consider setting" not in out


def test_nested_info_shows_none_in_a_list_as_a_dash_not_a_repr(capsys):
    """`fs va info MODEL` printed 'alpha: 316.2277660168379, None' for a model fitted on valence only."""
    from featurestore.cli.store_cmd import _print_nested

    _print_nested({"metrics": {"fit": {"alpha": [316.2277660168379, None]}}, "splits": ["train", "test"]})
    out = capsys.readouterr().out
    assert "    alpha: 316.2, -\n" in out and "splits: train, test\n" in out and "None" not in out


def test_a_file_where_a_store_section_belongs_stops_every_command_with_one_line(trained, tmp_path):
    """heads/ replaced by a file: verify said 'ok', runs listed none, train-head trained and then failed
    with an unexpected NotADirectoryError."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(trained, root)
    shutil.rmtree(root / "heads")
    (root / "heads").write_text("x")
    for args in (["verify"], ["runs"], ["train-head", "--method", "linear", "--dataset", "demo", "--features",
                                        "text=minilm", "--target", "label", "-p", "epochs=1"]):
        res = invoke(root, *args, code=8)
        assert f"{root / 'heads'} is a file where the store keeps a folder" in " ".join(res.output.split())
        assert "training" not in res.output


def test_a_file_where_a_dataset_run_or_memory_folder_belongs_is_reported(trained, tmp_path):
    """heads/lin and datasets/demo replaced by files: verify said 'ok'; datasets add demo was an
    unexpected FileExistsError."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(trained, root)
    for folder in (root / "heads" / "lin", root / "datasets" / "demo"):
        shutil.rmtree(folder)
        folder.write_text("x")
    out = invoke(root, "verify", code=8).output
    assert f"PROBLEM {root / 'heads' / 'lin'}: is a file where heads/ keeps one folder per run" in out
    assert f"PROBLEM {root / 'datasets' / 'demo'}: is a file where datasets/ keeps one folder per dataset" in out
    res = invoke(root, "datasets", "add", "demo", "--builtin", "demo", code=8)
    assert f"{root / 'datasets' / 'demo'} is a file where dataset 'demo' would be registered" in res.output


@pytest.mark.parametrize("args", [
    ["predict", "lin", "--batch", "{fifo}"],
    ["query", "--memory", "none-yet", "--batch", "{fifo}"],
    ["sweep", "--method", "linear", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
     "--random", "2", "--space", "{fifo}"],
])
def test_a_fifo_given_as_an_input_file_is_refused_not_read_forever(trained, tmp_path, args):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    res = fs_proc(trained, *[a.format(fifo=fifo) for a in args])  # hung until killed (TimeoutExpired)
    line = one_clear_line(res)
    assert str(fifo) in line and "not a regular file (a FIFO, socket or device)" in line
    assert res.returncode in (2, 4)


@pytest.mark.parametrize("args, code, message", [
    # an OverflowError from polars (exit 1)
    (["extract", "--dataset", "other", "--modality", "text", "--backbone", "minilm", "--limit",
      "99999999999999999999"], 0, "cache hit: all 3 inputs"),
    (["va", "score", "--dataset", "other", "--modality", "text", "--scorer", "lexicon", "--limit",
      "99999999999999999999"], 0, "3 scored"),
    # planned up front: --seeds 1e20 was killed for memory, --random 1e20 never finished drawing
    (["train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
      "--seeds", "99999999999999999999"], 2, "--seeds 99999999999999999999 from --seed 0 is too many: at most 10,000"),
    (["train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
      "--seed", "4294967294", "--seeds", "3"], 2, "the last at most 4294967295"),
    (["sweep", "--method", "linear", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
      "--random", "99999999999999999999", "--space", "{space}"], 2,
     "--random 99999999999999999999 is more configurations than one sweep draws (at most 1,000,000)"),
])
def test_huge_counts_are_taken_or_refused_at_once(trained, tmp_path, args, code, message):
    space = tmp_path / "space.json"
    space.write_text('{"lr": [0.001]}')
    res = fs_proc(trained, *[a.format(space=space) for a in args], code=code)
    assert message in " ".join((res.stdout + res.stderr).split()) and "Traceback" not in res.stderr


@pytest.mark.parametrize("args", [
    ["train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm", "--target", "label"],
    ["lora", "train", "--backbone", "minilm", "--dataset", "demo", "--out", "a1"],
])
def test_a_huge_thread_count_is_refused_by_the_option(trained, args):
    """torch.set_num_threads(1e20) was an unexpected 'Overflow when unpacking long long'."""
    res = invoke(trained, *args, "--threads", "99999999999999999999", code=2)
    assert "'--threads': 99999999999999999999 is not in the range 0<=x<=1024" in res.output
