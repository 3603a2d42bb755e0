"""Circuit assembly from verified nodes: graph (path-patching edges), evaluation, export, drawing.

    from circuitkit.circuit.graph import build_circuit
    from circuitkit.circuit.evaluate import evaluate_circuit, AblationEvaluator   # node faithfulness ...
    from circuitkit.circuit.grow import grow_circuit, faithfulness_curve          # growth, MIB CPR / CMD
    from circuitkit.circuit.edges_eval import edge_faithfulness, complete_edges   # edge faithfulness
    from circuitkit.circuit.export import export_all
    from circuitkit.circuit.discover import discover_circuit   # the whole chain in one call

CLI: ``circuitkit circuit``.
"""
