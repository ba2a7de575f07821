"""Datasets and Avalanche task streams (see README, Scenarios)."""
