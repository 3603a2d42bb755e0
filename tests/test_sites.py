"""Site notation: paper and TransformerLens spellings, both ways; errors name valid forms."""
from __future__ import annotations

import pytest

from circuitkit.errors import CircuitkitError
from circuitkit.sites import KINDS, Site, all_sites, check_site, paper_sites, parse_site


@pytest.mark.parametrize(
    "text, site, hook",
    [
        ("a1.0@:", Site("head", 1, 0, ":"), "blocks.1.attn.hook_result[0]@:"),
        ("x0.pre", Site("resid_pre", 0), "blocks.0.hook_resid_pre"),
        ("x1.mid@A1", Site("resid_mid", 1, None, "A1"), "blocks.1.hook_resid_mid@A1"),
        ("x1.post@-1", Site("resid_post", 1, None, -1), "blocks.1.hook_resid_post@-1"),
        ("m0@=", Site("mlp_out", 0, None, "="), "blocks.0.hook_mlp_out@="),
        ("emb@Q", Site("emb", None, None, "Q"), "hook_embed@Q"),
        ("pos", Site("pos"), "hook_pos_embed"),
        ("q1.2@END", Site("q", 1, 2, "END"), "blocks.1.attn.hook_q[2]@END"),
        ("pattern0.3@5", Site("pattern", 0, 3, 5), "blocks.0.attn.hook_pattern[3]@5"),
        ("attn1", Site("attn_out", 1), "blocks.1.hook_attn_out"),
    ],
)
def test_parse_both_ways(text, site, hook):
    assert parse_site(text) == site
    assert str(site) == text
    assert site.hook_str() == hook
    assert parse_site(hook) == site


def test_paper_long_names():
    assert parse_site("resid_pre0") == Site("resid_pre", 0)
    assert parse_site("mlp_out1@:") == Site("mlp_out", 1, None, ":")
    assert parse_site("resid_post1").node == "x1.post"


def test_round_trip_every_site():
    for s in all_sites(3, 4):
        for pos in (None, ":", 7):
            site = s.at(pos)
            assert parse_site(str(site)) == site
            assert parse_site(site.hook_str()) == site
    assert {s.kind for s in all_sites(1, 1)} == set(KINDS)


def test_paper_site_lists():
    assert [str(s) for s in paper_sites(2, 1)] == [
        "x0.pre", "a0.0", "x0.mid", "m0", "x0.post", "a1.0", "x1.mid", "m1", "x1.post"]
    assert len(paper_sites(2, 4, include_mlp=False)) == 13


@pytest.mark.parametrize("bad", ["", "b1.0", "a1", "x1.top", "blocks.0.hook_nothing", "a1.0@", "m0.0"])
def test_bad_sites(bad):
    with pytest.raises(CircuitkitError) as e:
        parse_site(bad)
    assert bad == "" or "valid" in str(e.value) or "position" in str(e.value) or "head" in str(e.value)


def test_site_not_in_model():
    with pytest.raises(CircuitkitError, match="layers 0..1"):
        check_site(parse_site("a2.0"), n_layers=2, n_heads=1)
    with pytest.raises(CircuitkitError, match="heads 0..0"):
        check_site(parse_site("a1.3"), n_layers=2, n_heads=1)
