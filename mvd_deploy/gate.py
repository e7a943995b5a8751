"""CI gates: a profile against a device profile's budgets → exit 0 (within), 1 (over), 2 (bad input).

Each component and metric is one check (latency p50, peak memory, PSNR), plus the whole-pipeline
latency when the budget has one. Results go out three ways: JSON, a JUnit XML file (one testcase
per check; failures carry measured vs budget) and a Markdown summary for CI job pages.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from mvd_deploy.device_profiles import DeviceProfile
from mvd_deploy.errors import MvdError
from mvd_deploy.fileio import load_json


def _compute_efficiency(component: dict, profile: dict) -> float | None:
    """Achieved FLOP/s at p50 over the device's fp32 GEMM rate (both measured in the profile run)."""
    gemm = profile.get("device", {}).get("gemm_gflops")
    p50, flops = component["latency_ms"]["p50"], component.get("flops")
    if not gemm or not p50 or not flops:
        return None
    return round(flops / (p50 / 1000) / (gemm * 1e9), 4)


_METRICS = (  # (budget field, profile reader, unit, passes when measured is ...)
    ("latency_ms", lambda c, p: c["latency_ms"]["p50"], "ms", "at most"),
    ("min_compute_efficiency", _compute_efficiency, "of GEMM rate", "at least"),
    ("peak_memory_mb", lambda c, p: c["peak_memory_mb"], "MB", "at most"),
    ("min_psnr_db", lambda c, p: c.get("psnr_db"), "dB", "at least"),
)
_AT_LEAST = {field for field, _, _, direction in _METRICS if direction == "at least"}


@dataclass
class Check:
    component: str
    metric: str
    measured: float | None
    budget: float
    unit: str
    passed: bool
    note: str = ""


def load_profile(path: str | Path) -> dict:
    profile = load_json(Path(path), "profile")
    if not isinstance(profile, dict) or profile.get("schema") != "mvd-deploy-profile":
        raise MvdError(f"{path}: key 'schema': not an mvd-deploy profile")
    if not isinstance(profile.get("components"), dict) or not profile["components"]:
        raise MvdError(f"{path}: key 'components': no components were profiled")
    return profile


def gate(profile: dict, budget: DeviceProfile) -> list[Check]:
    """Every budgeted metric of every budgeted component; a missing component or figure fails."""
    checks = []
    for component, limits in budget.budgets.items():
        measured_component = profile["components"].get(component)
        for field, read, unit, direction in _METRICS:
            limit = getattr(limits, field)
            if limit is None:
                continue
            measured = read(measured_component, profile) if measured_component else None
            if measured is None:
                note = "not profiled" if measured_component is None else "not measured"
                checks.append(Check(component, field, None, limit, unit, False, note))
                continue
            passed = measured <= limit if direction == "at most" else measured >= limit
            checks.append(Check(component, field, measured, limit, unit, passed))
    if budget.total_latency_ms is not None:
        total = profile.get("total_latency_ms")
        checks.append(
            Check(
                "pipeline",
                "total_latency_ms",
                total,
                budget.total_latency_ms,
                "ms",
                total is not None and total <= budget.total_latency_ms,
            )
        )
    return checks


def gate_report(profile: dict, budget: DeviceProfile, checks: list[Check]) -> dict:
    return {
        "target": profile.get("target"),
        "form": profile.get("form"),
        "budget": budget.source,
        "passed": all(c.passed for c in checks),
        "failures": sum(not c.passed for c in checks),
        "checks": [asdict(c) for c in checks],
    }


def _describe(c: Check) -> str:
    measured = "missing" if c.measured is None else f"{c.measured:g} {c.unit}"
    relation = "≥" if c.metric in _AT_LEAST else "≤"
    return f"{c.component} {c.metric}: measured {measured}, budget {relation} {c.budget:g} {c.unit}"


def write_junit(report: dict, path: Path) -> None:
    checks = [Check(**c) for c in report["checks"]]
    suite = ET.Element(
        "testsuite",
        name=f"mvd-deploy gate {report['target']}/{report['form']}",
        tests=str(len(checks)),
        failures=str(report["failures"]),
        errors="0",
    )
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"{report['target']}.{c.component}", name=c.metric)
        if not c.passed:
            failure = ET.SubElement(case, "failure", message=_describe(c) + (f" ({c.note})" if c.note else ""))
            failure.text = _describe(c)
    root = ET.Element("testsuites", tests=str(len(checks)), failures=str(report["failures"]))
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def markdown(report: dict) -> str:
    verdict = "✅ within budget" if report["passed"] else f"❌ {report['failures']} over budget"
    lines = [
        f"### mvd-deploy gate: {report['target']}/{report['form']} — {verdict}",
        "",
        "| component | metric | measured | budget | |",
        "|---|---|---|---|---|",
    ]
    for c in map(lambda d: Check(**d), report["checks"]):
        measured = "missing" if c.measured is None else f"{c.measured:g} {c.unit}"
        relation = "≥" if c.metric in _AT_LEAST else "≤"
        lines.append(
            f"| {c.component} | {c.metric} | {measured} | {relation} {c.budget:g} {c.unit} | "
            f"{'✅' if c.passed else '❌'} |"
        )
    lines.append(f"\nBudgets: `{report['budget']}`")
    return "\n".join(lines) + "\n"


def run_gate(
    profile_path: str | Path, budget: DeviceProfile, junit: Path | None = None, markdown_path: Path | None = None
) -> dict:
    """Gate a profile file; writes JUnit XML and Markdown beside it unless paths are given."""
    profile_path = Path(profile_path)
    profile = load_profile(profile_path)
    report = gate_report(profile, budget, gate(profile, budget))
    junit = junit or profile_path.with_suffix(".junit.xml")
    markdown_path = markdown_path or profile_path.with_suffix(".gate.md")
    write_junit(report, junit)
    markdown_path.write_text(markdown(report))
    report["junit"], report["markdown"] = str(junit), str(markdown_path)
    return report
