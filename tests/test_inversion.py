"""InversionView: distances, KV-cached sampling, verification, training, resume, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from circuitkit.errors import CircuitkitError
from circuitkit.inversion.checkpoint import load_decoder
from circuitkit.inversion.decoder import DecoderConfig, InversionDecoder
from circuitkit.inversion.distance import position_distances, sample_distances
from circuitkit.inversion.evaluate import evaluate_site
from circuitkit.inversion.preimage import invert_activation, invert_text, query_activation, verify
from circuitkit.inversion.sample import PAPER_GRID, SpecialIds, _gumbel, grid_queries, sample
from circuitkit.inversion.train import DecoderTrainConfig, build_for, train_decoder
from circuitkit.models.train import random_init_like
from circuitkit.sites import parse_site

TINY = dict(d_model=32, n_heads=2, cond_mid=64, n_cond_blocks=2, batch_size=64, warmup=5, eval_every=20,
            eval_queries=4, eval_per_cell=1, final_eval_queries=0, checkpoint_every=1000)


@torch.no_grad()
def sample_uncached(decoder: InversionDecoder, acts: Tensor, site_idx: Tensor, temps: Tensor,
                    special: SpecialIds, gen: torch.Generator, max_len: int | None = None) -> Tensor:
    """The reference sampler: a full forward pass for every new token, no cache (slow)."""
    b, dev, V = acts.shape[0], acts.device, decoder.cfg.vocab_size
    max_len = max_len or decoder.cfg.seq_len
    ids = torch.full((b, max_len), special.pad, dtype=torch.long, device=dev)
    ids[:, 0] = special.bos
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    for t in range(1, max_len):
        logits = decoder(ids[:, :t], acts, site_idx)
        nxt = (logits[:, -1] / temps.unsqueeze(1) + _gumbel((b, V), gen, dev)).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, special.pad), nxt)
        ids[:, t] = nxt
        done |= nxt == special.eos
        if bool(done.all()):
            break
    return ids


def test_distance_exact_values():
    q = torch.tensor([3.0, 4.0])  # |q| = 5
    acts = torch.tensor([[[3.0, 4.0], [3.0, 4.5], [0.0, 0.0]],
                         [[6.0, 8.0], [-3.0, -4.0], [3.0, 5.0]]])
    d = position_distances(acts, q, "l2")
    assert torch.allclose(d, torch.tensor([[0.0, 0.1, 1.0], [1.0, 2.0, 0.2]]))
    c = position_distances(acts[1:], q, "cosine")
    assert torch.allclose(c[0, :2], torch.tensor([0.0, 2.0]), atol=1e-6)
    special = torch.tensor([[True, False, False], [False, False, False]])
    dist, where = sample_distances(acts, q, special, "l2")
    assert torch.allclose(dist, torch.tensor([0.1, 0.2])) and where.tolist() == [1, 2]
    dist, _ = sample_distances(acts[:1], q, torch.ones(1, 3, dtype=torch.bool))
    assert math.isinf(float(dist[0]))
    with pytest.raises(CircuitkitError, match="valid: l2, cosine"):
        position_distances(acts, q, "manhattan")


@pytest.mark.parametrize("n_slots", [1, 3])
def test_kv_cached_sampling_equals_uncached(n_slots):
    torch.manual_seed(0)
    dec = InversionDecoder(DecoderConfig(vocab_size=15, seq_len=14, act_dim=8, n_sites=3, d_model=32, n_heads=4,
                                         cond_mid=32, n_cond_blocks=2, n_slots=n_slots)).eval()
    acts, temps = grid_queries(torch.randn(8), 6, PAPER_GRID, torch.Generator().manual_seed(1))
    sites = torch.tensor([1] * acts.shape[0])
    ids = torch.randint(0, 15, (4, 10))
    with torch.no_grad():  # teacher-forced logits agree between the cached and full paths
        full = dec(ids, acts[:4], sites[:4])
        cache = dec.start_cache(acts[:4], sites[:4])
        steps = []
        for t in range(10):
            lg, cache = dec.forward_cached(ids[:, t:t + 1], cache, t)
            steps.append(lg)
        assert torch.allclose(full, torch.cat(steps, 1), atol=1e-5)
        assert cache[0][0].shape[2] == n_slots + 10  # the activation slots, then one key per token
    sp = special_ids_like()
    a = sample(dec, acts, sites, temps, sp, torch.Generator().manual_seed(7), batch_size=64)
    b = sample_uncached(dec, acts, sites, temps, sp, torch.Generator().manual_seed(7))
    assert a.shape == (24, 14) and torch.equal(a, b)
    assert (a[:, 0] == sp.bos).all()


def special_ids_like():
    from circuitkit.inversion.sample import SpecialIds

    return SpecialIds(bos=10, eos=13, pad=14)


def test_verify_matches_brute_force(tiny_addition_model):
    pm = tiny_addition_model
    site = parse_site("a1.2")
    texts = ["B615+861=1476E", "B100+100=200E", "B999+999=1998E", "B615+862=1477E"]
    q = query_activation(pm, parse_site("a1.2@="), texts[0])
    ids = pm.task.encode(texts)
    d, where = verify(pm, site, ids, q)
    with torch.no_grad():
        _, cache = pm.runner.run(ids, cache=["blocks.1.attn.hook_result"])
    res = cache["blocks.1.attn.hook_result"][:, :, 2]
    for i, t in enumerate(texts):
        n = len(t)
        best = min(float((res[i, p] - q).norm() / q.norm()) for p in range(1, n - 1))  # skip B and E
        assert d[i].item() == pytest.approx(best, abs=1e-5)
    assert d[0].item() == pytest.approx(0.0, abs=1e-6) and where[0].item() == 8  # the query's own input


def test_exact_preimage_addition(tiny_addition_model):
    from circuitkit.paper.addition_exact import all_addition_inputs, exact_distances

    pm = tiny_addition_model
    ids, a, b = all_addition_inputs(pm.task)
    assert ids.shape == (810_000, 14)
    for i in (0, 12345, 809_999):
        assert pm.task.decode(ids[i]) == f"B{a[i]}+{b[i]}={a[i] + b[i]}E"
    sub = ids[::997]
    q = query_activation(pm, parse_site("x0.pre@F2"), "B615+861=1476E")
    d = exact_distances(pm, parse_site("x0.pre"), q, inputs=sub)
    # x0.pre = token + position embedding: exactly the inputs with a 1 at position 2 are at distance 0
    has = (sub[:, 2] == 1)
    assert torch.equal(d <= 1e-6, has)


@pytest.fixture(scope="module")
def trained_decoder(tiny_addition_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dec") / "d"
    cfg = DecoderTrainConfig(steps=120, lr=3e-3, **TINY)
    m = train_decoder(tiny_addition_model, out, cfg, sites=[parse_site("x0.pre"), parse_site("a1.0")],
                      progress=False)
    return out, m


def test_training_beats_untrained_baseline(trained_decoder, tiny_addition_model):
    out, m = trained_decoder
    td = load_decoder(out, probed=tiny_addition_model)
    assert [s.node for s in td.sites] == ["x0.pre", "a1.0"]
    assert m["history"] and m["history"][-1]["step"] == 120
    torch.manual_seed(0)
    untrained = build_for(tiny_addition_model, td.sites, DecoderTrainConfig(**{**TINY, "steps": 1}))
    kw = dict(n_queries=40, n_per_cell=1, seed=99)
    trained_hr = evaluate_site(td.decoder, td.probed, td.sites[0], 0, **kw)
    base_hr = evaluate_site(untrained, td.probed, td.sites[0], 0, **kw)
    assert trained_hr["hit_rate"] > base_hr["hit_rate"] + 0.15, (trained_hr, base_hr)


def test_invert_sorted_and_colours(trained_decoder, tiny_addition_model):
    from circuitkit.inversion.colour import token_colours
    from circuitkit.inversion.render import render_ansi, render_html

    td = load_decoder(trained_decoder[0], probed=tiny_addition_model)
    inv = invert_text(td, "x0.pre@F2", "B615+861=1476E", n_per_cell=8, seed=3)
    assert len(inv.texts) == 32
    assert (inv.distances[1:] >= inv.distances[:-1]).all()
    rows = inv.display(100)
    assert len({r["text"] for r in rows}) == len(rows)
    # the probed model decides: re-verifying gives the same distances
    d, _ = verify(td.probed, parse_site("x0.pre"), inv.ids, inv.query)
    assert torch.allclose(d, inv.distances)
    col = token_colours(td, parse_site("x0.pre"), inv.ids, inv.query)
    assert col.shape == inv.ids.shape and (col[:, 0] == 0).all() and col.abs().max() <= 1
    tok, pad = td.probed.task.tokenizer, td.probed.task.vocab.pad
    assert "ε = 0.1" in render_ansi(inv, rows, col, tok, pad)
    assert "<table>" in render_html(inv, rows, col, tok, pad)


def test_bad_inputs(trained_decoder, tiny_addition_model):
    out, _ = trained_decoder
    td = load_decoder(out, probed=tiny_addition_model)
    with pytest.raises(CircuitkitError, match="different probed model"):
        load_decoder(out, probed=random_init_like(tiny_addition_model))
    with pytest.raises(CircuitkitError, match="width 5 but the decoder expects 32"):
        invert_activation(td, "a1.0", torch.ones(5))
    with pytest.raises(CircuitkitError, match="not trained on site 'a0.1'.*x0.pre, a1.0"):
        invert_activation(td, "a0.1", torch.ones(32))
    with pytest.raises(CircuitkitError, match="NaN or infinite"):
        invert_activation(td, "a1.0", torch.full((32,), float("nan")))
    with pytest.raises(CircuitkitError, match="needs a position"):
        invert_text(td, "a1.0", "B615+861=1476E")
    with pytest.raises(CircuitkitError, match="does not exist"):
        load_decoder(out.parent / "nope")


def test_cli_invert_and_errors(trained_decoder, tiny_addition_model, tmp_path, capsys):
    import json

    from circuitkit.cli import main

    out, _ = trained_decoder
    html = tmp_path / "inv.html"
    rc = main(["invert", str(out), "--site", "a1.0@=", "--input", "B615+861=1476E", "--per-cell", "4",
               "--show", "5", "--json", "--html", str(html)])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_samples"] == 16 and len(data["samples"]) <= 5 and html.exists()
    assert main(["invert", str(out), "--site", "m0@=", "--input", "B615+861=1476E"]) == 2
    assert "not trained on site" in capsys.readouterr().err


def test_resume_after_interrupt(tiny_addition_model, tmp_path):
    out = tmp_path / "dec"
    cfg = DecoderTrainConfig(steps=6, **{**TINY, "eval_every": 2, "checkpoint_every": 2, "batch_size": 16})
    sites = [parse_site("x0.pre")]

    def boom(rec):
        if rec["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(CircuitkitError, match="resume"):
        train_decoder(tiny_addition_model, out, cfg, sites=sites, progress=False, on_eval=boom)
    assert (out.with_name("dec.partial") / "train_state.pt").exists() and not out.exists()
    m = train_decoder(tiny_addition_model, out, cfg, sites=sites, progress=False)
    assert [h["step"] for h in m["history"]] == [2, 4, 6] and m["steps"] == 6
    assert not out.with_name("dec.partial").exists() and (out / "decoder.pt").exists()


def test_pooled_estimates_draw_fresh_queries_survive_a_resume_and_average_the_window(tiny_addition_model, tmp_path):
    """With eval_window 2 every estimate draws other queries, the weights use the mean of the last two estimates,
    and an interrupted run resumes with its window (the same history as an uninterrupted run)."""
    from circuitkit.inversion.train import estimate_seed, pooled_hit_rates

    cfg = DecoderTrainConfig(steps=6, **{**TINY, "eval_every": 2, "checkpoint_every": 2, "batch_size": 16,
                                         "eval_window": 2, "eval_queries": 6})
    assert len({estimate_seed(k, cfg) for k in (2, 4, 6)}) == 3
    assert estimate_seed(2, cfg.replace(eval_window=1)) == estimate_seed(4, cfg.replace(eval_window=1))
    assert pooled_hit_rates([[0.5, 1.0], [1.0, 0.0], [0.0, 0.5]][-2:]) == [0.5, 0.25]
    sites = [parse_site("x0.pre"), parse_site("a1.0")]
    whole = train_decoder(tiny_addition_model, tmp_path / "a", cfg, sites=sites, progress=False)["history"]

    def boom(rec):
        if rec["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(CircuitkitError, match="resume"):
        train_decoder(tiny_addition_model, tmp_path / "b", cfg, sites=sites, progress=False, on_eval=boom)
    resumed = train_decoder(tiny_addition_model, tmp_path / "b", cfg, sites=sites, progress=False)["history"]
    def untimed(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in rec.items() if k != "train_minutes"} for rec in history]

    assert untimed(resumed) == untimed(whole)
    for prev, rec in zip(whole, whole[1:]):
        assert rec["pooled_hit_rate"] == {s: (prev["hit_rate"][s] + rec["hit_rate"][s]) / 2 for s in rec["hit_rate"]}
    with pytest.raises(CircuitkitError, match="eval_window"):
        cfg.replace(eval_window=0).validate()


def test_a_mixed_batch_reads_each_rows_own_site(tiny_addition_model):
    from circuitkit.inversion.data import PairSource, site_activations

    pm = tiny_addition_model
    sites = [parse_site(s) for s in ("x0.pre", "a0.1", "x1.mid", "a1.0")]
    pairs, idx = PairSource(pm, seed=3).mixed(sites, [0.1, 0.2, 0.3, 0.4], 200)
    assert idx.shape == (200,) and set(idx.tolist()) == {0, 1, 2, 3}
    for j, s in enumerate(sites):
        rows = (idx == j).nonzero().squeeze(1)
        want = site_activations(pm, s, pairs.ids[rows])[torch.arange(len(rows)), pairs.positions[rows]]
        assert torch.allclose(pairs.acts[rows], want, atol=1e-6), s
    assert not pm.task.special_positions(pairs.ids)[torch.arange(200), pairs.positions].any()


def test_mixed_sites_and_slots_train_a_decoder_that_beats_the_untrained_one(tiny_addition_model, tmp_path):
    pm = tiny_addition_model
    sites = [parse_site("x0.pre"), parse_site("a1.0")]
    cfg = DecoderTrainConfig(steps=120, lr=3e-3, **{**TINY, "n_slots": 2, "mixed_sites": True})
    train_decoder(pm, tmp_path / "d", cfg, sites=sites, progress=False)
    td = load_decoder(tmp_path / "d", probed=pm)
    assert td.decoder.cfg.n_slots == 2
    torch.manual_seed(0)
    untrained = build_for(pm, td.sites, DecoderTrainConfig(**{**TINY, "steps": 1, "n_slots": 2}))
    kw = dict(n_queries=40, n_per_cell=1, seed=99)
    trained_hr = evaluate_site(td.decoder, pm, td.sites[0], 0, **kw)["hit_rate"]
    assert trained_hr > evaluate_site(untrained, pm, td.sites[0], 0, **kw)["hit_rate"] + 0.15


def test_hit_rate_in_rounds_matches_drawing_every_sample(trained_decoder, tiny_addition_model):
    td = load_decoder(trained_decoder[0], probed=tiny_addition_model)
    args = (td.decoder, td.probed, td.sites[1], 1)
    kw = dict(n_queries=150, n_per_cell=6, seed=5)
    whole = evaluate_site(*args, **kw, round_per_cell=None)
    assert evaluate_site(*args, **kw, round_per_cell=6) == whole  # one round: the same draws
    rounds = evaluate_site(*args, **kw, round_per_cell=4)  # a round of 4, then a last round of 2
    assert whole["samples_per_query"] == rounds["samples_per_query"] == 24
    assert rounds["in_eps_samples_per_query"] == 16 and whole["in_eps_samples_per_query"] == 24
    first = evaluate_site(*args, n_queries=150, n_per_cell=4, seed=5, round_per_cell=None)
    assert rounds["in_eps_fraction"] == first["in_eps_fraction"]  # the first round, which every query has
    assert 0.05 < whole["hit_rate"] < 0.95  # not trivially 0 or 1, so the comparison can fail
    # independent draws of the same estimator: within 4 binomial standard errors of each other
    p = whole["hit_rate"]
    assert abs(rounds["hit_rate"] - p) <= 4 * math.sqrt(2 * p * (1 - p) / 150)
    with pytest.raises(CircuitkitError, match="round_per_cell"):
        evaluate_site(*args, **kw, round_per_cell=0)


def test_decoder_training_leaves_the_probed_model_without_gradients(tiny_addition_model, tmp_path):
    """The probed model is fixed: no batch may carry an autograd graph into it (a mixed batch once did, so every
    decoder step also back-propagated through the probed model)."""
    from circuitkit.inversion.data import PairSource

    pm = tiny_addition_model
    sites = [parse_site("x0.pre"), parse_site("a1.0")]
    pairs, _ = PairSource(pm, seed=5).mixed(sites, [0.5, 0.5], 32)
    assert not pairs.acts.requires_grad
    assert not PairSource(pm, seed=5).batch(sites[1], 32).acts.requires_grad
    for p in pm.hf_model.parameters():
        p.grad = None
    cfg = DecoderTrainConfig(steps=3, **{**TINY, "mixed_sites": True, "eval_every": 3})
    train_decoder(pm, tmp_path / "d", cfg, sites=sites, progress=False)
    assert all(p.grad is None for p in pm.hf_model.parameters())


@pytest.mark.slow
def test_compiled_training_steps_match_eager_ones(tiny_addition_model, tmp_path):
    """``compile`` changes how a step runs, not what it computes: same seed, same losses and weights."""
    pm = tiny_addition_model
    sites = [parse_site("x0.pre"), parse_site("a1.0")]
    runs = {}
    for compiled in (False, True):
        cfg = DecoderTrainConfig(steps=4, **{**TINY, "eval_every": 2, "compile": compiled})
        out = tmp_path / f"d{int(compiled)}"
        m = train_decoder(pm, out, cfg, sites=sites, progress=False)
        runs[compiled] = (m["final_loss"], load_decoder(out, probed=pm).decoder.state_dict())
    (loss_e, sd_e), (loss_c, sd_c) = runs[False], runs[True]
    assert loss_c == pytest.approx(loss_e, rel=1e-4)
    assert max(float((sd_e[k] - sd_c[k]).abs().max()) for k in sd_e) < 1e-4


def test_length_groups_give_the_whole_batch_gradients(tiny_counting_model, tiny_addition_model):
    """Counting's inputs vary in length: run a length group at a time, each trimmed to its longest row, the decoder
    gets the gradients of the whole padded batch. Addition's do not: its batch stays whole."""
    from circuitkit.inversion.data import PairSource
    from circuitkit.inversion.train import backward_by_length, decoder_loss, decoder_sites, length_groups

    pm = tiny_counting_model
    pad = pm.task.vocab.pad_id
    sites = decoder_sites(pm)
    dec = build_for(pm, sites, DecoderTrainConfig(**TINY))
    pairs, idx = PairSource(pm, seed=7).mixed(sites, [1.0] * len(sites), 64)
    groups = length_groups(pairs.ids, pad, 2)
    lengths = (pairs.ids != pad).sum(1)
    assert len(groups) == 2 and lengths[groups[0]].max() < lengths.max()  # the first group is trimmed
    assert sorted(torch.cat(groups).tolist()) == list(range(64))
    dec.zero_grad()
    whole = decoder_loss(dec(pairs.ids, pairs.acts, idx), pairs.ids, pad)
    whole.backward()
    want = {n: p.grad.clone() for n, p in dec.named_parameters()}
    for n_groups in (2, 4):
        dec.zero_grad()
        loss = backward_by_length(dec, pairs.ids, pairs.acts, idx, pad, n_groups, False)
        assert loss == pytest.approx(whole.item(), rel=1e-6)
        for n, p in dec.named_parameters():
            assert torch.allclose(p.grad, want[n], atol=1e-6, rtol=1e-5), (n_groups, n)
    add = tiny_addition_model
    ids = PairSource(add, seed=7).inputs(64)
    assert [g.tolist() for g in length_groups(ids, add.task.vocab.pad_id, 2)] == [list(range(64))]
