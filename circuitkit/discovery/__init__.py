"""Automatic circuit discovery beside circuitkit's labelled circuits: EAP, EAP-IG, exact edge patching and ACDC
on one edge graph, scored the MIB way (``edge_graph`` → ``masked`` → ``methods`` → ``compare`` / ``harness``)."""
