"""The InversionView paper's own protocols, kept apart from the generic engines: the counting
activation-patching table (section 4.1, ``counting_table``) and the exact ε-preimages of 3-digit addition
by enumerating every input (``addition_exact``).  The case studies and benchmarks use them to compare
circuitkit's results with the paper's."""
