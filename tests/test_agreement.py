"""The cross-shape comparisons of tests/agreement.py pass rounding noise and fail real differences."""
import pytest
import torch

from agreement import assert_close_across_shapes, assert_greedy_agrees, assert_same_greedy


def test_close_across_shapes_is_rounding_at_the_result_scale():
    want = torch.randn(64, 32) * 100
    assert_close_across_shapes(want * (1 + 8 * torch.finfo(torch.float32).eps), want)
    with pytest.raises(AssertionError, match="max difference"):
        assert_close_across_shapes(want * (1 + 1e-4), want)
    with pytest.raises(AssertionError, match="max difference"):
        assert_close_across_shapes(torch.where(torch.arange(32) == 5, 0.0, want), want)  # one column lost


def _step(token, best, second):
    return {"token_id": token, "top": [(token, best), (token + 1, second)]}


def test_same_greedy_parts_only_at_a_near_tie():
    want = [[_step(1, -1.0, -1.5), _step(2, -1.0, -1.00001), _step(3, -1.0, -2.0)]]
    assert_same_greedy(want, want, 1e-4)
    tie_broken = [[want[0][0], _step(7, -1.0, -1.00001), _step(9, -0.5, -2.0)]]  # parts at the tie: fine
    assert_same_greedy(tie_broken, want, 1e-4)
    with pytest.raises(AssertionError, match="step 0: token 5 instead of 1"):
        assert_same_greedy([[_step(5, -1.0, -1.5)] + want[0][1:]], want, 1e-4)
    with pytest.raises(AssertionError, match="2 tokens, expected 3"):
        assert_same_greedy([want[0][:2]], want, 1e-4)


def test_greedy_agrees_only_within_atol_of_the_best():
    logits = [torch.tensor([[0.0, 1.0, 1.0 - 1e-6]]), torch.tensor([[3.0, 0.0, 1.0]])]
    want = torch.tensor([[1, 0]])
    assert_greedy_agrees(torch.tensor([[2, 0]]), want, logits, 1e-5)
    with pytest.raises(AssertionError, match="step 1"):
        assert_greedy_agrees(torch.tensor([[1, 2]]), want, logits, 1e-5)
