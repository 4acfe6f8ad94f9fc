"""Evaluation machinery used by `pipeline.stages.evaluate`: scoring answers against the
teacher and gold (metrics.py) and choosing the router's threshold (threshold.py). What a
threshold *means* is decided in one place, pipeline/router/policy.py, which the server uses too.
"""
