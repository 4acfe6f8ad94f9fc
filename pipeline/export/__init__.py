"""Export formats used by `pipeline.stages.export`, one module per concern. `FORMATS` holds the
names `export.formats` accepts, each with the module that writes it; the artifact folder and
file names below are what `distill serve` and users read, beside EXPORT_MERGED in artifacts.py.

  merged.py     adapter merged into an unquantized base, saved in the base's dtype, verified
  adapter.py    the PEFT adapter alone
  gguf.py       llama.cpp files: F16 from the converter, the rest from llama.cpp's quantizer
  converter.py  llama.cpp's convert_hf_to_gguf.py from the pinned llama-cpp-python sdist, isolated
  parity.py     every artifact re-scored in its runtime; tokenizer/template/EOS checks; the gate
  modelfile.py  the Ollama Modelfile (chat template as a Go template, stops)
  card.py       the model card (README.md)
  registry.py   MLflow model registry versions with lineage tags
"""

from __future__ import annotations

from pipeline.artifacts import EXPORT_GGUF, gguf_name
from pipeline.export.adapter import EXPORT_ADAPTER
from pipeline.export.modelfile import MODELFILE
from pipeline.export.parity import PARITY_JSON, PARITY_MD

FORMATS = {"merged": "pipeline.export.merged", "adapter": "pipeline.export.adapter", "gguf": "pipeline.export.gguf"}

__all__ = ["EXPORT_ADAPTER", "EXPORT_GGUF", "FORMATS", "MODELFILE", "PARITY_JSON", "PARITY_MD", "gguf_name"]
