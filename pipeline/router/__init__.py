"""OpenAI-compatible serving of the exported student (`make serve` / `distill serve RECIPE`)."""
