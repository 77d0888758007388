"""Issue 11 (item 6): a hub id with no network and no local copy fails at once with one clear line;
a hub id in the local hub cache loads without the network; only what ships in a package is "packaged".

No test touches the network: the hub's address is set to a `.invalid` host (a name that never
resolves), as on a machine without network, with HF_HUB_OFFLINE unset.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from featurestore.cli import cli

NO_NET = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
NO_NET.update(HF_ENDPOINT="https://hub.invalid", FS_HUB_PROBE_TIMEOUT="2", OMP_NUM_THREADS="1", FS_DEBUG="")


def fs(store, *args, env):
    return subprocess.run([sys.executable, "-m", "featurestore.cli", "--store", str(store), *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub") / "store"
    csv = root.parent / "few.csv"
    csv.write_text("item_id,text,label\na,what a day,happy\nb,so sad,sad\n")
    runner = CliRunner()
    for args in (["init"], ["datasets", "add", "few", "--manifest", str(csv)]):
        assert runner.invoke(cli, ["--store", str(root), *args]).exit_code == 0
    return root


def test_an_unreachable_hub_is_one_line_without_retries(store):
    res = fs(store, "extract", "--dataset", "few", "--modality", "text", "--backbone", "hf-text",
             "--model", "nobody/no-such-model", env=NO_NET)
    assert res.returncode == 7, res.stderr  # BackboneError
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "'nobody/no-such-model' is not in the local hub cache and the hub (hub.invalid) cannot be reached" in err
    assert "--model PATH" in err
    assert "retry" not in err.lower() and "thrown while requesting" not in err


def test_hf_hub_offline_says_so(store):
    res = fs(store, "extract", "--dataset", "few", "--modality", "text", "--backbone", "clip-text",
             env={**NO_NET, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 7
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE is set" in err
    assert "openai/clip-vit-base-patch32" in err


def _tiny_roberta(path: Path) -> None:
    import torch
    from transformers import BertTokenizerFast, RobertaConfig, RobertaModel

    tokens = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz.,!? ")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(vocab_size=len(tokens), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=20, max_position_embeddings=40,
                                       pad_token_id=1, bos_token_id=2, eos_token_id=3), add_pooling_layer=False)
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)


def test_a_hub_id_in_the_local_cache_loads_with_no_network(store, tmp_path):
    """The hub cache's own layout (models--org--name/snapshots/REV, refs/main), filled by hand."""
    cache = tmp_path / "hub-cache"
    snap = cache / "models--tiny--roberta" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    _tiny_roberta(snap)
    (cache / "models--tiny--roberta" / "refs").mkdir()
    (cache / "models--tiny--roberta" / "refs" / "main").write_text("0" * 40)
    res = fs(store, "extract", "--dataset", "few", "--modality", "text", "--backbone", "hf-text",
             "--model", "tiny/roberta", "--json", env={**NO_NET, "HF_HUB_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["computed"] == 2 and out["failed_total"] == 0


def test_load_kwargs_decides_before_transformers(tmp_path, monkeypatch):
    from featurestore.backbones import hub
    from featurestore.errors import BackboneError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    hub._probed.clear()
    assert hub.load_kwargs(str(tmp_path), what="x", option="--model PATH") == {}  # a local folder
    with pytest.raises(BackboneError, match="cannot be reached"):
        hub.load_kwargs("org/absent", what="backbone x", option="--model PATH")
    assert hub._probed == {"https://hub.invalid": False}  # probed once, remembered
    hub._probed.clear()


def test_only_what_ships_in_a_package_is_packaged():
    res = CliRunner().invoke(cli, ["backbones", "list", "--json"])
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["clip-text"]["default_model"] == "openai/clip-vit-base-patch32" and not rows["clip-text"]["packaged"]
    assert rows["clip-image"]["default_model"] == "openai/clip-vit-base-patch32"
    assert rows["minilm"]["packaged"] and rows["minilm"]["default_model"] == "(packaged)"
    from featurestore import backbones

    packaged = backbones.create("minilm").model_ref
    assert Path(packaged).exists()  # a folder an installed package ships
    text = CliRunner().invoke(cli, ["backbones", "list"]).output
    clip_line = next(ln for ln in text.splitlines() if ln.startswith("clip-text"))
    assert "(packaged)" not in clip_line
