"""InversionView: decoders that sample the inputs whose activations lie within ε of a query.

Modules: ``decoder`` (model), ``data`` (fresh training pairs), ``train``, ``distributed`` (DDP),
``sample`` (KV-cached sampling), ``distance``, ``preimage`` (verify samples, invert a query),
``evaluate`` (hit rates), ``colour``, ``render``, ``exact`` (brute-force preimages for addition),
``checkpoint`` (save/load with the probed model's identity), ``cli``.
"""
