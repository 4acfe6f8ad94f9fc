"""GGUF export on the embedded SmolLM2: llama.cpp's converter and quantizer, read back by two
independent loaders (llama.cpp and transformers' `gguf_file=`), tokenizer / chat-template / EOS
parity, a planted broken file caught, real bits per weight, the Ollama Modelfile.

    .venv/bin/pytest -q tests/test_export_gguf.py
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DistillError
from pipeline.export.gguf import describe, export_gguf, gguf_metadata, quantize
from pipeline.export.modelfile import infer_chat_format, modelfile_text, stop_strings
from pipeline.export.parity import ArtifactParity, GgufModel, gguf_problems, table_markdown
from pipeline.llm.loading import cache_root
from pipeline.task import Task

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TRICKY = "Ça  marche pas!!  Order #A-1029 😀 — refund?\n\ttabs and   spaces"


def prompts(n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in (ROOT / "data" / "prompts.jsonl").read_text().splitlines()[:n]]
    return [Task.student_messages(r["prompt"]) for r in rows] + [Task.student_messages(TRICKY)]


@pytest.fixture(scope="module")
def peaky(tmp_path_factory, embedded_dir):
    """A 2-layer random Llama with large weights (greedy answers that vary, not one repeated
    token, so exact-token parity means something) as F16 GGUF."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True)
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


def test_f16_gives_transformers_greedy_tokens_in_llama_cpp_and_reads_back_in_transformers(peaky):
    from transformers import AutoModelForCausalLM

    from pipeline.llm.generate import generate_batch

    folder, files, tokenizer = peaky
    f16 = files["f16"]
    convs = prompts(4)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    want = [c.token_ids for c in generate_batch(model, tokenizer, convs, 12)]
    assert len({tuple(w) for w in want}) == len(want) and all(len(set(w)) > 3 for w in want)  # not degenerate
    gguf = GgufModel(f16.path, n_ctx=512)
    try:
        assert [c.token_ids for c in gguf.answer_all(convs, 12).completions] == want
    finally:
        gguf.close()
    read_back = AutoModelForCausalLM.from_pretrained(f16.path.parent, gguf_file=f16.path.name).eval()
    assert [c.token_ids for c in generate_batch(read_back, tokenizer, convs, 12)] == want


def test_q8_0_picks_the_same_next_token_at_95_percent_of_answer_positions(smol):
    """Teacher-forced on the F32 model's own greedy answers: at each answer position, does Q8_0
    (in llama.cpp) rank the same token first? (Prompt positions, where the model guesses the
    user's next word, are near-ties that no served answer depends on.)"""
    import llama_cpp
    import torch

    from pipeline.llm.generate import generate_batch

    files, tokenizer, model, _ = smol
    convs = prompts(4)
    answers = generate_batch(model, tokenizer, convs, 12)
    llm = llama_cpp.Llama(model_path=str(files["q8_0"].path), n_ctx=512, logits_all=True, verbose=False)
    same = total = 0
    try:
        for conv, answer in zip(convs, answers):
            text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = prompt + answer.token_ids
            with torch.no_grad():
                want = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)]).argmax(-1)
            span = slice(len(prompt) - 1, len(ids))
            same, total = same + int((got[span] == want[span]).sum()), total + len(ids) - len(prompt) + 1
    finally:
        llm.close()
    assert 8.0 < files["q8_0"].bits_per_weight < 9.0
    assert total >= 30 and same / total >= 0.95, f"Q8_0 top-token agreement {same / total:.3f} over {total} positions"


def test_gguf_tokenizer_chat_template_and_special_ids_match_the_hf_tokenizer(peaky):
    _, files, tokenizer = peaky
    gguf = GgufModel(files["f16"].path, n_ctx=512)
    try:
        meta = gguf_metadata(gguf.llm)
        assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id and not meta["tokenizer.ggml.add_bos_token"]
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
    row = ArtifactParity("gguf-q4_k_m", "gguf/model-q4_k_m.gguf", q4.size_bytes, bits_per_weight=q4.bits_per_weight,
                         tensor_types=q4.tensor_types)
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
    import gguf
    from importlib import metadata

    from pipeline.export import converter

    folder = converter.converter_dir(cache_root())  # already fetched by the fixtures' conversions
    assert folder.name == converter.LLAMA_CPP_VERSION == metadata.version("llama_cpp_python")
    assert (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert cache_root() not in Path(gguf.__file__).parents  # transformers still reads GGUF with PyPI's gguf

    real = metadata.version
    monkeypatch.setattr(converter.metadata, "version",
                        lambda name: "0.3.99" if name == "llama_cpp_python" else real(name))
    with pytest.raises(DistillError, match="llama-cpp-python 0.3.99 is installed but the GGUF converter is pinned to"):
        converter.converter_dir(cache_root())
