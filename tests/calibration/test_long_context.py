"""`thresher eval --long-context`: the quality of attention budgets over held-out windows, beside StreamingLLM."""

import json

import torch

from tests.helpers import run_thresher
from thresher.calibration.long_context import STREAMING_SINK_TOKENS, BudgetMethod
from thresher.kernels.page_selection import reference_selection

HEADS, KV_HEADS, HEAD, PAGE = 6, 2, 16, 16


def test_each_query_reads_the_pages_a_decode_step_would_select():
    """The eval's mask for any position is the engine's selection (its reference) over the keys up to there."""
    generator = torch.Generator().manual_seed(0)
    context = 700
    query = torch.randn(HEADS, context, HEAD, generator=generator)
    key = torch.randn(KV_HEADS, context, HEAD, generator=generator) * torch.linspace(0.1, 3, HEAD)
    method = BudgetMethod("pages", 128, PAGE)
    visible = method.visible(query, key, 0, HEAD**-0.5)
    for position in (0, 100, 127, 128, 300, 555, 699):
        pages = reference_selection(query[:, position], key[:, : position + 1].transpose(0, 1), 128 // PAGE, PAGE,
                                    HEAD**-0.5)
        expected = torch.zeros(context, dtype=torch.bool)
        for page in pages:
            expected[page * PAGE : (page + 1) * PAGE] = True
        expected[position + 1 :] = False
        assert torch.equal(visible[position], expected), position


def test_streaming_keeps_sinks_and_a_recent_window_of_the_budget():
    visible = BudgetMethod("streaming", 64, PAGE).visible(torch.zeros(HEADS, 200, HEAD),
                                                         torch.zeros(KV_HEADS, 200, HEAD), 0, 1.0)
    assert visible[63].sum() == 64 and visible[150].sum() == 64
    assert visible[150, :STREAMING_SINK_TOKENS].all() and visible[150, 150 - 59 : 151].all()


def test_long_context_eval_beats_streaming_at_every_budget(embedded_model, tmp_path):
    result = run_thresher("eval", "--long-context", "--context", "1024", "--budgets", "256,512", "--json",
                          "--report-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert json.loads((tmp_path / "long_context_report.json").read_text()) == report
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {(m, b) for m in ("pages", "mean-pages", "streaming") for b in (256, 512)}
    for budget in (256, 512):
        assert rows["pages", budget]["positions"] == 1023 - budget
        assert 0 < rows["pages", budget]["kl"] < rows["streaming", budget]["kl"]
        assert rows["pages", budget]["dense_perplexity"] == rows["streaming", budget]["dense_perplexity"]
    bad = run_thresher("eval", "--long-context", "--context", "1024", "--budgets", "2048")
    assert bad.returncode != 0 and "budget 2048" in bad.stderr
    few = run_thresher("eval", "--long-context", "--context", "1024", "--budgets", "32")
    assert few.returncode != 0 and "leaves no page to choose" in few.stderr
    fp8 = run_thresher("eval", "--long-context", "--fp8-weights", "per-channel")
    assert fp8.returncode == 2 and "--fp8-weights" in fp8.stderr and "attention budgets" in fp8.stderr
    scales = run_thresher("eval", "--artifact", str(tmp_path), "--fp8-weights", "per-row")
    assert scales.returncode == 2 and "per-tensor, per-channel" in scales.stderr
