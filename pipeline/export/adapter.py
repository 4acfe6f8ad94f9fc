"""The `adapter` export: the PEFT adapter alone, for servers that load LoRAs per request
(vLLM `--enable-lora --lora-modules name=<folder>`, LoRAX, TGI).

    distill export RECIPE export.formats=[merged,adapter]

It is copied byte for byte from finetune's folder; the export stage then loads the merged
model's reference answers from this copy, so the shipped files are the verified ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.errors import DistillError

EXPORT_ADAPTER = "adapter"


def export_adapter(source: Path, out: Path) -> Path:
    files = [p for p in sorted(Path(source).iterdir()) if p.is_file() and p.name.startswith("adapter_")]
    if (
        not any(p.name.startswith("adapter_model.") for p in files)
        or not (Path(source) / "adapter_config.json").is_file()
    ):
        raise DistillError(f"{source}: no adapter_config.json + adapter_model.* (rerun `distill finetune --force`)")
    target = out / EXPORT_ADAPTER
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, target / path.name)
    return target
