"""Rank selection: every method hits the budget; determinism; resume after an interruption."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from common.data.datasets import load_dataset
from common.decompose.ranks import energy_ranks
from common.decompose.surgery import LayerPlan, SpectraCache, list_conv_layers, plan_from_dict, plan_to_dict
from common.search.methods import model_optimum, nearest_choices
from common.search.options import (
    METHODS,
    SEARCHING,
    SearchConfig,
    check_budget_tol,
    check_method,
    check_metric,
    check_target,
)
from common.search.policy import cem_refit, choice_pdf, drop_curve, knapsack_choices
from common.search.proxy import ProxyEvaluator
from common.search.recorder import MemoryRecorder
from common.search.searcher import build_searcher
from common.search.space import SearchSpace, plan_key, project, repair_plan


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    chans = [3, 16, 32, 48, 64]
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.Conv2d(64, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


CFG = SearchConfig(sensitivity_levels=(0.5, 0.2), rounds=2)


def make(digits, recorder=None, config=CFG, **kw):
    return build_searcher(
        small_cnn(),
        digits,
        calib_images=64,
        val_images=120,
        batch_size=64,
        multiple=kw.pop("multiple", 8),
        recorder=recorder,
        config=config,
        **kw,
    )


@pytest.mark.parametrize("method,target", [(m, 3.0) for m in METHODS] + [("uniform", 2.0), ("vbmf", 2.0)])
def test_every_method_hits_the_budget(digits, method, target):
    s = make(digits)
    r = s.run(method, target, "macs", n_candidates=6, seed=1)
    assert abs(r.macs_factor / target - 1) <= 0.03, (method, target, r.macs_factor)
    assert r.score <= 0.0 and r.proxy == "logit_mse"  # minus a divergence to the dense model
    if method in SEARCHING:  # val top-1 decided among the best-scored candidates
        assert 0.0 <= r.val_top1 <= 1.0
    assert set(r.plan) == set(s.space.names)
    # The achieved factor is the model's real conv-MAC reduction.
    from common.decompose.cost import count_model
    from common.decompose.surgery import apply_plan

    dense = count_model(s.evaluator.model)
    comp = count_model(apply_plan(s.evaluator.model, r.plan, s.spectra))
    assert math.isclose(dense.conv_macs / comp.conv_macs, r.macs_factor, rel_tol=1e-9)


def test_params_budget(digits):
    s = make(digits)
    r = s.run("uniform", 2.5, "params")
    assert abs(r.params_factor / 2.5 - 1) <= 0.03


def test_same_seed_same_plans_and_numbers(digits):
    a = make(digits).run("policy", 3.0, n_candidates=6, seed=3)
    b = make(digits).run("policy", 3.0, n_candidates=6, seed=3)
    assert a.plan == b.plan and a.score == b.score and a.val_top1 == b.val_top1 and a.history == b.history
    c = make(digits).run("random", 3.0, n_candidates=6, seed=4)
    d = make(digits).run("random", 3.0, n_candidates=6, seed=5)
    assert c.history != d.history or c.plan != d.plan


class Boom(RuntimeError):
    pass


def test_resume_after_interruption_gives_same_result(digits):
    full = make(digits).run("policy", 3.0, n_candidates=8, seed=7)
    rec = MemoryRecorder()
    s = make(digits, recorder=rec)
    calls = {"n": 0}
    inner = s.evaluator.score

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 12:  # dies in the middle of the search (after the sensitivity profile)
            raise Boom()
        return inner(plan)

    s.evaluator.score = flaky
    with pytest.raises(Boom):
        s.run("policy", 3.0, n_candidates=8, seed=7)
    done = len([r for r in rec.items if r["kind"] in ("candidate", "sensitivity")])
    assert done == 11
    s2 = make(digits, recorder=rec)
    counted = {"n": 0}
    inner2 = s2.evaluator.score

    def counting(plan):
        counted["n"] += 1
        return inner2(plan)

    s2.evaluator.score = counting
    resumed = s2.run("policy", 3.0, n_candidates=8, seed=7)
    assert resumed.plan == full.plan and resumed.score == full.score and resumed.val_top1 == full.val_top1
    assert counted["n"] == (full.evaluations + 1 + len(s2.space.names) * 2) - 11  # only the rest is evaluated


def test_seeded_policy_scores_the_rule_plans_first_within_its_budget(digits):
    rec = MemoryRecorder()
    s = make(digits, recorder=rec)
    rules = {m: s.run(m, 3.0, seed=2).plan for m in ("uniform", "energy", "vbmf")}
    r = s.run("policy_seeded", 3.0, n_candidates=8, seed=2)
    cands = [c for c in rec.items if c["kind"] == "candidate" and c["method"] == "policy_seeded"]
    assert len(cands) == r.evaluations == 8  # the rule plans count in the budget
    distinct = list({plan_key(p): m for m, p in rules.items()}.values())
    assert [c.get("seeded_from") for c in cands[: len(distinct)]] == distinct
    assert all("seeded_from" not in c for c in cands[len(distinct) :])
    for c in cands[: len(distinct)]:
        assert c["plan"] == plan_to_dict(rules[c["seeded_from"]]) and c["round"] == 0
        # mapped onto the nearest choices, which the cross-entropy step counts like any draw
        assert c["choices_drawn"] == nearest_choices(s, rules[c["seeded_from"]])
    assert r.params["seeded_from"] == distinct
    # the pick is one of the 3 best-scored candidates, chosen on val as for the plain policy
    top = sorted(cands, key=lambda c: (-c["score"], c["index"]))[:3]
    assert plan_to_dict(r.plan) in [c["plan"] for c in top]
    again = make(digits).run("policy_seeded", 3.0, n_candidates=8, seed=2)
    assert again.plan == r.plan and again.history == r.history
    # a first round smaller than the rule plans (2 candidates over 2 rounds) takes the first of them
    tiny = make(digits).run("policy_seeded", 3.0, n_candidates=2, seed=2)
    assert tiny.params["seeded_from"] == distinct[:1] and tiny.evaluations == 2


def test_policy_with_knapsack_scores_its_model_optimum_first(digits):
    from common.search.policy import choice_costs, choice_drops

    rec = MemoryRecorder()
    s = make(digits, recorder=rec, config=replace(CFG, knapsack=True))
    plan, ks, drop, ok = model_optimum(s, 3.0, "macs")
    assert ok
    drops = choice_drops(s.space, s.choices, s.sensitivity(), s.dense_score())
    cost, budget = choice_costs(s.space, s.choices, 3.0, "macs")
    assert drop == pytest.approx(sum(drops[li, k] for li, k in enumerate(ks)))
    # no draw of the policy's pdf that fits the budget before projection has a smaller summed drop
    pdf, _ = s.policy_pdf(3.0, "macs")
    rng = np.random.default_rng(0)
    fitting = 0
    for _ in range(300):
        d = [int(rng.choice(len(s.choices), p=p)) for p in pdf]
        if sum(cost[li, k] for li, k in enumerate(d)) <= budget:
            fitting += 1
            assert sum(drops[li, k] for li, k in enumerate(d)) >= drop - 1e-12
    assert fitting > 10
    r = s.run("policy", 3.0, n_candidates=8, seed=2)
    cands = [c for c in rec.items if c["kind"] == "candidate" and c["method"] == "policy"]
    assert len(cands) == r.evaluations == 8  # the optimum counts in the budget
    assert cands[0]["seeded_from"] == "knapsack" and cands[0]["choices_drawn"] == ks
    assert cands[0]["plan"] == plan_to_dict(plan) and cands[0]["round"] == 0
    assert all("seeded_from" not in c for c in cands[1:])
    assert r.params["knapsack"] == {"model_drop": drop, "choices": ks, "used": True}
    # the rest of the first round are the plain policy's first draws with the same seed
    rec0 = MemoryRecorder()
    plain = make(digits, recorder=rec0).run("policy", 3.0, n_candidates=8, seed=2)
    assert "knapsack" not in plain.params
    first = [c["plan"] for c in rec0.items if c["kind"] == "candidate" and c["round"] == 0]
    rest = [c["plan"] for c in cands[1:] if c["round"] == 0]
    assert rest == [p for p in first if p != cands[0]["plan"]][: len(rest)] and len(rest) == len(first) - 1
    # seeded: after the rule plans, and only the rule plans are listed as seeded_from
    rs = make(digits, config=replace(CFG, knapsack=True)).run("policy_seeded", 3.0, n_candidates=8, seed=2)
    assert "knapsack" not in rs.params["seeded_from"] and rs.params["knapsack"]["used"] in (True, False)


def test_nearest_choices_maps_a_choice_plan_back_onto_itself(digits):
    s = make(digits)
    ks = [1, 4, len(s.choices) - 1, 0][: len(s.space.names)]
    plan = s.space.plan(
        {n: s.choices[k][0] for n, k in zip(s.space.names, ks)},
        {n: s.choices[k][1] for n, k in zip(s.space.names, ks)},
    )
    back = nearest_choices(s, plan)
    # the same cost per layer (choices that round to one rank triple share it: the earlier is kept)
    for ls, k, j in zip(s.space.layers, ks, back):
        assert ls.cost(ls.choice(*s.choices[j])) == ls.cost(ls.choice(*s.choices[k]))


def test_policy_pdf_prefers_insensitive_large_layers(digits):
    s = make(digits)
    pdf, info = s.policy_pdf(3.0, "macs")
    assert pdf.shape == (len(s.space.names), len(CFG.levels))
    assert (abs(pdf.sum(1) - 1) < 1e-9).all()
    # Expected cost under the pdf meets the budget (that is how μ is chosen).
    levels = CFG.levels
    exp_cost = s.space.fixed_macs
    for ls, p in zip(s.space.layers, pdf):
        exp_cost += sum(pk * ls.cost(ls.choice(f))[1] for pk, f in zip(p, levels))
    assert abs(s.space.dense_macs / exp_cost / 3.0 - 1) < 0.05


def test_policy_math_drop_curve_pdf_and_cem_step():
    # drops 0 / 0.2 / 0.5 at levels 1 / 0.5 / 0.2: interpolated between, extrapolated along the last segment
    np.testing.assert_allclose(
        drop_curve([(0.5, 0.8), (0.2, 0.5)], 1.0, [1.0, 0.75, 0.5, 0.2, 0.1]), [0.0, 0.1, 0.2, 0.5, 0.6]
    )
    # a score that recovers at a lower level does not make the drop fall (monotone as f falls)
    np.testing.assert_allclose(drop_curve([(0.5, 0.5), (0.2, 0.9)], 1.0, [0.5, 0.2, 0.1]), [0.5, 0.5, 0.5])
    drops = np.array([[0.0, 0.1, 0.4], [0.0, 0.01, 0.02]])
    cost = np.array([[0.5, 0.3, 0.1], [0.5, 0.3, 0.1]])
    pdf, info = choice_pdf(drops, cost, 0.6, 1.0)
    assert np.allclose(pdf.sum(1), 1) and abs(float((pdf * cost).sum()) - 0.6) < 1e-6
    assert pdf[1, 2] > pdf[0, 2]  # the insensitive layer takes the cheap choice more often
    assert info["drop_scale"] == pytest.approx(float(np.median([0.1, 0.4, 0.01, 0.02])))
    hist = [
        {"index": i, "score": sc, "choices_drawn": ks}
        for i, (sc, ks) in enumerate([(-3.0, [0, 0]), (-1.0, [2, 1]), (-2.0, [1, 1]), (-1.0, [2, 2])])
    ]
    np.testing.assert_allclose(
        cem_refit(np.full((2, 3), 1 / 3), hist, 0.25, 1.0), [[0, 0, 1], [0, 0.5, 0.5]]
    )  # the two best (ties: earlier first)
    np.testing.assert_allclose(cem_refit(np.full((2, 3), 1 / 3), hist, 0.25, 0.5).sum(1), 1)


def test_knapsack_choices_is_the_brute_force_optimum_under_the_budget():
    import itertools

    rng = np.random.default_rng(7)
    for trial in range(20):
        drops = rng.uniform(0, 1, (4, 3)) * np.array([0.0, 1.0, 2.0])  # choice 0 dense: no drop, dearest
        cost = rng.uniform(0.05, 0.3, (4, 3)) * np.array([1.0, 0.6, 0.3])
        budget = float(rng.uniform(cost.min(1).sum(), cost.max(1).sum()))
        ks = knapsack_choices(drops, cost, budget, grid=100_000)
        assert sum(cost[li, k] for li, k in enumerate(ks)) <= budget + 1e-9
        best = min(
            sum(drops[li, k] for li, k in enumerate(c))
            for c in itertools.product(range(3), repeat=4)
            if sum(cost[li, k] for li, k in enumerate(c)) <= budget
        )
        assert sum(drops[li, k] for li, k in enumerate(ks)) == pytest.approx(best, abs=1e-9), trial
    with pytest.raises(ValueError, match="fits the budget"):
        knapsack_choices(np.zeros((2, 2)), np.full((2, 2), 0.5), 0.5)


def test_projection_keeps_shape_and_hits_target():
    model = small_cnn()
    space = SearchSpace(list_conv_layers(model), "ht2", multiple=1)
    levels = dict(zip(space.names, [0.8, 0.4, 0.6, 0.3]))
    plan, achieved = project(space, levels, 3.0)
    assert abs(achieved / 3.0 - 1) <= 0.03 and achieved == space.factor(plan, "macs")
    # one common scale α of every level (no per-layer repair was needed at multiple 1)
    assert any(
        plan == space.plan({n: min(1.0, a * f) for n, f in levels.items()}) for a in np.geomspace(0.2, 5.0, 4000)
    )


def test_repair_moves_plan_into_tolerance():
    model = small_cnn()
    space = SearchSpace(list_conv_layers(model), "ht2", multiple=8)
    plan = {n: LayerPlan("dense") for n in space.names}
    fixed, steps = repair_plan(space, plan, 2.0, "macs", 0.03)
    assert steps > 0 and abs(space.factor(fixed, "macs") / 2.0 - 1) <= 0.03


def test_vbmf_names_its_rank0_layers_once_per_plan(digits):
    lines: list[str] = []
    s = make(digits, progress=lines.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = s.run("vbmf", 3.0)
        r2 = s.run("vbmf", 2.0)  # the EVBMF ranks are computed once; the report comes with each plan
    rank0, base = r.params["evbmf_rank0"], r.params["vbmf_ranks"]
    assert rank0 and r2.params["evbmf_rank0"] == rank0  # the small CNN has layers where EVBMF keeps nothing
    assert not [w for w in caught if "EVBMF" in str(w.message)]  # a progress line, not a warning block
    notes = [line for line in lines if "EVBMF" in line]
    assert len(notes) == 2 and notes[0].startswith(f"vbmf x3: EVBMF found rank 0 in {len(rank0)} layer(s)")
    assert notes[0].endswith(": " + ", ".join(rank0))
    position = {"the C-mode unfolding": 0, "the T-mode unfolding": 1, "the HT-2 core": 2, "the 1x1 kernel": 0}
    for name, matrices in rank0.items():  # rank 1 where EVBMF found rank 0
        assert matrices and all(base[name][position[m]] == 1 for m in matrices)


def test_build_searcher_passes_proxy_settings_and_checks_them_first(digits):
    s = make(digits)
    assert s.evaluator.channels_last and s.evaluator.proxy == "logit_mse"  # channels_last on by default here
    assert s.evaluator.calib_images == 64 and s.evaluator.val_images == 120
    assert not make(digits, channels_last=False, proxy="top1").evaluator.channels_last
    spectra = SpectraCache(small_cnn())
    with pytest.raises(ValueError, match="unknown proxy 'bogus'"):
        make(digits, proxy="bogus", spectra=spectra)
    assert spectra._cache == {}  # refused before any spectrum was computed
    with pytest.raises(TypeError):
        make(digits, calib_imgs=64)  # a misspelt setting is no silent default


def test_bad_method_and_target(digits):
    s = make(digits)
    with pytest.raises(ValueError, match="unknown rank-selection method 'greedy'"):
        s.run("greedy", 3.0)
    with pytest.raises(ValueError, match="target reduction must be a finite number > 1, got 0.5"):
        s.run("uniform", 0.5)
    with pytest.raises(ValueError, match="metric must be 'macs' or 'params', got 'flops'"):
        s.run("uniform", 3.0, "flops")
    with pytest.raises(ValueError, match="budget must be at least 1"):
        s.run("random", 3.0, n_candidates=0)


@pytest.mark.parametrize("value", [1.0, 0.5, -2, float("nan"), float("inf"), "x", None, True, [3.0]])
def test_check_target_names_the_bad_value(value):
    with pytest.raises(ValueError, match="got " + repr(value).replace("[", r"\[").replace("]", r"\]")):
        check_target(value)


def test_the_analysis_knows_every_method_and_policy():
    # common.analysis keeps its own lists (it does not import torch); they must not drift
    from common.analysis import METHOD_ORDER, POLICY_METHODS, POLICY_RIVALS
    from common.search.options import POLICIES

    assert POLICY_METHODS == POLICIES and set(METHOD_ORDER) == set(METHODS)
    assert set(POLICY_RIVALS) == set(METHODS) - set(POLICIES)


def test_the_analysis_draws_every_rank_shape():
    # the sensitivity plot's line styles are keyed by shape name, a list of its own (no torch import)
    from common.analysis.plot_search import SHAPE_STYLES
    from common.search.space import SHAPES

    assert tuple(SHAPE_STYLES) == SHAPES and len(set(SHAPE_STYLES.values())) == len(SHAPES)


def test_validators_pass_good_values_through():
    assert check_target(3) == 3.0 and isinstance(check_target(3), float) and check_target("2.5") == 2.5
    assert [check_method(m) for m in METHODS] == list(METHODS)
    assert check_metric("params") == "params"
    for bad in ("Policy", "", None):
        with pytest.raises(ValueError, match=f"unknown rank-selection method {bad!r}"):
            check_method(bad)


def test_searches_pick_once_among_their_candidates(digits):
    """A search returns its scored candidates; run() picks once: the best score with rerank=1 (ties:
    the earlier candidate), else the best val top-1 among the ``rerank`` best-scored ones."""
    one = make(digits, config=SearchConfig(sensitivity_levels=(0.5, 0.2), rounds=2, rerank=1))
    rec = MemoryRecorder()
    s1 = one.run("random", 3.0, n_candidates=6, seed=4)
    best = max(s1.history, key=lambda h: (h["score"], -h["index"]))
    assert s1.score == best["score"] and s1.val_top1 is None
    s = make(digits, recorder=rec)
    r = s.run("random", 3.0, n_candidates=6, seed=4)
    assert r.history == s1.history  # same draws and scores: only the pick differs
    reranked = [x for x in rec.items if x["kind"] == "rerank"]
    top3 = sorted(r.history, key=lambda h: (-h["score"], h["index"]))[:3]
    assert [x["index"] for x in reranked] == [h["index"] for h in top3]
    winner = max(zip(reranked, top3), key=lambda p: (p[0]["val_top1"], p[1]["score"], -p[1]["index"]))
    assert r.val_top1 == winner[0]["val_top1"] and r.score == winner[1]["score"]
    assert plan_to_dict(r.plan) == winner[0]["plan"]


def test_rescore_ranks_the_best_candidates_on_more_calibration_images_before_val(digits):
    """With rescore=k the k best-scored candidates are scored again by a second evaluator (same proxy,
    rescore_images calibration images), recorded, and val decides among the rerank best of those;
    re-running with the same recorder evaluates nothing new."""
    cfg = SearchConfig(sensitivity_levels=(0.5, 0.2), rounds=2, rescore=5, rescore_images=160)
    rec = MemoryRecorder()
    s = make(digits, recorder=rec, config=cfg)
    r = s.run("random", 3.0, n_candidates=8, seed=4)
    assert r.history == make(digits).run("random", 3.0, n_candidates=8, seed=4).history  # same search
    pool = sorted(r.history, key=lambda h: (-h["score"], h["index"]))[:5]
    again = [x for x in rec.items if x["kind"] == "rescore"]
    assert [x["index"] for x in again] == [h["index"] for h in pool]
    assert {x["calib_images"] for x in again} == {160} and s.rescorer.calib_images == 160
    cand = {x["index"]: x for x in rec.items if x["kind"] == "candidate"}
    oracle = ProxyEvaluator(
        s.evaluator.model, digits, s.spectra, calib_images=160, val_images=120, batch_size=64, channels_last=True
    )
    for x in again:
        assert x["plan"] == cand[x["index"]]["plan"]
        assert x["score"] == pytest.approx(oracle.score(plan_from_dict(x["plan"])), rel=1e-6)
    by_rescore = sorted(again, key=lambda x: (-x["score"], -cand[x["index"]]["score"], x["index"]))[:3]
    reranked = [x for x in rec.items if x["kind"] == "rerank"]
    assert [x["index"] for x in reranked] == [x["index"] for x in by_rescore]
    winner = max(zip(reranked, by_rescore), key=lambda p: (p[0]["val_top1"], p[1]["score"], -p[1]["index"]))
    assert r.val_top1 == winner[0]["val_top1"] and plan_to_dict(r.plan) == winner[0]["plan"]
    assert r.score == cand[winner[0]["index"]]["score"]  # the search's own score, not the re-score
    assert r.params["rescore"] == {
        "calib_images": 160,
        "indices": [x["index"] for x in again],
        "scores": [x["score"] for x in again],
        "picked": winner[1]["score"],
    }
    n = len(rec.items)
    resumed = make(digits, recorder=rec, config=cfg).run("random", 3.0, n_candidates=8, seed=4)
    assert len(rec.items) == n and resumed.plan == r.plan and resumed.params["rescore"] == r.params["rescore"]
    # rerank=1: the best re-score wins, no val spent
    one = MemoryRecorder()
    r1 = make(digits, recorder=one, config=replace(cfg, rerank=1)).run("random", 3.0, n_candidates=8, seed=4)
    best = max(again, key=lambda x: (x["score"], cand[x["index"]]["score"], -x["index"]))
    assert plan_to_dict(r1.plan) == best["plan"] and r1.val_top1 is None
    assert not [x for x in one.items if x["kind"] == "rerank"]


def test_rescore_settings_are_checked(digits):
    for bad in (1, 2):  # fewer than the 3 that val decides among
        with pytest.raises(ValueError, match=f"rescore must be 0 .* got {bad}"):
            SearchConfig(rescore=bad)
    with pytest.raises(ValueError, match="rescore_images must be at least 2"):
        SearchConfig(rescore=4, rescore_images=1)
    assert SearchConfig(rescore=2, rerank=1).rescore == 2
    with pytest.raises(ValueError, match="needs a label-free proxy"):
        make(digits, config=SearchConfig(rescore=4), proxy="top1")


def test_energy_shape_matches_level_cost_and_keeps_uniform(digits):
    level = make(digits)
    shaped = make(digits, config=SearchConfig(sensitivity_levels=(0.5, 0.2), rounds=2, shapes=("level", "energy")))
    for ls_l, ls_e in zip(level.space.layers, shaped.space.layers):
        for f in (0.75, 0.5, 0.3):
            r_l, r_e = ls_l.ranks(f), ls_e.ranks(f, "energy")
            m_l = ls_l.info.cost(ls_l.method, r_l)[1]
            m_e = ls_e.info.cost(ls_e.method, r_e)[1]
            # same layer cost up to rank rounding, and ranks from the spectra (an energy threshold)
            assert abs(m_e / m_l - 1) < 0.35, (ls_l.info.name, f, r_l, r_e)
            sp = shaped.spectra.get(ls_e.info.name)
            e_ranks = [energy_ranks(sp, ls_e.method, e, ls_e.multiple) for e in np.linspace(0.05, 0.9999, 400)]
            assert r_e in e_ranks
    # uniform does not search: identical plans whatever shapes the searches may use
    assert level.run("uniform", 2.0).plan == shaped.run("uniform", 2.0).plan
    # the policy's choices are (level, shape) pairs, the sensitivity profile covers both shapes
    assert {c[1] for c in shaped.choices} == {"level", "energy"}
    assert len(shaped.choices) == 2 * (len(CFG.levels) - 1) + 1  # dense once
    res = shaped.run("policy", 2.0, n_candidates=6, seed=0)
    assert abs(res.macs_factor / 2.0 - 1) <= 0.03
    assert set(shaped.sensitivity()[shaped.space.names[0]]) == {"level", "energy"}
    assert res.params["config"]["shapes"] == ("level", "energy")
    with pytest.raises(ValueError, match="shapes"):
        SearchConfig(shapes=("spectral",))


def test_tpe_is_deterministic_and_resumes(digits):
    a = make(digits).run("tpe", 3.0, n_candidates=6, seed=2)
    rec = MemoryRecorder()
    s = make(digits, recorder=rec)
    inner = s.evaluator.score
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Boom()
        return inner(plan)

    s.evaluator.score = flaky
    with pytest.raises(Boom):
        s.run("tpe", 3.0, n_candidates=6, seed=2)
    b = make(digits, recorder=rec).run("tpe", 3.0, n_candidates=6, seed=2)
    assert a.plan == b.plan and a.history == b.history and a.evaluations == 6


@pytest.mark.parametrize("method", METHODS)
def test_a_tighter_budget_band_holds_for_every_method(digits, method):
    tight = replace(CFG, tol=0.01)
    r = make(digits, config=tight, multiple=1).run(method, 3.0, "macs", n_candidates=6, seed=1)
    assert abs(r.macs_factor / 3.0 - 1) <= 0.01, (method, r.macs_factor)
    for bad in (0.0, -0.01, 0.5, float("nan"), True):
        with pytest.raises(ValueError, match="budget tolerance"):
            SearchConfig(tol=bad)
    with pytest.raises(ValueError, match=r"--band must be in \(0, 0.5\).*got 0.7"):
        check_budget_tol(0.7, "--band")
    assert check_budget_tol(0.005) == 0.005
