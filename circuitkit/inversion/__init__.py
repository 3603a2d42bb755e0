"""InversionView: decoders that sample the inputs whose activations lie within ε of a query.

Modules: ``decoder`` (model), ``data`` (fresh training pairs), ``train``, ``distributed`` (DDP),
``sample`` (KV-cached sampling), ``distance``, ``preimage`` (verify samples, invert a query),
``evaluate`` (hit rates), ``colour``, ``render``, ``checkpoint`` (save/load with the probed model's identity,
the pre-load checks), ``cli`` (argument parsing only).  Brute-force preimages for addition live in
``circuitkit.paper.addition_exact``.
"""
