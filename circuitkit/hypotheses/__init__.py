"""Features of inputs and hypotheses about what activation sites encode."""
