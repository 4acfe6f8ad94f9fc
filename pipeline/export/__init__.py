"""Export formats used by `pipeline.stages.export`, one module each, in a registry keyed by
the names `export.formats` accepts. Each format writes its folder and re-checks it.

  merged.py   adapter merged into an unquantized base, saved as plain safetensors, verified
"""

from __future__ import annotations

from pipeline.export.merged import export_merged

FORMATS = {"merged": export_merged}
