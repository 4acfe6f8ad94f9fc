"""Language-model plumbing shared by every stage, the teachers and the router.

  completion.py   the one Completion type: what any system (student, teacher, upstream) answered
  loading.py      model refs (hub id | folder | embedded GGUF), device policy, loading
  generate.py     batched greedy generation over chat conversations -> Completions
  constrained.py  guided decoding to a closed label set
"""
