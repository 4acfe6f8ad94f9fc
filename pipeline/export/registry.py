"""Registering accepted artifacts in the MLflow model registry, with their lineage.

    mlflow ui --backend-store-uri sqlite:///mlflow.db    (Models tab)

One registered model per recipe (`export.model_name`, default the recipe name), one version
per accepted artifact, whose source is the artifact on disk (weights are not copied into the
artifact store a second time). Tags link a served model back to its data: the MLflow run, the
dataset's content hash, the recipe's, the router policy's, and the headline parity figures.
Rejected artifacts are never registered. Aliases and promotion are not decided here.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.export.parity import ArtifactParity


def lineage_tags(recipe_name: str, hashes: dict[str, str]) -> dict[str, str]:
    """Run-level lineage: recipe, dataset, adapter and policy hashes (of their manifests' outputs)."""
    return {"recipe": recipe_name, **{f"{k}_sha256": v for k, v in hashes.items()}}


def version_tags(row: ArtifactParity) -> dict[str, str]:
    tags = {"artifact": row.artifact, "runtime": row.runtime, "size_bytes": str(row.size_bytes)}
    if row.agreement:
        tags["agreement"] = f"{row.agreement['value']:.4f}"
        tags["agreement_ci"] = f"[{row.agreement['lo']:.4f}, {row.agreement['hi']:.4f}]"
    if row.delta_vs_merged is not None:
        tags["delta_vs_merged"] = f"{row.delta_vs_merged:+.4f}"
    if row.eos_stop_rate is not None:
        tags["eos_stop_rate"] = f"{row.eos_stop_rate:.4f}"
    if row.bits_per_weight:
        tags["bits_per_weight"] = f"{row.bits_per_weight:.2f}"
    return tags


def register_accepted(
    tracker, name: str, rows: list[ArtifactParity], final_dir: Path, lineage: dict[str, str]
) -> dict[str, str]:
    """artifact -> registered version, for every accepted row."""
    versions = {}
    for row in rows:
        if row.status != "accepted":
            continue
        versions[row.artifact] = tracker.register_model(
            name,
            str(final_dir / row.path),
            {**lineage, **version_tags(row)},
            f"{row.artifact} of recipe {lineage.get('recipe')}: passed export parity",
        )
    return versions
