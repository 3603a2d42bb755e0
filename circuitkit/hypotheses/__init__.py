"""Features of inputs and hypotheses about what activation sites encode.

    from circuitkit.hypotheses.preimage_sources import PoolPreimage, DecoderPreimage
    from circuitkit.hypotheses.scoring import generate_hypotheses
    rep = generate_hypotheses(model, [parse_site("a1.0@:")], queries, PoolPreimage(model))
    rep.accepted()  # ranked Hypothesis records with evidence

CLI: ``circuitkit hypothesize``.
"""
