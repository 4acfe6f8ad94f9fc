"""The GGUF types `export.gguf_types` accepts: llama.cpp's own names, checked when the recipe loads.

    .venv/bin/pytest -q tests/export/test_export_config.py

The table is llama.cpp's (tools/quantize/quantize.cpp, `QUANT_OPTIONS`, of the release the
project pins; a test compares it with the LLAMA_FTYPE_* constants of the installed
llama-cpp-python), written out here so `distill validate` checks a recipe without importing
llama.cpp: a typo fails in a second instead of after a slow merge and conversion.
"""

from __future__ import annotations

import difflib

# Written by llama.cpp's converter straight from the merged folder (no quantizer involved).
CONVERTED = {"f32": 0, "f16": 1, "bf16": 32}
# Made from the F16 file by `llama_cpp.llama_model_quantize`; name -> LLAMA_FTYPE_MOSTLY_* value.
QUANTIZED = {
    "q8_0": 7,
    "q6_k": 18,
    "q5_k_m": 17,
    "q5_k_s": 16,
    "q5_0": 8,
    "q5_1": 9,
    "q4_k_m": 15,
    "q4_k_s": 14,
    "q4_0": 2,
    "q4_1": 3,
    "iq4_nl": 25,
    "iq4_xs": 30,
    "q3_k_l": 13,
    "q3_k_m": 12,
    "q3_k_s": 11,
    "iq3_m": 27,
    "iq3_s": 26,
    "q2_k": 10,
}
# Types llama.cpp has that this export cannot make well, and why (said in the error).
REFUSED = {
    **{
        t: "needs an importance matrix (llama-imatrix), which export does not compute"
        for t in ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s")
    },
    **{t: "is for ternary-trained models only" for t in ("tq1_0", "tq2_0")},
    "mxfp4_moe": "is for mixture-of-experts models only",
    "nvfp4": "is an experimental format llama.cpp's CPU backend does not run",
    "q1_0": "is an experimental format",
    "q2_0": "is an experimental format",
}
GGUF_TYPES = {**CONVERTED, **QUANTIZED}
# Bits per weight of each type's blocks (ggml's block layouts: e.g. q8_0 is 34 bytes per 32 weights);
# the _m mixes keep some tensors a size up, so theirs are taken one step higher. For disk estimates.
NOMINAL_BITS = {
    "f32": 32,
    "f16": 16,
    "bf16": 16,
    "q8_0": 8.5,
    "q6_k": 6.5625,
    "q5_k_m": 6.0,
    "q5_k_s": 5.5,
    "q5_0": 5.5,
    "q5_1": 6.0,
    "q4_k_m": 5.0,
    "q4_k_s": 4.5,
    "q4_0": 4.5,
    "q4_1": 5.0,
    "iq4_nl": 4.5,
    "iq4_xs": 4.25,
    "q3_k_l": 4.5,
    "q3_k_m": 4.0,
    "q3_k_s": 3.4375,
    "iq3_m": 3.75,
    "iq3_s": 3.4375,
    "q2_k": 3.0,
}
REFERENCE_TYPE = "f16"  # every quantized file is made from it; held to the merged model's log-probabilities


def gguf_type_errors(types: list[str], where: str = "export.gguf_types") -> list[str]:
    """One message per bad entry, naming the entry and the nearest valid type."""
    errors = []
    for i, name in enumerate(types):
        if name in GGUF_TYPES:
            continue
        if name.lower() in GGUF_TYPES:
            errors.append(f"{where}[{i}]: write '{name.lower()}' (llama.cpp type names are lower case here)")
        elif name.lower() in REFUSED:
            errors.append(f"{where}[{i}]: '{name}' {REFUSED[name.lower()]}")
        else:
            near = difflib.get_close_matches(name.lower(), list(GGUF_TYPES), n=2, cutoff=0.6)
            hint = (
                f" (did you mean {' or '.join(repr(n) for n in near)}?)"
                if near
                else f"; known: {', '.join(GGUF_TYPES)}"
            )
            errors.append(f"{where}[{i}]: unknown llama.cpp type '{name}'{hint}")
    dupes = sorted({t for t in types if types.count(t) > 1})
    if dupes:
        errors.append(f"{where}: listed twice: {', '.join(dupes)}")
    if REFERENCE_TYPE not in types:
        errors.append(
            f"{where}: must include '{REFERENCE_TYPE}': every quantized file is made from it and "
            "it is the one held to the merged model's log-probabilities"
        )
    return errors
