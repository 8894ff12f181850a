"""Every kernel at the real model's shapes (tests/real_shapes.py), in fp16 and bf16.

On a GPU each kernel is held to the tolerance rule of tests/kernel_harness.py. On any machine the rule
itself is checked at the same shapes and inputs, with the references only: the right answer rounded once
passes, and an all-zeros output, a 1 % scale error and an answer missing one key (or one term) all fail.
"""
import pytest
import torch

from kernel_harness import FACTOR, assert_within, reference_pair, requires_kernels, tolerance_failures
from real_shapes import CASES

DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.gpu
@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_kernel_at_real_shape(case, dtype):
    inputs = case.make(dtype)
    exact, eager = reference_pair(inputs.reference, *inputs.args, **inputs.kwargs)
    assert_within(inputs.run(), exact, eager)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_rule_rejects_wrong_answers_at_real_shape(case, dtype):
    inputs = case.make(dtype)
    with torch.no_grad():
        exact, eager = reference_pair(inputs.reference, *inputs.args, **inputs.kwargs)
        wrong = {"zeros": torch.zeros_like(eager), "a 1 % scale error": exact * 1.01,
                 "one key (or term) dropped": inputs.dropped(exact)}

    def failures(answer):  # the GPU's rule, also where the interpreter would loosen it for bf16
        return tolerance_failures(answer.to(dtype), exact, eager, factor=FACTOR)
    assert not failures(exact), "the right answer, rounded once, must pass"
    for name, answer in wrong.items():
        assert failures(answer), f"{name} passes the rule"
