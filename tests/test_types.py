"""The circuit's vocabulary (circuitkit/types.py): node spellings and their errors, edges as keys, circuits that
round-trip a committed circuit.json byte for byte, and the engines that now speak Edge."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from circuitkit.circuit.edges_eval import complete_edges, edge_faithfulness
from circuitkit.circuit.evaluate import AblationEvaluator
from circuitkit.circuit.export import from_json_dict, to_json_dict
from circuitkit.circuit.graph import edge_list
from circuitkit.errors import CircuitkitError
from circuitkit.patching.attribution import attribute
from circuitkit.sites import Site
from circuitkit.types import Circuit, Edge, Node
from tests.groundtruth_copy import CopyTask, copy_model

REPORT = Path(__file__).resolve().parents[1] / "reports" / "counting" / "circuit.json"


def test_nodes_have_one_spelling_whatever_they_are_built_from():
    head = Node.of("blocks.1.attn.hook_result[0]@:")
    assert head == Node.of("a1.0@:") == Node.of(Site("head", 1, 0, ":")) == Node("site", "a1.0@:")
    assert str(head) == "a1.0@:" and head.site == Site("head", 1, 0, ":") and not head.is_output
    assert Node.of(head) is head and Node.of("x0.pre@5").site == Site("resid_pre", 0, position=5)
    out = Node.of("out:A1")
    assert out == Node.output("A1") and out.is_output and out.answer == "A1" and out.site is None
    assert str(out) == "out:A1" and out.kind == "output"
    for name in ("a1.2.q", "a1.kv0.k", "m1.in", "logits"):
        assert Node.of(name) == Node("input", name) and Node.of(name).site is None and str(Node.of(name)) == name
    assert sorted([Node.of("out:A1"), Node.of("a0.0")]) == [Node.of("out:A1"), Node.of("a0.0")]  # kind, name


def test_bad_spellings_name_the_input_and_the_valid_forms():
    with pytest.raises(CircuitkitError, match=r"cannot read node 'a1\.zz' \(cannot parse site .*a\{L\}\.\{H\}.*"
                                              r"out:ANSWER and receiver inputs .*m\{L\}\.in"):
        Node.of("a1.zz")
    with pytest.raises(CircuitkitError, match="cannot read node 'a1.0@' .*has '@' but no position"):
        Node.of("a1.0@")  # the site's own reason is kept
    with pytest.raises(CircuitkitError, match=r"'blocks\.1\.attn\.hook_result\[0\]' is not in canonical .*'a1\.0'"):
        Node("site", "blocks.1.attn.hook_result[0]")
    with pytest.raises(CircuitkitError, match="unknown node kind 'wire'; valid: site, output, input"):
        Node("wire", "a0.0")
    with pytest.raises(CircuitkitError, match=r"receiver input 'a1\.0\.o' is not one of"):
        Node("input", "a1.0.o")
    with pytest.raises(CircuitkitError, match="answer name.*got ''"):
        Node.of("out:")
    with pytest.raises(CircuitkitError, match=r"not int \(3\)"):
        Node.of(3)  # type: ignore[arg-type]
    with pytest.raises(CircuitkitError, match="out:A1 -> a0.0: the sender is an output node"):
        Edge.of("out:A1", "a0.0")
    with pytest.raises(CircuitkitError, match=r"edge sender 'a0\.0' is a str, not a Node \(use Edge\.of\)"):
        Edge("a0.0", Node.of("m0"))  # type: ignore[arg-type]


def test_edges_are_equal_and_hashed_by_their_ends():
    e = Edge.of("a0.0@=", "out:copy")
    same = Edge(Node.of(Site("head", 0, 0, "=")), Node.output("copy"))
    assert e == same and hash(e) == hash(same) and len({e, same}) == 1 and {e: 1}[same] == 1
    assert e != Edge.of("a0.0@=", "out:A1") and e != ("a0.0@=", "out:copy")  # not a tuple
    assert Edge.of("x0.pre@2", "a0.0@=") != Edge.of("a0.0@=", "x0.pre@2")  # direction matters
    assert str(e) == "a0.0@= -> out:copy" and e.as_pair() == ("a0.0@=", "out:copy")
    assert Edge.of("blocks.0.attn.hook_result[0]@=", Node.output("copy")) == e


def test_a_committed_circuit_json_round_trips_byte_for_byte():
    raw = REPORT.read_text()
    d = json.loads(raw)
    c = Circuit.from_json(d)
    assert len(c.nodes) == len(d["nodes"]) and len(c.edges) == len(d["edges"]) and c.nodes[0] == Node.of(d["nodes"][0]["id"])
    assert all(isinstance(e, Edge) for e in c.edges) and any(e.receiver.is_output for e in c.edges)
    assert c.to_json() == {k: d[k] for k in ("graph", "nodes", "edges")}
    extra = {k: v for k, v in d.items() if k not in ("graph", "nodes", "edges")}
    assert json.dumps(to_json_dict(c, extra), indent=2, default=str) + "\n" == raw
    g = from_json_dict(d)  # through networkx, as export reads it
    assert json.dumps(to_json_dict(g, extra), indent=2, default=str) + "\n" == raw
    assert list(g.nodes) == [n["id"] for n in d["nodes"]] and g.nodes["a0.0@Q"] == c.node_attrs[Node.of("a0.0@Q")]
    back = Circuit.from_networkx(c.to_networkx())
    assert back == c and back.to_json() == c.to_json() and back.attrs == d["graph"]
    assert edge_list(g) == list(c.edges)


def test_circuits_are_sets_with_attributes_outside_the_hash():
    c = Circuit.from_json(json.loads(REPORT.read_text()))
    flipped = Circuit(tuple(reversed(c.nodes)), tuple(reversed(c.edges)))  # no attributes, other order
    assert flipped == c and hash(flipped) == hash(c)
    fewer = Circuit(c.nodes, c.edges[1:], c.attrs, c.node_attrs, {e: c.edge_attrs[e] for e in c.edges[1:]})
    assert fewer != c and fewer.to_json()["edges"] == c.to_json()["edges"][1:]
    with pytest.raises(CircuitkitError, match="ends at out:A9, not a node of the circuit"):
        Circuit((Node.of("a0.0@Q"),), (Edge.of("a0.0@Q", "out:A9"),))
    with pytest.raises(CircuitkitError, match=r"nodes listed twice in a circuit: a0\.0@Q"):
        Circuit((Node.of("a0.0@Q"), Node.of("a0.0@Q")), ())
    with pytest.raises(CircuitkitError, match="attributes given for m0, not in the circuit"):
        Circuit((Node.of("a0.0"),), (), node_attrs={Node.of("m0"): {}})


def test_circuit_json_errors_say_what_is_missing():
    with pytest.raises(CircuitkitError, match=r"needs 'nodes' and 'edges' lists.*\['graph', 'nodes'\]"):
        Circuit.from_json({"graph": {}, "nodes": []})
    with pytest.raises(CircuitkitError, match="edge 0 needs 'source' and 'target'"):
        Circuit.from_json({"nodes": [{"id": "a0.0"}], "edges": [{"source": "a0.0"}]})
    with pytest.raises(CircuitkitError, match="node 1 has no 'id'"):
        Circuit.from_json({"nodes": [{"id": "a0.0"}, {"kind": "site"}], "edges": []})
    # as networkx reads node-link data: an unlisted edge end becomes a bare node, a repeated node merges
    c = Circuit.from_json({"nodes": [{"id": "a0.0", "x": 1}, {"id": "a0.0", "y": 2}],
                           "edges": [{"source": "a0.0", "target": "out:A1", "effect": 0.5}]})
    assert c.nodes == (Node.of("a0.0"), Node.output("A1")) and c.node_attrs[Node.of("a0.0")] == {"x": 1, "y": 2}
    assert c.to_json()["nodes"][1] == {"id": "out:A1"} and c.edge_attrs[Edge.of("a0.0", "out:A1")] == {"effect": 0.5}


def test_attribution_keys_its_edges_by_edge(tiny_addition_model):
    pm = tiny_addition_model
    rng = random.Random(0)
    base = pm.task.generate(rng, 4)
    att = attribute(pm, base, [pm.task.contrast_random(t, rng) for t in base], metric="logit", target="A2")
    assert att.edges and all(isinstance(e, Edge) for e in att.edges)
    assert {e.sender.kind for e in att.edges} == {"site"} and {e.receiver.kind for e in att.edges} == {"input"}
    assert Edge.of("a0.1", "a1.2.k") in att.edges and Edge.of("emb", "logits") in att.edges
    assert Edge.of("a1.0", "a0.1.q") not in att.edges  # a later head feeds no earlier one
    rows = att.to_dict()["edges"]
    assert [(r["sender"], r["receiver"]) for r in rows] == [e.as_pair() for e in att.edges]
    assert all(isinstance(r["sender"], str) and isinstance(r["receiver"], str) for r in rows)


def test_edge_evaluation_takes_edges_or_the_old_pairs():
    torch.set_num_threads(1)
    pm = copy_model(CopyTask())
    ev = AblationEvaluator(pm, n=120, seed=0)
    sites = ["x0.post@=", "a0.0@="]
    edges = complete_edges(ev, sites)
    assert all(isinstance(e, Edge) for e in edges) and Edge.of("a0.0@=", "out:copy") in edges
    by_edge = edge_faithfulness(ev, sites, edges, ci=False)
    by_pair = edge_faithfulness(ev, sites, [e.as_pair() for e in edges], ci=False)
    mixed = edge_faithfulness(ev, sites, [edges[0], *(e.as_pair() for e in edges[1:])], ci=False)
    assert by_edge.to_dict() == by_pair.to_dict() == mixed.to_dict()
    assert by_edge.edges == [list(e.as_pair()) for e in edges]
    # a receiver input is not a circuit node: ignored with the reason, or an error when strict
    e = edge_faithfulness(ev, sites, [Edge.of("a0.0@=", "logits")], ci=False)
    assert e.ignored_edges[0][:2] == ["a0.0@=", "logits"] and "receiver input" in e.ignored_edges[0][2]
    with pytest.raises(CircuitkitError, match="logits is a receiver input"):
        edge_faithfulness(ev, sites, [Edge.of("a0.0@=", "logits")], ci=False, strict=True)
