"""GGUF export on the embedded SmolLM2: llama.cpp's converter and quantizer, read back by two
independent loaders (llama.cpp and transformers' `gguf_file=`), tokenizer / chat-template / EOS
parity, a planted broken file caught, real bits per weight, the Ollama Modelfile.

    .venv/bin/pytest -q tests/export/test_export_gguf.py
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.conversation import user_turn
from pipeline.errors import DistillError
from pipeline.export.gguf import describe, export_gguf, gguf_metadata, quantize
from pipeline.export.modelfile import infer_chat_format, modelfile_text, stop_strings
from pipeline.export.parity import (
    ArtifactParity,
    check_reference_type,
    forced_references,
    gguf_problems,
    logprob_gap,
    table_markdown,
)
from pipeline.llm.gguf_runtime import GgufModel, GgufUnusable, probe
from pipeline.llm.loading import cache_root

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TRICKY = "Ça  marche pas!!  Order #A-1029 😀 — refund?\n\ttabs and   spaces"


def prompts(n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in (ROOT / "data" / "prompts.jsonl").read_text().splitlines()[:n]]
    return [user_turn(r["prompt"]) for r in rows] + [user_turn(TRICKY)]


@pytest.fixture(scope="module")
def peaky(tmp_path_factory, embedded_dir):
    """A 2-layer random Llama with large weights (greedy answers that vary, not one repeated
    token, so exact-token parity means something) as F16 GGUF."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("peaky")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    files = {f.type: f for f in export_gguf(folder, ["f16", "q8_0"], folder, cache_root())}
    return folder, files, tokenizer


@pytest.fixture(scope="module")
def smol(tmp_path_factory, embedded_dir):
    """The embedded model's folder (a plain transformers folder, as merged/ is) as Q8_0 GGUF: a
    real model, because a random one's near-tied logits say nothing about quantization error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("gguf")
    files = {f.type: f for f in export_gguf(embedded_dir, ["f16", "q8_0"], out, cache_root())}
    (out / "gguf" / "model-f16.gguf").unlink()  # 270 MB nobody reads
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir).eval()
    return files, tokenizer, model, out


def test_f16_gives_transformers_log_probabilities_in_llama_cpp_and_reads_back_in_transformers(peaky):
    """Teacher-forced on transformers' greedy answers, F16 in llama.cpp gives each answer token
    transformers' log-probability and ranks it first except at near-ties; transformers' own GGUF
    reader gives back the same model. (Exact greedy equality on random weights hinges on near-ties,
    which differ between CPUs' kernels.)"""
    from transformers import AutoModelForCausalLM

    folder, files, tokenizer = peaky
    convs = prompts(4)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    references = forced_references(model, tokenizer, convs, 12)
    answers = [tuple(r.answer_ids) for r in references]
    assert len(set(answers)) == len(answers) and all(len(set(a)) > 3 for a in answers)  # not degenerate
    gguf = GgufModel(files["f16"].path, n_ctx=512)
    try:
        gaps = [logprob_gap(gguf, r) for r in references]
        row = ArtifactParity("gguf-f16", "model-f16.gguf", 0)
        check_reference_type(row, gguf, references, 0.25)
    finally:
        gguf.close()
    assert max(gaps) < 0.25 and row.status == "accepted" and row.verify_max_logprob_delta == max(gaps)
    read_back = AutoModelForCausalLM.from_pretrained(files["f16"].path.parent, gguf_file=files["f16"].path.name)
    again = forced_references(read_back.eval(), tokenizer, convs, 12)
    for want, got in zip(references, again):
        n = min(len(want.answer_ids), len(got.answer_ids))
        assert np.abs(want.rows[:n] - got.rows[:n]).max() < 0.25  # F16 rounding, no more


def test_f16_of_a_model_with_one_wrong_tensor_is_rejected(peaky, tmp_path):
    """The check fails on a real defect: the same model with one attention matrix altered, as a
    converter that maps a tensor wrongly would write it."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, files, tokenizer = peaky
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    references = forced_references(model, tokenizer, prompts(4), 12)
    with torch.no_grad():
        weight = model.model.layers[1].self_attn.o_proj.weight
        weight.copy_(weight.flip(0))
    model.save_pretrained(tmp_path / "wrong")
    tokenizer.save_pretrained(tmp_path / "wrong")
    (wrong,) = export_gguf(tmp_path / "wrong", ["f16"], tmp_path, cache_root())
    gguf = GgufModel(wrong.path, n_ctx=512)
    try:
        row = ArtifactParity("gguf-f16", "model-f16.gguf", 0)
        check_reference_type(row, gguf, references, 0.25)
    finally:
        gguf.close()
    assert row.status == "rejected" and row.verify_max_logprob_delta > 1.0
    assert row.reasons[0].startswith("teacher-forced on merged's greedy answers, log-probabilities differ by up to")


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m", "q5_k_m", "q4_0"])
def test_each_quantized_type_loads_and_decodes_in_this_process(peaky, tmp_path, gguf_type):
    """What crashed on AMX Xeons (SIGSEGV on the first decode of a quantized file): every type the
    recipes export, decoded in process by the llama.cpp `make setup` built."""
    import llama_cpp

    _, files, _ = peaky
    target = tmp_path / f"model-{gguf_type}.gguf"
    quantize(files["f16"].path, target, gguf_type)
    gguf = GgufModel(target, n_ctx=512)
    try:
        answer = gguf.answer(gguf.tokenize(gguf.render(prompts(1)[0]) or ""), 8)
    finally:
        gguf.close()
    assert answer.completion_tokens == len(answer.token_ids) > 0 and len(answer.token_logprobs) > 0
    assert "AMX" not in llama_cpp.llama_print_system_info().decode()  # built without AMX kernels (Makefile)


def test_a_crash_in_the_probe_is_one_line_not_a_dead_process(peaky, monkeypatch):
    from pipeline.llm import gguf_runtime

    _, files, _ = peaky
    monkeypatch.setattr(gguf_runtime, "PROBE", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    gguf_runtime._probe_once.cache_clear()
    try:
        with pytest.raises(
            GgufUnusable,
            match=r"^llama.cpp crashed \(SIGSEGV\) decoding model-q8_0.gguf in a probe "
            r"process: .* reinstall it with `make setup`",
        ):
            GgufModel(files["q8_0"].path, n_ctx=512)
    finally:
        monkeypatch.undo()
        gguf_runtime._probe_once.cache_clear()
    probe(files["q8_0"].path)  # the real probe decodes it


def test_q8_0_picks_the_same_next_token_at_95_percent_of_answer_positions(smol):
    """Teacher-forced on the F32 model's own greedy answers: at each answer position (and the stop
    after it), does Q8_0 (in llama.cpp) rank the same token first?"""
    files, tokenizer, model, _ = smol
    references = forced_references(model, tokenizer, prompts(4), 12)
    gguf = GgufModel(files["q8_0"].path, n_ctx=512)
    same = total = 0
    try:
        for r in references:
            got = gguf.forced_logprobs(r.prompt_ids, r.answer_ids).argmax(-1)
            want = r.rows.argmax(-1)
            same, total = same + int((got == want).sum()), total + len(want)
    finally:
        gguf.close()
    assert 8.0 < files["q8_0"].bits_per_weight < 9.0
    assert total >= 30 and same / total >= 0.95, f"Q8_0 top-token agreement {same / total:.3f} over {total} positions"


def test_gguf_tokenizer_chat_template_and_special_ids_match_the_hf_tokenizer(peaky):
    _, files, tokenizer = peaky
    gguf = GgufModel(files["f16"].path, n_ctx=512)
    try:
        meta = gguf_metadata(gguf.llm)
        assert (
            meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id and not meta["tokenizer.ggml.add_bos_token"]
        )
        assert gguf_problems(gguf, meta, tokenizer, prompts(4)) == []
    finally:
        gguf.close()


def plant_eos(source: Path, target: Path, eos: int) -> None:
    """Copy a GGUF with another EOS id, as a conversion with a wrong special-tokens map writes it."""
    data = bytearray(source.read_bytes())
    at = data.index(b"tokenizer.ggml.eos_token_id") + len("tokenizer.ggml.eos_token_id")
    assert struct.unpack_from("<I", data, at)[0] == 4  # a uint32 value follows
    struct.pack_into("<I", data, at + 4, eos)
    target.write_bytes(bytes(data))


def test_a_planted_wrong_eos_id_is_caught_with_a_clear_message(peaky, tmp_path):
    _, files, tokenizer = peaky
    broken = tmp_path / "broken.gguf"
    plant_eos(files["q8_0"].path, broken, 3)
    gguf = GgufModel(broken, n_ctx=512)
    try:
        problems = gguf_problems(gguf, gguf_metadata(gguf.llm), tokenizer, prompts(1))
    finally:
        gguf.close()
    assert problems and problems[0].startswith("EOS id 3 in the GGUF, but the tokenizer's EOS is 2 ('<|im_end|>')")


def test_k_quants_report_their_real_bits_per_weight(peaky, tmp_path):
    _, files, _ = peaky
    target = tmp_path / "model-q4_k_m.gguf"
    quantize(files["f16"].path, target, "q4_k_m")
    q4 = describe(target, "q4_k_m")
    # hidden size 64 (like SmolLM2's 576) is no multiple of 256: the k-quant rows fall back to legacy types
    assert q4.bits_per_weight > 5.0 and "q4_k" not in q4.tensor_types and len(q4.tensor_types) > 2
    row = ArtifactParity(
        "gguf-q4_k_m",
        "gguf/model-q4_k_m.gguf",
        q4.size_bytes,
        bits_per_weight=q4.bits_per_weight,
        tensor_types=q4.tensor_types,
    )
    table = table_markdown([row], {"test_examples": 0, "tolerance": 0.02, "batch_size": 16})
    assert f"{q4.bits_per_weight:.2f} bits/weight" in table and "fall back to legacy types" in table


def test_llama_cpp_quantizer_failure_is_a_one_line_error(tmp_path):
    with pytest.raises(DistillError, match="could not quantize missing.gguf to q8_0 \\(return code"):
        quantize(tmp_path / "missing.gguf", tmp_path / "out.gguf", "q8_0")
    assert not list(tmp_path.iterdir())


def test_modelfile_template_reproduces_the_training_chat_template(peaky):
    _, _, tokenizer = peaky
    convs = prompts(2)
    fmt = infer_chat_format(tokenizer, convs)
    assert fmt is not None
    for conv in convs + [[{"role": "system", "content": "s"}, *convs[0]]]:
        assert fmt.render(conv) == tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    text = modelfile_text("model-q8_0.gguf", fmt, stop_strings(fmt, tokenizer))
    assert text.splitlines()[1] == "FROM ./model-q8_0.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    assert 'TEMPLATE """{{ range $i, $_ := .Messages }}' in text and "{{-" not in text


def test_the_converter_is_the_pinned_releases_own_and_stays_out_of_this_process(peaky, monkeypatch):
    from importlib import metadata

    import gguf

    from pipeline.export import converter

    folder = converter.converter_dir(cache_root())  # already fetched by the fixtures' conversions
    assert folder.name == converter.LLAMA_CPP_VERSION == metadata.version("llama_cpp_python")
    assert (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert cache_root() not in Path(gguf.__file__).parents  # transformers still reads GGUF with PyPI's gguf

    real = metadata.version
    monkeypatch.setattr(
        converter.metadata, "version", lambda name: "0.3.99" if name == "llama_cpp_python" else real(name)
    )
    with pytest.raises(DistillError, match="llama-cpp-python 0.3.99 is installed but the GGUF converter is pinned to"):
        converter.converter_dir(cache_root())
