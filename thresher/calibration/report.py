"""The quality report: perplexity against measured sparsity, as JSON, a PNG plot and a terminal table."""

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
    if "sae" in report:
        sae = report["sae"]
        console.print(f"SAE after layer {sae['layer']} ({sae['d_sae']} latents, k={sae['k']}): held-out FVU "
                      f"{sae['fvu']:.3f}, L0 {sae['l0']:.1f}, dead {sae['dead_fraction']:.1%} (silent on these tokens "
                      f"{sae['held_out_silent_fraction']:.1%}), perplexity {sae['perplexity_increase']:+.1%} and KL "
                      f"from dense {sae['kl_from_dense']:.4f} with the reconstruction spliced in")
