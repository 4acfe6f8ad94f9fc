"""One module per stage, each with `run(recipe, inputs, out, tracker) -> Manifest`.

Stages never import each other; they meet only in artifact folders (see runner.py).
"""
