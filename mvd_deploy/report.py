"""``mvd-deploy report BUILD``: one HTML page with PNG plots — FLOPs per stage beside the paper's
Table 8, latency per component and target, the slowest ops — and the tables behind them."""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass
from pathlib import Path

from mvd_deploy.build import Build, summary_rows
from mvd_deploy.contact_sheet import contact_sheet, read_video
from mvd_deploy.fileio import load_json, staged_dir


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_stages(stages: list[dict], path: Path) -> None:
    plt = _plt()
    labels = [textwrap.fill(s["stage"].split(" = ")[0].split(" (")[0], 16) for s in stages]
    giga = max(s["tflops"] for s in stages) < 0.1  # tiny models read better in GFLOPs
    scale, unit = (1e3, "GFLOPs") if giga else (1.0, "TFLOPs")
    ours = [s["tflops"] * scale for s in stages]
    paper = [(s["paper_tflops"] or 0) * scale for s in stages]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    x = range(len(stages))
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label="mvd-deploy (counted on the rewritten model)")
    if any(paper):
        ax.bar([i + 0.2 for i in x], paper, width=0.4, label="paper, Table 8")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel(f"{unit} per UNet call")
    ax.set_title("FLOPs after each optimisation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(profiles: list[dict], path: Path) -> None:
    plt = _plt()
    components = sorted({c for p in profiles for c in p["components"]})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(profiles), 1)
    for i, profile in enumerate(profiles):
        values = [(profile["components"].get(c, {}).get("latency_ms") or {}).get("p50") or 0 for c in components]
        ax.bar(
            [j + i * width for j in range(len(components))],
            values,
            width=width,
            label=f"{profile['target']}/{profile['form']}",
        )
    ax.set_xticks([j + width * (len(profiles) - 1) / 2 for j in range(len(components))], components)
    ax.set_ylabel("p50 latency per call (ms)")
    ax.set_yscale("log")
    ax.set_title("Latency per component and target")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_top_ops(profile: dict, path: Path) -> None:
    plt = _plt()
    components = list(profile["components"])
    fig, axes = plt.subplots(1, len(components), figsize=(6 * len(components), 4), squeeze=False)
    for ax, name in zip(axes[0], components, strict=True):
        ops = profile["components"][name]["top_ops"][::-1]
        timed = [o for o in ops if o["ms"] is not None]  # none when the device reported cycles only
        unit = "ms" if timed else "cycles"
        ops = timed or ops
        ax.barh([f"{o['op_type']} {(o.get('module') or o['name'])[-28:]}" for o in ops], [o[unit] for o in ops])
        ax.set_xlabel(f"{unit} in one call")
        ax.set_title(f"{name}: slowest ops")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{profile['target']}/{profile['form']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


@dataclass
class ReportResult:
    """What :func:`write_report` wrote: the page and its plots (file names beside it)."""

    report: Path
    images: list[str]

    def to_json(self) -> dict:
        return {"report": str(self.report), "images": self.images}


def write_report(
    build: Build | str | Path, *, out: str | Path | None = None, video: str | Path | None = None
) -> ReportResult:
    """An HTML page with plots of ``build`` in ``out`` (default: BUILD/report, replaced whole): FLOPs
    per stage beside the paper's Table 8, latency per component and target, the slowest ops, the
    tables behind them, and a contact sheet of a generated ``video``'s frames."""
    build = build if isinstance(build, Build) else Build(build)
    frames = read_video(Path(video)) if video else None  # a generated video: checked before anything is written
    out = Path(out) if out else build.path / "report"
    profiles = _profiles(build)
    out.parent.mkdir(parents=True, exist_ok=True)
    images: list[str] = []
    with staged_dir(out) as tmp:
        sections = [_header_section(build)]
        sections += _stages_section(build.manifest.get("stages"), tmp, images)
        sections += _latency_sections(profiles, tmp, images)
        if frames is not None:
            sections.append(_video_section(video, frames, tmp, images))
        sections.append(_components_section(summary_rows(build)))
        sections += _gates_section(build.manifest.get("gates", {}))
        (tmp / "index.html").write_text(_page(sections))
    return ReportResult(report=out / "index.html", images=images)


def _video_section(video, frames, directory: Path, images: list[str]) -> str:
    sheet = contact_sheet(frames, directory / "contact_sheet.png")
    images.append("contact_sheet.png")
    return (
        f"<h2>Generated video: {html.escape(str(video))}</h2><p>{sheet['frames']} frames of "
        f"{sheet['frame_size'][0]}x{sheet['frame_size'][1]} px, in reading order</p>"
        "<img src='contact_sheet.png' alt='contact sheet of the frames'>"
    )


def _profiles(build: Build) -> list[dict]:
    directory = build.path / "profiles"
    return [load_json(p, "profile") for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []


def _header_section(build: Build) -> str:
    m = build.manifest
    return (
        f"<h1>mvd-deploy build: {html.escape(str(m.get('model')))}</h1>"
        f"<p>{html.escape(str(build.path))} — precision {m.get('precision')}, conditioning "
        f"{m.get('conditioning')}, created {m.get('created')}</p>"
    )


def _stages_section(stages: list[dict] | None, directory: Path, images: list[str]) -> list[str]:
    if not stages:
        return []
    plot_stages(stages, directory / "stages.png")
    images.append("stages.png")
    table = _table(
        ["stage", "NFE", "GFLOPs", "paper GFLOPs", "Δ %"],
        [
            [
                s["stage"],
                s["nfe"],
                f"{s['flops'] / 1e9:,.1f}",
                f"{s['paper_tflops'] * 1e3:,.0f}" if s["paper_tflops"] else "-",
                f"{s['delta_pct']:+.1f}" if s["delta_pct"] is not None else "-",
            ]
            for s in stages
        ],
    )
    return ["<h2>FLOPs per stage (paper Table 8)</h2><img src='stages.png' alt='FLOPs per stage'>" + table]


def _latency_sections(profiles: list[dict], directory: Path, images: list[str]) -> list[str]:
    timed = [p for p in profiles if p.get("total_latency_ms") is not None]  # not offline emulator ones
    if not timed:
        return []
    plot_latency(timed, directory / "latency.png")
    images.append("latency.png")
    sections = ["<h2>Latency</h2><img src='latency.png' alt='latency per component'>"]
    for profile in timed:
        name = f"top_ops_{profile['target']}_{profile['form']}.png"
        plot_top_ops(profile, directory / name)
        images.append(name)
        sections.append(
            f"<h3>Slowest ops: {html.escape(profile['target'])}/{html.escape(profile['form'])}"
            f"</h3><img src='{name}' alt='slowest ops'>"
        )
    return sections


def _components_section(rows: list[dict]) -> str:
    return "<h2>Components and compiled forms</h2>" + _table(
        ["component", "form", "params", "TFLOPs", "PSNR dB", "p50 ms", "peak MB"],
        [
            [
                r["component"],
                r["form"],
                f"{r['params']:,}",
                f"{r['tflops']:.3f}",
                "-" if r["psnr_db"] is None else r["psnr_db"],
                "-" if r["p50_ms"] is None else r["p50_ms"],
                "-" if r["peak_memory_mb"] is None else r["peak_memory_mb"],
            ]
            for r in rows
        ],
    )


def _gates_section(gates: dict) -> list[str]:
    if not gates:
        return []
    return [
        "<h2>Gates</h2>"
        + _table(
            ["target/form", "component", "metric", "measured", "budget", "result"],
            [
                [
                    key,
                    c["component"],
                    c["metric"],
                    "-" if c["measured"] is None else c["measured"],
                    c["budget"],
                    "not measured" if c.get("not_measured") else "pass" if c["passed"] else "FAIL",
                ]
                for key, g in gates.items()
                for c in g["checks"]
            ],
        )
    ]


def _page(sections: list[str]) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>mvd-deploy report</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style></head><body>"
        + "".join(sections)
        + "</body></html>"
    )
