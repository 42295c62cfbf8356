"""Explaining a network with directions: EDDP (seed 001) and its evaluation helpers."""
