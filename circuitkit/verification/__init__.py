"""Causal verification of hypotheses by interchange interventions on fair pairs, with null controls.

    from circuitkit.verification.interchange import InterchangeVerifier
    from circuitkit.verification.report import verify_hypotheses
    report = verify_hypotheses(InterchangeVerifier(model), hypotheses)   # controls run beside
    report.learned_nodes        # verified (site, features, answers), IIA included
    report.architectural_nodes  # verified on the random-init model too: true by construction
    report.controls_verified    # shuffled-feature and proxy controls that verified: must be empty

CLI: ``circuitkit verify``.
"""
