"""optcc.Budget: the approximate passes' settings chosen layer by layer within a metric drop.

The searches here count FLOPs (``objective="flops"``), so what they choose is a fixed
function of the model and data, never of the machine's load; the latency objective runs
the same search with timed speed-ups (examples/budget_search.py, docs/benchmarks.md).
"""

from __future__ import annotations

import math
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import optcc
from optcc import budget as bd
from optcc.ir import capture

# one int8 setting per linear (no outlier threshold) keeps the searches small
PASSES = ["token_pruning", ("int8_decomposition", {"threshold": 0.0})]


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 64, 64, generator=generator),) for _ in range(4)]
    return model, batches


def budget(batches, **kw):
    kw = {"metric": "cosine", "max_drop": 0.01, "data": batches[:2], "heldout": batches[2:], "objective": "flops",
          "cache": False, "progress": False, **kw}
    return optcc.Budget(**kw)


def cosine_drop(model, compiled, batches) -> float:
    with torch.no_grad():
        cos = [F.cosine_similarity(model(*b).flatten(1), compiled(*b).flatten(1), dim=1) for b in batches]
    return 1.0 - torch.cat(cos).mean().item()


def test_knobs_describe_each_layer_and_configure_applies_exactly_them(vit):
    model, batches = vit
    gm = capture(model, batches[0])
    pruning = optcc.get_pass("token_pruning")()
    knobs = pruning.knobs(gm)
    assert [k.layer for k in knobs] == ["block 0", "block 1", "block 2"]
    # 16 patch tokens + the class token: r in 1/24, 1/12, 1/6 of the 16 free tokens
    assert knobs[0].settings == (1, 3)
    assert knobs[0].saved(3) > knobs[2].saved(3) > 0  # an early block's r removes the most
    (configured,) = pruning.configure({"block 1": 3})
    assert configured.options.r == [0, 3]

    int8 = optcc.get_pass("int8_decomposition")()
    linears = int8.knobs(gm)
    assert len(linears) == 3 * 4 + 1  # qkv, proj, fc1, fc2 per block, and the head
    assert all(k.settings == (6.0, 0.0) and k.flops_saved == (0.0, 0.0) and k.work > 0 for k in linears)
    chosen = {linears[0].layer: 6.0, linears[5].layer: 0.0, linears[6].layer: 0.0}
    passes = int8.configure(chosen)
    assert [p.options.threshold for p in passes] == [6.0, 0.0]
    compiled = optcc.compile(model, passes, example_inputs=batches[0], target="eager")
    assert sum(r.matches for r in compiled.report.records) == 3

    linear = optcc.get_pass("attention_to_linear")()
    attention = linear.knobs(gm)
    assert [k.layer for k in attention] == ["attention 0", "attention 1", "attention 2"]
    (configured,) = linear.configure({"attention 2": "elu1"})
    assert configured.options.layers == [2]


def test_search_stays_within_budget_and_beats_every_single_pass_setting(vit, tmp_path):
    model, batches = vit
    b = budget(batches, max_drop=0.01, out=tmp_path, cache=tmp_path / "cache")
    compiled = optcc.compile(model, PASSES, example_inputs=batches[0], target="eager", budget=b)
    result = compiled.report.budget
    assert result.evaluations > 10 and list((tmp_path / "cache").glob("*.json"))
    assert result.met and result.chosen.kind in ("search", "single-pass")
    # the recorded drop is what the compiled module does, measured here independently
    assert result.chosen.drop <= 0.01
    assert cosine_drop(model, compiled, batches[:2]) == pytest.approx(result.chosen.drop, abs=1e-6)
    assert result.chosen.heldout_drop == pytest.approx(cosine_drop(model, compiled, batches[2:]), abs=1e-6)
    singles = [p for p in result.points if p.kind == "single-pass" and p.within(0.01)]
    assert singles and all(result.chosen.speedup >= p.speedup for p in singles)
    assert result.chosen.speedup > 1.0  # FLOPs: only token pruning removes any
    assert {name for name, _, _ in result.choices} == {"token_pruning"} or result.chosen.kind == "search"
    text = str(compiled.report)
    assert "budget: cosine drop <= 0.01" in text and "chosen:" in text
    assert (tmp_path / "budget.md").read_text().count("|") > 20
    assert (tmp_path / "budget.svg").read_text().lstrip().startswith("<?xml")

    # a rerun with a looser budget measures only the combinations it has not seen
    looser = optcc.compile(model, PASSES, example_inputs=batches[0], target="eager",
                           budget=budget(batches, max_drop=0.03, cache=tmp_path / "cache")).report.budget
    assert looser.cached > 3 * looser.evaluations
    assert looser.chosen.speedup >= result.chosen.speedup


def test_a_budget_that_cannot_be_met_returns_the_exact_pipeline(vit):
    model, batches = vit
    # (token_pruning could meet it: merging after the last block's attention leaves the
    # class token, the only one the head reads, exactly as it was)
    compiled = optcc.compile(model, ["int8_decomposition"], example_inputs=batches[0], target="eager",
                             budget=budget(batches, max_drop=0.0))
    result = compiled.report.budget
    assert result.status == "unmet" and result.chosen.kind == "exact" and not result.choices
    assert all(p.exact for p in compiled.pipeline.passes)
    assert "no setting keeps cosine within a drop of 0" in result.message
    with torch.no_grad():
        assert torch.equal(compiled(*batches[0]), model(*batches[0]))


def test_callable_metric_scores_against_labels(vit):
    model, batches = vit
    with torch.no_grad():  # labels: the exact model's own top-1, so the exact score is 1
        labels = [model(*b).argmax(-1) for b in batches]
    seen = []

    def accuracy(reference, outputs, targets):
        seen.append(len(targets))
        return torch.cat([o.argmax(-1) == t for o, t in zip(outputs, targets)]).float().mean().item()

    b = budget(batches, metric=accuracy, max_drop=0.25, labels=labels[:2], heldout_labels=labels[2:])
    compiled = optcc.compile(model, ["token_pruning"], example_inputs=batches[0], target="eager", budget=b)
    result = compiled.report.budget
    assert result.metric == "accuracy" and set(seen) == {2}
    assert 1.0 - accuracy(None, [compiled(*b) for b in batches[:2]], labels[:2]) == pytest.approx(result.chosen.drop)
    assert result.chosen.drop <= 0.25


def test_a_margin_keeps_the_calibration_drop_below_the_budget(vit, tmp_path):
    model, batches = vit
    result = optcc.compile(model, PASSES, example_inputs=batches[0], target="eager",
                           budget=budget(batches, max_drop=0.01, margin=0.5, cache=tmp_path)).report.budget
    assert result.limit == pytest.approx(0.005) and result.max_drop == 0.01
    assert result.chosen.drop <= 0.005
    marked = {p.label: p for p in result.points}
    within = [line for line in result.markdown().splitlines() if line.endswith("| within |")]
    assert within and all(marked[line.split(" | ")[0].lstrip("| ")].drop <= 0.005 for line in within)
    assert "(searched within 0.005 on the calibration data)" in result.markdown()


def test_a_choice_over_budget_on_heldout_data_warns(vit):
    model, batches = vit

    def exact_only_on_heldout(reference, outputs, labels):
        # calibration: every setting is free; held out: any change costs everything
        same = all(torch.equal(r, o) for r, o in zip(reference, outputs))
        return 1.0 if same or labels[0] == "calibration" else 0.0

    b = budget(batches, metric=exact_only_on_heldout, labels=["calibration"] * 2, heldout_labels=["held"] * 2)
    with pytest.warns(optcc.BudgetWarning, match="held-out drop 1.0000 is over the budget 0.01"):
        result = optcc.compile(model, ["token_pruning"], example_inputs=batches[0], target="eager",
                               budget=b).report.budget
    assert result.met and result.chosen.drop == 0.0 and result.chosen.heldout_drop == 1.0
    assert result.heldout_exceeded and "Budget(margin=...)" in result.message


def test_repair_softens_to_the_next_milder_setting_in_few_measurements(vit):
    model, batches = vit
    passes = [optcc.get_pass("int8_decomposition")()]  # settings (6.0, 0.0): 6 is the milder
    search = bd._Search(model, batches[0], {}, passes, budget(batches), "eager")
    layers = [k.layer for k in search.knobs[0]]
    config = {0: {layer: 0.0 for layer in layers}}
    softer = search.soften(config, [(0, layers[0], 0.0), (0, layers[1], 0.0)])
    assert softer[0][layers[0]] == 6.0 and softer[0][layers[1]] == 6.0 and softer[0][layers[2]] == 0.0
    assert layers[0] not in search.soften(softer, [(0, layers[0], 6.0)])[0]  # the mildest goes back to exact

    # a drop that falls under the limit once 5 choices are softened: found in O(log n) measurements
    order = [(0, layer, 0.0) for layer in layers]
    measured = []

    def fake_drop(c, **_):
        measured.append(c)
        return 0.02 if sum(v == 0.0 for v in c.get(0, {}).values()) > len(layers) - 5 else 0.001

    search.drop = fake_drop
    assert search._shortest_prefix(config, order) == 5
    assert len(measured) <= 2 * math.ceil(math.log2(len(layers))) + 1


def test_latency_choice_comes_from_one_run_timing_the_settings_within_budget_together(vit, monkeypatch):
    model, batches = vit
    calls = []

    def fake_time(self, configs, runs=None):
        # each run of the search ranks configurations one way; the last run the other way
        calls.append([bd.config_key(c) for c in configs])
        rank = {k: i for i, k in enumerate(sorted(calls[-1]))}
        return {k: 2.0 + (rank[k] if len(calls) < 3 else -rank[k]) / 10 for k in calls[-1]}

    monkeypatch.setattr(bd._Search, "_time", fake_time)
    result = optcc.compile(model, PASSES, example_inputs=batches[0], target="eager",
                           budget=budget(batches, objective="latency")).report.budget
    within = [p for p in result.points[1:] if p.within(result.limit)]
    assert len(calls) == 3 and len(within) > 1 and result.timed_together
    assert sorted(calls[-1]) == sorted(bd.config_key(p.config) for p in within)
    # the first in the final ranking, not the fastest of the earlier runs (the last of them)
    assert bd.config_key(result.chosen.config) == sorted(calls[-1])[0] and result.chosen.speedup == 2.0
    assert "timed them together" in result.markdown()


@pytest.mark.parametrize("kwargs, message", [
    ({"metric": "accuracy"}, "unknown budget metric 'accuracy'"),
    ({"objective": "energy"}, "unknown budget objective 'energy'"),
    ({"max_drop": -1}, "max_drop must be a number >= 0"),
    ({"margin": 1.0}, "margin must be a fraction of max_drop"),
    ({"data": []}, "the budget needs calibration data"),
    ({"labels": [1]}, "labels must hold one entry per batch"),
])
def test_bad_budgets_are_clear_errors(vit, kwargs, message):
    with pytest.raises(optcc.BudgetError, match=message):
        budget(vit[1], **kwargs)


def test_searches_that_cannot_run_say_why(vit):
    model, batches = vit
    with pytest.raises(optcc.BudgetError, match="no approximate pass found a layer to tune"):
        optcc.compile(model, ["bn_reparam"], example_inputs=batches[0], target="eager", budget=budget(batches))
    other = [(torch.randn(2, 3, 64, 64),)]
    with pytest.raises(optcc.BudgetError, match="must have the shapes and dtypes of example_inputs"):
        optcc.compile(model, PASSES, example_inputs=batches[0], target="eager", budget=budget(batches, data=other))


def test_torch_compile_backend_and_command_line(vit, tmp_path, capsys, monkeypatch):
    model, batches = vit
    compiled = torch.compile(model, backend="optcc", options={"passes": ["token_pruning"], "budget": budget(batches)})
    with torch.no_grad():
        out = compiled(*batches[0])
    (graph,) = [g for g in optcc.backend.compiled_graphs() if g.budget is not None and g.pipeline.budget]
    assert graph.pipeline.budget.met
    assert out.shape == (4, 1000)

    factory = tmp_path / "tiny_vit.py"
    factory.write_text("import timm, torch\n"
                       "def build():\n"
                       "    torch.manual_seed(0)\n"
                       "    m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=64, depth=2)\n"
                       "    return m.eval(), (torch.randn(2, 3, 64, 64),)\n")
    from optcc.cli import main

    status = main(["tune", f"{factory}:build", "--passes", "token_pruning", "--budget", "cosine:0.02",
                   "--objective", "flops", "--target", "eager", "--batches", "2", "--no-cache",
                   "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "budget: cosine drop <= 0.02" in printed and (tmp_path / "out" / "budget.svg").exists()
    assert main(["tune", f"{factory}:build", "--passes", "token_pruning", "--budget", "cosine"]) == 2
    assert "--budget takes METRIC:MAX_DROP" in capsys.readouterr().err
