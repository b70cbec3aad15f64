"""Evaluation: HumanEval pass@k, HumanEval infilling, held-out metrics, and sandboxed execution.

Modules import lazily what they need, so `codegen2 --help` stays fast.
"""
