"""`export` recipe section: formats, llama.cpp types and required artifacts checked before anything runs.

.venv/bin/pytest -q tests/export/test_export_config.py
"""

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ExportConfig, Recipe
from pipeline.gguf_types import CONVERTED, QUANTIZED, REFUSED

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, export: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "export": export}))
    return path


def test_a_quant_type_typo_fails_distill_validate_naming_the_entry_and_the_fix(tmp_path, capsys):
    recipe = write(tmp_path, {"formats": ["merged", "gguf"], "gguf_types": ["f16", "q4_k_n", "Q8_0"]})
    assert main(["validate", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "export.gguf_types[1]: unknown llama.cpp type 'q4_k_n' (did you mean" in err and "'q4_k_m'" in err
    assert "export.gguf_types[2]: write 'q8_0'" in err  # every error at once


def test_a_good_gguf_recipe_validates(tmp_path, capsys):
    recipe = write(
        tmp_path,
        {
            "formats": ["merged", "adapter", "gguf"],
            "gguf_types": ["f16", "q8_0", "q4_k_m"],
            "require": ["merged", "gguf-q8_0"],
        },
    )
    assert main(["validate", str(recipe)]) == 0
    assert ExportConfig(formats=["merged", "adapter", "gguf"], gguf_types=["f16", "q8_0"]).artifact_names() == [
        "merged",
        "adapter",
        "gguf-f16",
        "gguf-q8_0",
    ]


@pytest.mark.parametrize(
    ("export", "message"),
    [
        ({"formats": ["adapter", "gguf"]}, "export.formats must include merged"),
        ({"formats": ["merged", "gguf"], "gguf_types": ["q8_0"]}, "must include 'f16'"),
        ({"formats": ["merged", "gguf"], "gguf_types": ["f16", "iq2_xs"]}, "'iq2_xs' needs an importance matrix"),
        ({"formats": ["merged", "gguf"], "gguf_types": ["f16", "q8_0", "q8_0"]}, "listed twice: q8_0"),
        ({"formats": ["merged"], "require": ["gguf-q8_0"]}, "'gguf-q8_0' is not produced"),
        ({"formats": ["merged", "megred"]}, "export.formats.1"),
        ({"verify_min_agreement": 1.5}, "export.verify_min_agreement"),
        ({"verify_logprob_tolerance": 0}, "export.verify_logprob_tolerance"),
    ],
)
def test_inconsistent_export_sections_are_refused(export, message):
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        Recipe.model_validate({"name": "x", "export": export})


def test_the_type_table_is_llama_cpps_own():
    import llama_cpp

    for name, value in {**CONVERTED, **QUANTIZED}.items():
        constant = "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
        assert getattr(llama_cpp, constant) == value, name
    known = {
        k.removeprefix("LLAMA_FTYPE_MOSTLY_").lower() for k in dir(llama_cpp) if k.startswith("LLAMA_FTYPE_MOSTLY_")
    }
    assert known == (set(CONVERTED) | set(QUANTIZED) | set(REFUSED)) - {"f32"}, (
        "a llama.cpp type is neither accepted nor refused"
    )


def test_every_shipped_recipe_still_validates(capsys):
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        assert main(["validate", str(path)]) == 0, capsys.readouterr().err
