"""The quality reports, as JSON, a PNG plot and a terminal table: perplexity against measured sparsity, and the
steering sweep's concept and fluency against strength."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def write_report(report: dict, directory: str | Path) -> tuple[Path, Path]:
    """Write `report.json` and `report.png` (one line per method) into `directory`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / "report.json", directory / "report.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    dense = report["dense"]["perplexity"]
    for method in sorted({entry["method"] for entry in report["levels"]}):
        entries = sorted((e for e in report["levels"] if e["method"] == method), key=lambda e: e["measured_sparsity"])
        ax.plot([0.0] + [e["measured_sparsity"] * 100 for e in entries], [dense] + [e["perplexity"] for e in entries],
                marker="o", label=method)
    ax.axhline(dense, color="grey", linestyle=":", label=f"dense ({dense:.2f})")
    ax.set_xlabel("measured sparsity (% of projection weights skipped)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{report['model']}: {report['tokens']} held-out tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return json_path, png_path


def print_report(report: dict, console: Console | None = None) -> None:
    dense = report["dense"]["perplexity"]
    table = Table(title=f"{report['model']} on {report['tokens']} held-out tokens")
    for column in ("method", "level", "measured sparsity", "perplexity", "vs dense", "KL from dense"):
        table.add_column(column, justify="right" if column != "method" else "left")
    table.add_row("dense", "0%", "0.0%", f"{dense:.3f}", "", "")
    for e in report["levels"]:
        table.add_row(e["method"], f"{e['level']:.0%}", f"{e['measured_sparsity']:.1%}", f"{e['perplexity']:.3f}",
                      f"{e['perplexity'] / dense - 1:+.1%}", f"{e['kl_from_dense']:.4f}")
    console = console or Console()
    console.print(table)
    if "fp8_weights" in report:
        fp8 = report["fp8_weights"]
        table = Table(title=f"FP8 weights (e4m3, {fp8['scales']} scales)")
        for column in ("method", "level", "perplexity", "vs the same level, own weights", "KL from dense"):
            table.add_column(column, justify="right" if column != "method" else "left")
        rows = [("dense", 0.0, fp8["dense"])] + [(e["method"], e["level"], e) for e in fp8["levels"]]
        for method, level, e in rows:
            table.add_row(method, f"{level:.0%}", f"{e['perplexity']:.3f}", f"{e['vs_own_weights']:+.2%}",
                          f"{e['kl_from_dense']:.4f}")
        console.print(table)
    if "sae" in report:
        sae = report["sae"]
        console.print(f"SAE after layer {sae['layer']} ({sae['d_sae']} latents, k={sae['k']}): held-out FVU "
                      f"{sae['fvu']:.3f}, L0 {sae['l0']:.1f}, dead {sae['dead_fraction']:.1%} (silent on these tokens "
                      f"{sae['held_out_silent_fraction']:.1%}), perplexity {sae['perplexity_increase']:+.1%} and KL "
                      f"from dense {sae['kl_from_dense']:.4f} with the reconstruction spliced in")


def write_sweep_report(result: dict, directory: Path) -> None:
    """`steering_report.json` and `steering_report.png`: concept reading, judge gain and perplexity against strength
    per target, with the controls beside each vector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "steering_report.json").write_text(json.dumps(result, indent=1) + "\n")
    targets = sorted({r["target"] for r in result["rows"][1:]})
    fig, axes = plt.subplots(len(targets), 3, figsize=(12, 2.4 * len(targets)), squeeze=False)
    for row_axes, target in zip(axes, targets):
        for (kind, mode), style in {("vector", "add"): "o-", ("random direction", "add"): "x--",
                                    ("flipped", "add"): "s:", ("feature", "add"): "o-",
                                    ("feature", "clamp"): "d--"}.items():
            points = sorted((r["strength"], r) for r in result["rows"][1:]
                            if r["target"] == target and r["kind"] == kind and r["mode"] == mode)
            if not points:
                continue
            label = kind if kind != "feature" else mode
            for axis, metric in zip(row_axes, ("reading", "judge_gain", "perplexity")):
                axis.plot([s for s, _ in points], [r[metric] for _, r in points], style, label=label)
                axis.set_title(f"{target}: {metric}", fontsize=8)
        row_axes[2].axhline(result["unsteered_perplexity"], color="grey", lw=0.8)
        row_axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(directory / "steering_report.png", dpi=80)
    plt.close(fig)


def print_sweep(result: dict, console: Console | None = None) -> None:
    table = Table(title=f"steering after layer {result['layer']}: {result['instructions']} held-out instructions, "
                        f"{result['new_tokens']} tokens each; unsteered perplexity "
                        f"{result['unsteered_perplexity']:.2f}")
    for column in ("target", "control", "mode", "strength", "reading", "judge gain", "perplexity", "combined"):
        table.add_column(column, justify="left" if column in ("target", "control", "mode") else "right")
    for r in result["rows"][1:]:
        table.add_row(r["target"], "" if r["kind"] in ("vector", "feature") else r["kind"], r["mode"],
                      f"{r['strength']:g}", f"{r['reading']:.3f} ({r['reading_unsteered']:.3f})",
                      f"{r['judge_gain']:+.3f}", f"{r['perplexity']:.2f}", f"{r['combined']:.3f}")
    console = console or Console()
    console.print(table)
    console = Console(file=console.file, emoji=False, highlight=False)  # "feature 7:clamp" is no emoji code
    for key, best in sorted(result["best"].items()):
        console.print(f"best {key}: strength {best['strength']:g} (combined {best['combined']:.3f}, perplexity "
                      f"{best['perplexity']:.2f})")
    summary = result["summary"]
    for name, vector in summary["vectors"].items():
        console.print(f"vector {name} at {vector['strength']:g}: judge gain {vector['judge_gain']:+.3f} against "
                      f"{vector['random_judge_gain']:+.3f} for a random direction of its norm, perplexity "
                      f"{vector['perplexity_ratio']:.2f}x unsteered: "
                      f"{'steers' if vector['steers'] else 'does not steer'}")
    console.print(f"features whose activation rises with strength: {summary['features_monotonic_when_added']:.0%} "
                  f"added, {summary['features_monotonic_when_clamped']:.0%} clamped; clamping's best combined score "
                  f"beats adding's for {summary['clamp_beats_add']:.0%}")


def print_long_context(result: dict, console: Console | None = None) -> None:
    table = Table(title=f"{result['model']}: attention budgets over {result['windows']} held-out window(s) of "
                        f"{result['context']} tokens, {result['page_size']}-token pages, scored beyond each budget")
    for column in ("budget", "method", "perplexity", "dense", "change", "KL"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in result["rows"]:
        table.add_row(str(r["budget"]), r["method"], f"{r['perplexity']:.3f}", f"{r['dense_perplexity']:.3f}",
                      f"{r['perplexity_change']:+.2%}", f"{r['kl']:.4f}")
    (console or Console()).print(table)
