"""Causal verification of hypotheses by interchange interventions, with null controls."""
