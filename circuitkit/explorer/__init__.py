"""The live InversionView explorer (``circuitkit serve``): type an input, click a token, choose a site, and
see the activation's ε-preimage beside the attention patterns and the case run's verdicts."""
