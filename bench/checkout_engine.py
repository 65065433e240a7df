"""`tunebench.engine` from this checkout, installed or not: the GPU box has the repository only as
a folder. The bench scripts import this first (they run as `python3 bench/<script>.py`, so this
folder is on sys.path)."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_engine(*modules: str):
    """The tunebench.engine package, with `modules` (e.g. "train.recipe") imported from it."""
    try:
        importlib.import_module("tunebench.engine")
    except ImportError:
        package = types.ModuleType("tunebench")
        package.__path__ = []
        engine = types.ModuleType("tunebench.engine")
        engine.__path__ = [str(REPO / "engine")]
        package.engine = engine
        sys.modules["tunebench"] = package
        sys.modules["tunebench.engine"] = engine
    for name in modules:
        importlib.import_module(f"tunebench.engine.{name}")
    return sys.modules["tunebench.engine"]
