"""Causal verification of hypotheses by interchange interventions, with null controls.

    from circuitkit.verify.interchange import InterchangeVerifier
    from circuitkit.verify.report import verify_hypotheses
    report = verify_hypotheses(InterchangeVerifier(model), hypotheses)   # controls run beside
    report.nodes              # verified (site, features, answers)
    report.controls_verified  # must be empty

CLI: ``circuitkit verify``.
"""
