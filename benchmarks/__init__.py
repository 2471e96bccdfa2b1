"""Side-by-side benchmarks: higher vs higher_func (legacy, batched, compiled) vs hand-written
torch.func, on the same meta-learning programs.

Run ``python -m benchmarks`` (``--help`` for the options). Each workload builds one *path* per
way of writing the same meta-step, checks that all paths compute the same meta-gradient, then
times them in interleaved rounds (see ``benchmarks.timing``). ``benchmarks/README.md`` explains
the workloads and holds the measured table.
"""
