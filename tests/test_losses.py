"""Training losses against hand-computed values and the definitions they must equal: SoftCLIP, BiMixCo
(mixup labels, lambda = 1 is plain InfoNCE), the temperature schedule, low-level L1 and the prior's loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offline_training.losses import (ContrastiveSchedule, Mixup, low_level_loss, mixco_loss, sample_mixup,
                                     soft_clip_loss, unit_rows)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_unit_rows(n: int, k: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- SoftCLIP ------------------------------------------------------------------------------------------

def test_soft_clip_on_two_orthogonal_pairs_matches_the_hand_computed_value():
    # labels = softmax([1, 0]) = (e, 1) / (1 + e); logits row = (1, 0): loss = log(1 + e) - e / (1 + e)
    eye = torch.eye(2)
    expected = math.log(1 + math.e) - math.e / (1 + math.e)
    assert soft_clip_loss(eye, eye, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_soft_clip_with_perfect_alignment_equals_the_entropy_of_its_soft_labels_and_is_minimal():
    image = random_unit_rows(8, 32, seed=0)
    temperature = 0.1
    labels = (image @ image.T / temperature).softmax(-1)
    entropy = -(labels * labels.log()).sum(-1).mean()
    aligned = soft_clip_loss(image, image, temperature)
    assert aligned.item() == pytest.approx(entropy.item(), rel=1e-5)
    for seed in range(1, 6):  # cross-entropy >= entropy: any other brain embedding scores worse
        noisy = F.normalize(image + 0.3 * random_unit_rows(8, 32, seed), dim=-1)
        assert soft_clip_loss(noisy, image, temperature) > aligned


def test_soft_clip_sends_gradient_to_the_brain_side_only():
    brain = random_unit_rows(4, 16, seed=1).requires_grad_()
    image = random_unit_rows(4, 16, seed=2).requires_grad_()
    soft_clip_loss(brain, image, 0.01).backward()
    assert torch.isfinite(brain.grad).all() and brain.grad.abs().sum() > 0
    assert image.grad.abs().sum() > 0  # through the logits; the soft labels themselves are detached


# --- BiMixCo -------------------------------------------------------------------------------------------

def test_mixco_without_mixing_is_the_bidirectional_infonce_loss():
    brain, image = random_unit_rows(6, 20, seed=3), random_unit_rows(6, 20, seed=4)
    unmixed = Mixup(partner_b=torch.tensor([3, 2, 1, 0, 5, 4]), lam_b=torch.ones(6))  # lambda = 1
    logits = brain @ image.T / 0.05
    infonce = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert mixco_loss(brain, image, 0.05, unmixed).item() == pytest.approx(infonce.item(), rel=1e-6)


def test_mixco_on_a_two_row_batch_matches_the_hand_computed_value():
    # row 0 = 0.75 * own + 0.25 * row 1's voxels; row 1 unmixed. labels [[.75, .25], [0, 1]]
    mixup = Mixup(partner_b=torch.tensor([1, 0]), lam_b=torch.tensor([0.75, 1.0]))
    brain, image = torch.eye(2), torch.eye(2)  # logits = identity at temperature 1
    log_p_own, log_p_other = 1 - math.log(1 + math.e), -math.log(1 + math.e)
    brain_to_image = (-(0.75 * log_p_own + 0.25 * log_p_other) - log_p_own) / 2
    image_to_brain = (-0.75 * log_p_own - (0.25 * log_p_other + log_p_own)) / 2  # columns of the labels
    expected = (brain_to_image + image_to_brain) / 2
    assert mixco_loss(brain, image, 1.0, mixup).item() == pytest.approx(expected, rel=1e-6)


def test_mixup_labels_put_lambda_on_the_row_and_the_rest_on_its_partner():
    mixup = Mixup(partner_b=torch.tensor([2, 1, 0]), lam_b=torch.tensor([0.9, 0.3, 1.0]))
    expected = torch.tensor([[0.9, 0.0, 0.1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # row 1 is its own partner
    torch.testing.assert_close(mixup.labels(), expected)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    torch.testing.assert_close(mixup.mix(x), torch.tensor([[1.1, 0.2], [0.0, 1.0], [2.0, 2.0]]))


def test_sample_mixup_keeps_partners_inside_each_subject_block():
    mixup = sample_mixup([5, 3, 4], beta=0.15, prob=0.5, rng=np.random.default_rng(0))
    blocks = [(0, 5), (5, 8), (8, 12)]
    for start, stop in blocks:
        assert set(mixup.partner_b[start:stop].tolist()) == set(range(start, stop))  # a permutation of the block
        torch.testing.assert_close(mixup.rows(start, stop).labels().sum(-1), torch.ones(stop - start))
    with pytest.raises(ValueError, match="mixed with rows outside"):
        Mixup(torch.tensor([1, 0]), torch.ones(2)).rows(1, 2)


def test_sample_mixup_draws_lambda_from_a_u_shaped_beta_with_the_given_probability():
    lam = sample_mixup([4000], beta=0.15, prob=1.0, rng=np.random.default_rng(1)).lam_b.numpy()
    assert np.mean((lam < 0.1) | (lam > 0.9)) > 0.6  # Beta(0.15, 0.15) piles up at 0 and 1
    assert 0.47 < np.mean(lam < 0.5) < 0.53  # and is symmetric
    half = sample_mixup([4000], beta=0.15, prob=0.5, rng=np.random.default_rng(1)).lam_b.numpy()
    assert 0.22 < np.mean(half < 0.5) < 0.28  # half the rows mixed, half of those below 0.5
    assert torch.all(sample_mixup([10], 0.15, 0.0, np.random.default_rng(2)).lam_b == 1)


# --- schedule ------------------------------------------------------------------------------------------

def test_schedule_runs_bimixco_for_a_third_then_anneals_the_softclip_temperature_as_the_official_code():
    schedule = ContrastiveSchedule(epochs=150)
    assert schedule.mixup_epochs == 49  # int(0.33 * 150), the official split
    assert [schedule.uses_mixup(e) for e in (0, 48, 49, 149)] == [True, True, False, False]
    assert schedule.temperature(0) == schedule.temperature(48) == 0.006
    soft_epochs = 150 - 49  # official: cosine_anneal(0.004, 0.0075, soft_epochs)[epoch - 49]
    official = 0.0075 + (0.004 - 0.0075) / 2 * (1 + np.cos(np.pi * np.arange(soft_epochs) / (soft_epochs - 1)))
    ours = [schedule.temperature(e) for e in range(49, 150)]
    np.testing.assert_allclose(ours, official, rtol=1e-12)
    assert ours[0] == pytest.approx(0.004) and ours[-1] == pytest.approx(0.0075)
    assert np.all(np.diff(ours) > 0)


def test_schedule_edge_cases():
    assert ContrastiveSchedule(epochs=1).temperature(0) == pytest.approx(0.004)  # one SoftCLIP epoch: the start
    assert ContrastiveSchedule(epochs=4, mixup_fraction=1.0).uses_mixup(3)
    with pytest.raises(ValueError, match="mixup fraction"):
        ContrastiveSchedule(epochs=10, mixup_fraction=1.5)


# --- low-level and prior ----------------------------------------------------------------------------

def test_unit_rows_and_low_level_l1():
    rows = unit_rows(torch.randn(3, 4, 5, dtype=torch.float16))
    assert rows.shape == (3, 20) and rows.dtype == torch.float32
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(3))
    predicted, target = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    target[0] = -1.5
    assert low_level_loss(predicted, target).item() == pytest.approx((1.5 + 0.5) / 2)


