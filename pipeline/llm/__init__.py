"""Language-model plumbing shared by every stage, the teachers and the router.

completion.py    the one Completion type: what any system (student, teacher, upstream) answered
loading.py       model refs (hub id | folder | embedded GGUF), device policy, loading
generate.py      batched greedy generation over chat conversations -> Completions
answer.py        answer_as_served: how the student answers wherever it answers
scoring.py       teacher-forced label log-likelihoods (the label posterior)
constrained.py   guided decoding to a closed label set
soft_labels.py   training targets from a teacher's label distribution
policy.py        the routing Policy (signal + threshold) and gates.py its hard gates
gguf_runtime.py  llama.cpp in process: GgufModel, probed before it is loaded
"""
