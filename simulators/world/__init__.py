"""The synthetic NSD world: stimuli, subjects and responses with a known ground truth."""
