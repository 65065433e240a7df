"""A workspace made ready for the workbench: its folders, the sample datasets on first use, the
form's saved settings (a fresh workspace starts from the demo's), and the file the Dataset pane
opens."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunebench.engine.core.config import changed_fields
from tunebench.engine.core.data import parse_dataset_spec
from tunebench.engine.core.data_sources import JSON_EXTENSIONS
from tunebench.engine.core.demo_config import demo_config
from tunebench.engine.core.errors import DataError
from tunebench.engine.core.sample_data import find_sample_data
from tunebench.engine.core.workspace import Workspace

from .widgets.params.settings_store import TrainSettings


def prepare_workspace(root: Path, model: str | None) -> tuple[Workspace, TrainSettings, Path]:
    """Create the workspace folders and load the form; a fresh workspace gets the demo set-up
    (the sample datasets and the demo's identity fine-tune), so the first screen can train."""
    ws = Workspace(root).ensure()
    settings = TrainSettings(ws)
    fresh = not settings.load()
    samples = find_sample_data()
    if samples is not None and not any(ws.datasets_dir.glob("*.json*")):
        for name in ("self_cognition.jsonl", "general.jsonl"):
            if (samples / name).is_file():
                shutil.copy2(samples / name, ws.datasets_dir / name)
    if fresh:
        # The demo's identity fine-tune, when its data is at hand; else the plain defaults.
        if samples is not None:
            demo = changed_fields(demo_config(output_dir="runs"))
            settings.update({**demo, "dataset": ["datasets/self_cognition.jsonl"]})
    if model:
        settings.update({"model": model})
    if fresh or model:
        settings.save()
    return ws, settings, first_dataset(ws, settings)


def first_dataset(ws: Workspace, settings: TrainSettings) -> Path:
    """The file the Dataset pane opens: the first JSON file the form trains on (the pane edits JSON
    lines; a .csv, .parquet, folder or hub id trains but is not opened), else one in datasets/."""
    for spec in settings.config.dataset:
        try:
            path = parse_dataset_spec(spec, ws.root).path
        except DataError:
            continue
        if path.is_file() and path.suffix.lower() in JSON_EXTENSIONS:
            return path
    existing = sorted(ws.datasets_dir.glob("*.jsonl"))
    return existing[0] if existing else ws.datasets_dir / "train.jsonl"
