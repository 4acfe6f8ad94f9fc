"""The loop: escalations become the next round's training data (pipeline/loop/retrain.py), a
candidate is compared with the champion on a frozen test split (compare.py) and promoted or
rolled back through the MLflow model registry's aliases (registry.py), which the router follows."""
