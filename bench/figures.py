"""Each bench's result -> its figures, the one place that says what a bench claims.

A figure is {name, value, unit, better, baseline, baseline_name, ratio, headline, note}:
`ratio` is value / baseline wherever the bench measured a baseline in the same run (None
otherwise); `better` says which direction is an improvement; `headline` marks the figures
bench/RESULTS.md lists first. The bench scripts store these in their JSON; bench/report.py
recomputes them for JSON written before the scripts did (the results' own numbers, unchanged).
"""

from __future__ import annotations

from collections.abc import Callable


def fig(
    name: str,
    value: float,
    unit: str,
    *,
    better: str = "higher",
    baseline: float | None = None,
    baseline_name: str | None = None,
    headline: bool = False,
    note: str | None = None,
) -> dict:
    ratio = value / baseline if baseline not in (None, 0) else None
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "better": better,
        "baseline": baseline,
        "baseline_name": baseline_name if baseline is not None else None,
        "ratio": ratio,
        "headline": headline,
        "note": note,
    }


def finetune_profile(r: dict) -> list[dict]:
    arms = r["arms"]
    trl, ours = arms["trl_loss"], arms["answer_only_loss"]
    what = f"{r['recipe']}, {ours['steps']} steps"
    out = [
        fig(
            f"CPU LoRA step, answer-only loss: s per step ({what})",
            ours["s_per_step"],
            "s",
            better="lower",
            baseline=trl["s_per_step"],
            baseline_name="TRL's fused-LM-head loss",
            headline=True,
        ),
        fig(
            "CPU LoRA step with TRL's loss: share of CPU time in its fused LM head (every position x vocabulary)",
            trl["fused_lm_head_share"],
            "fraction",
            better="lower",
        ),
    ]
    for op in ours["top_ops"][:3]:
        out.append(fig(f"CPU LoRA step, answer-only loss: share of CPU time in {op['op']}", op["share"], "fraction"))
    return out


def curate(r: dict) -> list[dict]:
    # Legacy shape: one TF-IDF arm at the top level; now `arms` per embeddings backend.
    arms = r.get("arms") or {r.get("embeddings", "tfidf"): {"wall_s": r["wall_s"]}}
    records = r["records"]
    tfidf = arms["tfidf"]["wall_s"] if "tfidf" in arms else None
    budget = f"budget {r['budget_s']} s" if r.get("budget_s") and records == 10_000 else None
    return [
        fig(
            f"curate, {emb} selection: s for {records:,} records (target {r['target_size']:,})",
            arm["wall_s"],
            "s",
            better="lower",
            baseline=tfidf if emb != "tfidf" else None,
            baseline_name="tfidf",
            headline=True,
            note=budget,
        )
        for emb, arm in arms.items()
    ]


def finetune(r: dict) -> list[dict]:
    runs = r["runs"]
    # The fp32 TRL-defaults arm when the run has it (TRL's bf16 default is slow on a CPU without bf16).
    base_name = "trl_default_fp32" if "trl_default_fp32" in runs else "trl_default"
    base = runs.get(base_name, {}).get("tokens_per_s")
    gflops = r["machine"]["fp32_matmul_gflops"]
    out = [fig("fp32 matmul rate (the roofline)", gflops, "GFLOP/s")]
    for name, run in runs.items():
        is_base = name == base_name
        out.append(
            fig(
                f"training {name}: real tokens/s ({r['examples']} examples, {r['recipe']})",
                run["tokens_per_s"],
                "tok/s",
                baseline=None if is_base else base,
                baseline_name=base_name,
                headline=name in ("padding_free", base_name),
            )
        )
        out.append(
            fig(
                f"training {name}: fraction of the fp32 roofline (4·N FLOPs/token)",
                run["roofline_fraction"],
                "fraction",
                headline=name == "padding_free",
            )
        )
    return out


def capture(r: dict) -> list[dict]:
    levels = r["concurrency"]
    first = min(levels, key=int)
    base = levels[first]["calls_per_s"]
    out = []
    for level, run in sorted(levels.items(), key=lambda kv: int(kv[0])):
        is_base = level == first
        out.append(
            fig(
                f"capture via llama.cpp server, concurrency {level}: calls/s ({run['calls']} prompts)",
                run["calls_per_s"],
                "calls/s",
                baseline=None if is_base else base,
                baseline_name=f"concurrency {first}",
                headline=True,
            )
        )
    cached = r["cached"]
    out.append(
        fig(
            f"capture re-run, all {cached['prompts']:,} cached: s per 1,000 prompts",
            cached["cached_rerun_s_per_1000"],
            "s",
            better="lower",
            baseline=cached["first_run_s"] * 1000 / cached["prompts"],
            baseline_name="first run, fault server",
            headline=True,
        )
    )
    return out


def local_teacher(r: dict) -> list[dict]:
    pps = r["prompts_per_s"]
    what = f"{r['prompts']} prompts, batch {r['batch']}, {r['prompt_tokens_first']}-token prompt"
    return [
        fig(f"local teacher, plain: prompts/s ({what})", pps["plain"], "prompts/s"),
        fig(
            f"local teacher, shared-prefix KV cache: prompts/s ({what})",
            pps["prefix_cache"],
            "prompts/s",
            baseline=pps["plain"],
            baseline_name="plain",
            headline=True,
        ),
        fig(
            "local teacher: answers identical between the arms",
            r["identical_answers"],
            "answers",
            baseline=r["prompts"],
            baseline_name="prompts",
            headline=True,
        ),
    ]


def label_scoring(r: dict) -> list[dict]:
    out = []
    for batch, s in sorted(r["scoring"].items(), key=lambda kv: int(kv[0])):
        t, what = s["s_per_request"], f"{r['labels']} labels, batch {batch}, {s['prompts']} prompts"
        out += [
            fig(
                f"label scoring, trie: s per request ({what})",
                t["trie"],
                "s",
                better="lower",
                baseline=t["bucketed"],
                baseline_name="per-label buckets",
                headline=True,
            ),
            fig(
                f"label scoring, trie against the floor (one causal pass over prompt + trie), batch {batch}",
                t["trie"],
                "s",
                better="lower",
                baseline=t["floor"],
                baseline_name="floor",
                headline=True,
            ),
            fig(
                f"label scoring, trie against greedy generation of {s['greedy_tokens']} tokens, batch {batch}",
                t["trie"],
                "s",
                better="lower",
                baseline=t["greedy"],
                baseline_name="greedy generation",
            ),
            fig(
                f"label scoring, batch {batch}: largest |trie - per-label buckets| token log-prob",
                s["max_abs_logprob_difference"],
                "nats",
                better="lower",
            ),
        ]
    return out


def label_capture(r: dict) -> list[dict]:
    c = r["capture"]
    wall = {arm: c["prompts"] / pps for arm, pps in c["prompts_per_s"].items()}
    what = f"{c['prompts']} demo prompts, {c['labels']} labels, batch {c['batch']}"
    scorers = {
        "distribution": "trie from generate's KV cache",
        "distribution_separate": "trie, a separate pass",
        "distribution_bucketed": "per-label buckets",
    }
    out = [
        fig(
            f"local-teacher capture with the label distribution ({scorer}): s ({what})",
            wall[arm],
            "s",
            better="lower",
            baseline=wall["plain"],
            baseline_name="plain capture",
            headline=arm == "distribution",
        )
        for arm, scorer in scorers.items()
    ]
    out.append(
        fig(
            "label distribution: largest |from generate's cache - separate pass| label log-likelihood",
            c["max_abs_logprob_difference"],
            "nats",
            better="lower",
        )
    )
    return out


def label_serving(r: dict) -> list[dict]:
    rps, what = r["requests_per_s"], f"{r['labels']} labels, {r['clients']} clients, {r['requests']} requests"
    return [
        fig(
            f"serving by label posterior, trie: requests/s ({what})",
            rps["trie"],
            "req/s",
            baseline=rps["bucketed"],
            baseline_name="per-label buckets",
            headline=True,
        ),
        *_compute_ceiling(r, what),
        fig(
            "serving by label posterior: answers identical between the arms",
            r["identical_answers"],
            "answers",
            baseline=r["requests"],
            baseline_name="requests",
            headline=True,
        ),
    ]


def _compute_ceiling(r: dict, what: str) -> list[dict]:
    if "compute" not in r:
        return []
    c = r["compute"]
    return [
        fig(
            f"serving by label posterior: compute ceiling, requests/s ({what})",
            c["ceiling_requests_per_s"],
            "req/s",
            note=f"{c['fp32_matmul_gflops']:.0f} GFLOP/s fp32 matmul / {c['gflop_per_request']:.1f} GFLOP per request",
        ),
        fig("serving by label posterior, trie: share of the compute ceiling", c["trie_share_of_ceiling"], "fraction"),
    ]


def label_evaluate(r: dict) -> list[dict]:
    per_row, c = r["s_per_row"], r["compute"]
    what = f"{r['labels']} labels, {r['rows']} validation rows, batch {r['batch']}"
    return [
        fig(
            f"evaluate's tuned-student answers, trie, adapter merged: s per row ({what})",
            per_row["trie"],
            "s",
            better="lower",
            baseline=per_row["bucketed"],
            baseline_name="per-label buckets",
            headline=True,
        ),
        fig(
            f"evaluate's tuned-student answers, compute ceiling: s per row ({what})",
            c["ceiling_s_per_row"],
            "s",
            better="lower",
            baseline=per_row["bucketed"],
            baseline_name="per-label buckets",
            note=f"{c['fp32_matmul_gflops']:.0f} GFLOP/s fp32 matmul / {c['gflop_per_row']:.1f} GFLOP per row",
        ),
        fig(
            f"evaluate's tuned-student answers, trie with the adapter unmerged: s per row ({what})",
            per_row["trie_unmerged"],
            "s",
            better="lower",
            baseline=per_row["bucketed"],
            baseline_name="per-label buckets",
        ),
        fig(
            "evaluate's tuned-student answers, trie: share of the compute ceiling",
            c["trie_share_of_ceiling"],
            "fraction",
        ),
        fig(
            "evaluate's tuned-student answers: identical between the arms",
            r["identical_answers"],
            "answers",
            baseline=r["rows"],
            baseline_name="rows",
        ),
    ]


def trie_bound(r: dict) -> list[dict]:
    out = []
    for eps, share in r["mean_share_to_run"].items():
        out.append(
            fig(
                f"label trie: inner nodes an oracle pruner still runs at eps {eps} ({r['labels']} labels, mean)",
                share,
                "fraction",
                better="lower",
                headline=eps == "1e-07",
                note="keeps confidences within ~1e-4" if eps == "1e-07" else "changes confidences",
            )
        )
    return out


def _latency(section: str, arm: str, baseline: str, block: dict, headline: bool) -> list[dict]:
    out = []
    for level, comparison in block.items():
        c = level.replace("concurrency_", "concurrency ")
        for p in ("p50_ms", "p99_ms"):
            out.append(
                fig(
                    f"{section}, {c}: {arm} {p[:3]}",
                    comparison[arm][p],
                    "ms",
                    better="lower",
                    baseline=comparison[baseline][p],
                    baseline_name=baseline,
                    headline=headline and p == "p50_ms",
                    note=f"n={comparison[arm]['n']}",
                )
            )
    return out


def router(r: dict) -> list[dict]:
    out = []
    if "b_router_layer" in r:
        out += _latency("router layer", "router_null_backend", "bare_uvicorn", r["b_router_layer"], True)
    if "c_escalation" in r:
        out += _latency("escalation", "router_escalated", "teacher_direct", r["c_escalation"], True)
    if "a_router_vs_in_process" in r:
        out += _latency("tiny model", "router_http", "generate_in_process", r["a_router_vs_in_process"], False)
    if "e_proxy" in r:
        out += _latency("capture proxy", "proxy", "teacher_direct", r["e_proxy"], True)
    if "d_micro_batching" in r:
        d = r["d_micro_batching"]
        rps = d["requests_per_s"]
        out.append(
            fig(
                f"micro-batching, concurrency {d['concurrency']}: max_batch 4 requests/s",
                rps["max_batch_4"],
                "req/s",
                baseline=rps["max_batch_1"],
                baseline_name="max_batch 1",
                headline=True,
                note=f"{d['requests_per_arm']} requests per arm",
            )
        )
    return out


def router_soak(r: dict) -> list[dict]:
    kinds = r["by_kind"]
    what = f"{r['requests']:,} requests, {r['clients']} clients"
    out = [
        fig(
            f"soak ({what}): valid requests answered 200",
            r["valid_latency_ms"]["n"] - r["valid_non_200"],
            "requests",
            baseline=kinds["valid"] + kinds["escalating"],
            baseline_name="valid requests sent",
            better="closer to 1x",
            headline=True,
        ),
        fig(f"soak ({what}): valid p50 latency", r["valid_latency_ms"]["p50"], "ms", better="lower"),
        fig(f"soak ({what}): valid p99 latency", r["valid_latency_ms"]["p99"], "ms", better="lower"),
        fig(
            f"soak ({what}): escalation log records",
            r["log_records"],
            "records",
            baseline=r["escalations_answered_by_teacher"],
            baseline_name="answers from the teacher",
            better="closer to 1x",
            headline=True,
        ),
        fig(
            f"soak ({what}): teacher spend",
            r["ledger_spent_usd"],
            "$",
            baseline=r["budget_usd"],
            baseline_name="serve.budget_usd",
            better="lower",
        ),
    ]
    if "rss_mib" in r:
        rss = r["rss_mib"]
        out.append(
            fig(
                f"soak ({what}): server RSS at the end",
                rss["end"],
                "MiB",
                baseline=rss["after_warmup"],
                baseline_name=f"after {rss['warmup_requests']:,} requests",
                better="lower",
                headline=True,
                note=f"stated bound: growth <= {rss['bound']:g} MiB",
            )
        )
    return out


def teacher_prompt(r: dict) -> list[dict]:
    arms = r["arms"]
    base = next((a for a in arms if a["wording"] == "list" and a["examples_per_label"] == 0), None)
    out = []
    for a in arms:
        is_base = a is base
        out.append(
            fig(
                f"teacher prompt '{a['wording']}', {a['examples_per_label']} examples/label: gold accuracy "
                f"({r['prompts']} prompts)",
                a["gold_accuracy"],
                "fraction",
                baseline=None if is_base or base is None else base["gold_accuracy"],
                baseline_name="'list', 0 examples/label",
                headline=a == r.get("best"),
                note=f"95% CI [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}], {a['prefix_tokens']}-token prefix",
            )
        )
    return out


def loop_demo(r: dict) -> list[dict]:
    t = r["timings_s"]
    out = [fig("loop demo round 0 (all five stages): wall s", t["round0_s"], "s", better="lower", headline=True)]
    stages = t.get("round0_stages_s", {})
    order = ["capture", "curate", "finetune", "evaluate", "export"]
    for stage in sorted(stages, key=lambda k: order.index(k) if k in order else len(order)):
        seconds = stages[stage]
        out.append(fig(f"loop demo round 0, {stage}: wall s", seconds, "s", better="lower", headline=True))
    out.append(
        fig(
            f"loop demo: serve + replay {r['requests']['sent']} requests: wall s",
            t["serve_and_replay_s"],
            "s",
            better="lower",
            headline=True,
        )
    )
    out.append(fig("loop demo: retrain (round 1): wall s", t["retrain_s"], "s", better="lower", headline=True))
    rounds = {row["round"]: row for row in r["rounds"]}
    zero = rounds.get(0)
    for n, row in sorted(rounds.items()):

        def vs0(key: str, n: int = n) -> float | None:
            return zero[key] if zero is not None and n != 0 else None

        out.append(
            fig(
                f"loop round {n}: student agrees with teacher (frozen test)",
                row["test_agreement"],
                "fraction",
                baseline=vs0("test_agreement"),
                baseline_name="round 0",
            )
        )
        out.append(
            fig(
                f"loop round {n}: local share at the quality target",
                row["local_share"],
                "fraction",
                baseline=vs0("local_share"),
                baseline_name="round 0",
            )
        )
        out.append(
            fig(
                f"loop round {n}: routed $ per 1,000 requests",
                row["routed_usd_per_1k"],
                "$",
                better="lower",
                baseline=vs0("routed_usd_per_1k"),
                baseline_name="round 0",
            )
        )
    return out


def loop_strategies(r: dict) -> list[dict]:
    """`bench/loop_strategies.py`: one round's retraining strategies, each against the loop's own
    setting (`warm`) where it ran; CIs and the paired change against the champion in the notes."""
    rows = {row["variant"]: row for row in r["variants"]}
    out = []
    for name, row in rows.items():
        warm = rows.get("warm") if name != "warm" else None
        for what, key, note in _strategy_rates(row):
            out.append(
                fig(
                    f"strategy {name}: {what}",
                    _strategy_value(row, key),
                    "fraction",
                    baseline=_strategy_value(warm, key) if warm is not None else None,
                    baseline_name="warm (the loop's setting)",
                    headline=key == "validation_agreement",
                    note=note,
                )
            )
        out.append(fig(f"strategy {name}: training time", row["train_wall_s"], "s", better="lower"))
    return out


def _strategy_value(row: dict, key: str) -> float:
    value = row["held_back_vs_champion"]["candidate"] if key == "held_back" else row[key]
    return value["value"] if isinstance(value, dict) else value


def _strategy_rates(row: dict) -> list[tuple[str, str, str]]:
    def ci(f: dict) -> str:
        return f"95% CI [{100 * f['lo']:.1f}, {100 * f['hi']:.1f}]"

    def vs(d: dict) -> str:
        return f"vs champion {100 * d['value']:+.1f} pp [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}], n={d['n']}"

    return [
        (
            "agreement on the frozen validation split (picks the winner)",
            "validation_agreement",
            f"{row['train_examples']} training rows",
        ),
        (
            "accuracy vs gold (frozen test)",
            "test_accuracy",
            f"{ci(row['test_accuracy'])}; {vs(row['test_vs_champion']['delta'])} (agreement)",
        ),
        ("agreement on held-back escalations", "held_back", vs(row["held_back_vs_champion"]["delta"])),
        ("local share at the quality target (frozen test)", "local_share", ci(row["local_share"])),
    ]


def loop_sim(r: dict) -> list[dict]:
    """`make loop-sim`: per round, the candidate on the frozen test split (CIs in the note), what the
    champion served locally, the routed cost priced as the named API, training time; round 0 the baseline."""
    rows = {row["round"]: row for row in r["rounds"]}
    zero = rows.get(0)
    out = []

    def rate(n: int, what: str, f: dict | None, key: str, better: str = "higher") -> None:
        if f is None:
            return
        base = (zero.get(key) or {}).get("value") if zero is not None and n != 0 else None
        out.append(
            fig(
                f"loop-sim round {n}: {what}",
                f["value"],
                "fraction",
                better=better,
                baseline=base,
                baseline_name="round 0",
                headline=True,
                note=f"95% CI [{100 * f['lo']:.1f}, {100 * f['hi']:.1f}], n={f['n']}",
            )
        )

    for n, row in sorted(rows.items()):
        rate(n, "student agrees with teacher (frozen test)", row["test_agreement"], "test_agreement")
        rate(n, "student accuracy vs gold (frozen test)", row["test_accuracy"], "test_accuracy")
        rate(n, "local share at the quality target (frozen test)", row["local_share"], "local_share")
        if row["served"]:
            out.append(
                fig(
                    f"loop-sim round {n}: share the champion answered locally while serving",
                    row["served"]["local_share"]["value"],
                    "fraction",
                    note=f"{row['served']['sent']} unseen queries",
                )
            )
        cost = row["routed_usd_per_1k_priced"]
        if cost:
            out.append(
                fig(
                    f"loop-sim round {n}: routed $ per 1,000 requests, priced as {cost['spec']}",
                    cost["value"],
                    "$",
                    better="lower",
                    baseline=cost["teacher_only"],
                    baseline_name=f"teacher only, priced as {cost['spec']}",
                    headline=True,
                )
            )
        if row["train_s"] is not None:
            out.append(fig(f"loop-sim round {n}: training time", row["train_s"], "s", better="lower"))
    return out


def gpu(r: dict) -> list[dict]:
    train, est, measured = r.get("train", {}), r.get("estimate_gib", {}), r.get("measured_gib") or {}
    where = f"{r.get('gpu') or 'no GPU'}, seq {train.get('max_seq_len')}, batch {train.get('batch_size')}"
    out = []
    if r.get("tokens_per_s") is not None:
        out.append(fig(f"QLoRA mistral7b shape: tokens/s ({where})", r["tokens_per_s"], "tok/s", headline=True))
    if measured.get("peak_allocated") is not None:
        out.append(
            fig(
                f"QLoRA mistral7b shape: peak VRAM allocated ({where})",
                measured["peak_allocated"],
                "GiB",
                better="lower",
                headline=True,
            )
        )
        out.append(
            fig(
                "VRAM planner estimate (less the CUDA context) vs the measured peak",
                est["comparable_to_allocated"],
                "GiB",
                better="closer to 1x",
                baseline=measured["peak_allocated"],
                baseline_name="measured peak",
                headline=True,
                note=f"accepted band {r.get('band')}",
            )
        )
    if measured.get("weights_after_load") is not None and est.get("weights") is not None:
        out.append(
            fig(
                "NF4 base weights after load: planner vs measured",
                est["weights"],
                "GiB",
                better="closer to 1x",
                baseline=measured["weights_after_load"],
                baseline_name="measured",
            )
        )
    return out + gpu_defect_sections(r)


def gpu_defect_sections(r: dict) -> list[dict]:
    """Issue 17's defects 4-6, each a section tests/gpu/test_gpu.py adds to the same record."""
    out = []
    packed = r.get("padding_free_vs_padded") or {}
    if (packed.get("padding_free") or {}).get("tokens_per_s") and (packed.get("padded") or {}).get("tokens_per_s"):
        out.append(
            fig(
                f"padding-free ({packed['padding_free']['attention']}) vs padded batches: tokens/s",
                packed["padding_free"]["tokens_per_s"],
                "tok/s",
                baseline=packed["padded"]["tokens_per_s"],
                baseline_name="padded, sdpa",
            )
        )
    merge = (r.get("export_bf16") or {}).get("correct_merge")
    if merge:
        out.append(
            fig(
                "export check in bf16 on the GPU: max |delta log-softmax|, merged vs base + adapter",
                merge["max_logprob_delta"],
                "nats",
                better="lower",
                baseline=merge["logprob_tolerance"],
                baseline_name="tolerance",
            )
        )
    export = r.get("export_a10g") or {}
    if export.get("peak_allocated_gib") is not None:
        out.append(
            fig(
                f"export check of a random-weight 7B in bf16 under a {export['cap_gib']:g} GiB cap: peak allocated",
                export["peak_allocated_gib"],
                "GiB",
                better="lower",
                baseline=export["one_copy_gib"],
                baseline_name="one bf16 copy of the weights",
                note=f"check {export['check'][:60]}",
            )
        )
    nf4 = r.get("nf4_vs_bf16")
    if nf4:
        out.append(
            fig(
                "NF4-trained adapter: greedy agreement, NF4 base vs bf16 base",
                nf4["greedy_agreement"],
                "fraction",
                note=f"{nf4['prompts']} prompts, {nf4['max_new_tokens']} tokens each",
            )
        )
    return out


def serving(r: dict) -> list[dict]:
    arms, merged = r["arms"], "merged (transformers)"
    base = arms[merged]["tokens_per_s_batch1"]
    out = []
    for arm, run in arms.items():
        out.append(
            fig(
                f"serving {arm}: first-token latency, batch 1 (p50)",
                run["first_token_ms_p50"],
                "ms",
                better="lower",
                headline=True,
            )
        )
        out.append(
            fig(
                f"serving {arm}: generation tokens/s, batch 1",
                run["tokens_per_s_batch1"],
                "tok/s",
                baseline=None if arm == merged else base,
                baseline_name=f"{merged}, batch 1",
                headline=True,
            )
        )
        batched = [k for k in run if k.startswith("tokens_per_s_batch") and k != "tokens_per_s_batch1"]
        for key in batched:
            out.append(
                fig(
                    f"serving {arm}: generation tokens/s, batch {run['batch']}",
                    run[key],
                    "tok/s",
                    baseline=run["tokens_per_s_batch1"],
                    baseline_name="batch 1",
                    headline=True,
                )
            )
    return out


def _usd(v: float) -> str:
    return f"${v:.3g}"


def cost(r: dict) -> list[dict]:
    """$ per 1,000 requests from an evaluate report, each figure's note giving the prices it rests on."""
    p, usd, share = r["prices"], r["usd_per_1k"], r["local_share"]
    hourly = p["student_usd_per_hour"]
    per_hour = f"${hourly:,.2f}/h" if hourly >= 0.01 else f"{_usd(hourly)}/h"
    if p["teacher_basis"] == "ledger":
        teacher_short = f"teacher {_usd(p['teacher_usd_per_request'])}/request (captured meta.cost_usd)"
        teacher = (
            f"teacher {_usd(p['teacher_usd_per_request'])}/request = the mean captured meta.cost_usd "
            f"(the ledger's tokens x price)"
        )
    else:
        seconds = p.get("teacher_s_per_request")
        took = f"{seconds:.3g} s" if seconds is not None else "latency"
        teacher_short = f"teacher {_usd(p['teacher_usd_per_request'])}/request ({took} x {per_hour})"
        teacher = (
            f"teacher {_usd(p['teacher_usd_per_request'])}/request = the local teacher's measured "
            f"{took} per request x {per_hour} (eval.cost.student_usd_per_hour; nobody bills a local teacher)"
        )
    rps = p.get("student_requests_per_s")
    student = f"student {_usd(p['student_usd_per_request'])}/request = {per_hour} (eval.cost.student_usd_per_hour)" + (
        f" / {rps:.3g} requests/s measured by evaluate" if rps else ""
    )
    escalated = 1 - share["value"]
    where = r["source"].get("recipe") or r["source"]["report"]
    return [
        fig(
            f"cost, teacher only: $ per 1,000 requests ({where})",
            usd["teacher_only"],
            "$",
            better="lower",
            headline=True,
            note=teacher,
        ),
        fig(
            f"cost, routed: $ per 1,000 requests ({where})",
            usd["routed"],
            "$",
            better="lower",
            baseline=usd["teacher_only"],
            baseline_name="teacher only",
            headline=True,
            note=f"{student}, on every request; + {teacher_short} on the {escalated:.1%} escalated",
        ),
        fig(
            f"cost, student only: $ per 1,000 requests ({where})",
            usd["student_only"],
            "$",
            better="lower",
            baseline=usd["teacher_only"],
            baseline_name="teacher only",
            headline=True,
            note=student,
        ),
        fig(
            f"cost: local share at the chosen threshold ({share['split']} split)",
            share["value"],
            "fraction",
            headline=True,
            note=", ".join(
                x
                for x in (
                    f"95% CI [{share['lo']:.3f}, {share['hi']:.3f}], n={share['n']}"
                    if share.get("lo") is not None and share.get("hi") is not None
                    else None,
                    f"threshold {r['threshold']:.3g}" if r.get("threshold") is not None else None,
                    f"quality target {r['quality_target']:g} agreement with the teacher"
                    + (f" (routed: {r['system_agreement']:.1%})" if r.get("system_agreement") is not None else "")
                    if r.get("quality_target") is not None
                    else None,
                )
                if x
            )
            or None,
        ),
    ]


def structured(r: dict) -> list[dict]:
    arms = r["arms"]
    chosen = r["lowest_per_token_cost"]
    base = arms[chosen]
    free = arms["unconstrained"]
    # No schema-valid counts: at the bench's short max_new_tokens most answers are cut before the
    # record closes (docs/extraction.md); tests/llm/test_structured.py holds validity.
    out = []
    for name, arm in arms.items():
        if name == "unconstrained":
            continue
        other = name != chosen
        out.append(
            fig(
                f"structured decoding, {name}: mask + advance µs per token ({r['replayed_tokens']:,} tokens "
                "of gold records replayed)",
                arm["us_per_token"],
                "µs",
                better="lower",
                baseline=base["us_per_token"] if other else None,
                baseline_name=chosen,
                headline=True,
            )
        )
        out.append(
            fig(
                f"structured decoding, {name}: setup s (vocabulary index + schema compile)",
                arm["setup_s"],
                "s",
                better="lower",
                baseline=base["setup_s"] if other else None,
                baseline_name=chosen,
            )
        )
        out.append(
            fig(
                f"structured decoding, {name}: generate ms per token, SmolLM2-135M, batch {r['prompts']}",
                arm["generate_ms_per_token"],
                "ms",
                better="lower",
                baseline=free["generate_ms_per_token"],
                baseline_name="unconstrained",
            )
        )
    return out


def generic(r: dict, prefix: str = "") -> list[dict]:
    """A result no extractor knows (e.g. the GPU tier's): every numeric leaf, no baseline."""
    out = []
    for key, value in r.items():
        if key in ("envelope", "figures"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out.append(fig(name, value, ""))
        elif isinstance(value, dict):
            out += generic(value, f"{name}.")
    return out


def f16_reference(r: dict) -> list[dict]:
    gaps = r["f16_gap_nats"]
    where = f"{r['model']}, {r['prompts']} prompts x {r['max_new_tokens']} tokens"
    return [
        fig(
            f"F16 GGUF gap from bf16 merged-model references ({where})",
            gaps["bfloat16"]["max"],
            "nats",
            better="lower",
            baseline=gaps["float32"]["max"],
            baseline_name="from fp32 references",
        )
    ]


EXTRACTORS: dict[str, Callable[[dict], list[dict]]] = {
    "curate": curate,
    "finetune": finetune,
    "finetune_profile": finetune_profile,
    "capture": capture,
    "local_teacher": local_teacher,
    "router": router,
    "teacher_prompt": teacher_prompt,
    "loop_demo": loop_demo,
    "loop_sim": loop_sim,
    "loop_strategies": loop_strategies,
    "trie_bound": trie_bound,
    "gpu": gpu,
    "serving": serving,
    "cost": cost,
    "f16_reference": f16_reference,
    "router_soak": router_soak,
    "structured": structured,
    "label_scoring": label_scoring,
    "label_capture": label_capture,
    "label_serving": label_serving,
    "label_evaluate": label_evaluate,
}


def figures_for(name: str, result: dict) -> list[dict]:
    return EXTRACTORS.get(name, generic)(result)
