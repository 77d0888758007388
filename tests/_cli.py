"""`fs` in-process for the tests: `fs(root, *args, code=0)` runs the CLI on a store and checks its exit status."""
from __future__ import annotations

from click.testing import CliRunner

from featurestore.cli import cli


def fs(root, *args, code=0):
    res = CliRunner().invoke(cli, ["--store", str(root), *args], catch_exceptions=False)
    assert res.exit_code == code, (args, res.exit_code, res.output)
    return res
