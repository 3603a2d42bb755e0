"""End-to-end case studies: model -> decoder -> hypotheses -> verification -> circuit -> report."""
