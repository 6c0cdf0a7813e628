"""Offline training: shared-subject pretraining, one-session fine-tuning and evaluation (accelerate)."""
