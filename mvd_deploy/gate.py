"""CI gates: a profile against a device profile's budgets → exit 0 (within), 1 (over), 2 (bad input).

Each component and metric is one check (latency p50, peak memory, PSNR), plus the whole-pipeline
latency when the budget has one. Results go out three ways: JSON, a JUnit XML file (one testcase
per check; failures carry measured vs budget) and a Markdown summary for CI job pages.

A figure the profile declares it cannot measure (``not_measured``: the offline HTP emulator has no
phone latency or memory) is neither a pass nor a failure: the check is reported "not measured" with
the profile's reason (JUnit: skipped) and the verdict says how many were not measured. Any other
missing figure fails.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from mvd_deploy.device_profiles import DeviceProfile, resolve_target
from mvd_deploy.errors import MvdError
from mvd_deploy.fileio import load_json


def _compute_efficiency(component: dict, profile: dict) -> float | None:
    """Achieved FLOP/s at p50 over the device's fp32 GEMM rate (both measured in the profile run)."""
    gemm = profile.get("device", {}).get("gemm_gflops")
    p50, flops = (component.get("latency_ms") or {}).get("p50"), component.get("flops")
    if not gemm or not p50 or not flops:
        return None
    return round(flops / (p50 / 1000) / (gemm * 1e9), 4)


_METRICS = (  # (budget field, profile figure, profile reader, unit, passes when measured is ...)
    ("latency_ms", "latency_ms", lambda c, p: (c.get("latency_ms") or {}).get("p50"), "ms", "at most"),
    ("min_compute_efficiency", "latency_ms", _compute_efficiency, "of GEMM rate", "at least"),
    ("peak_memory_mb", "peak_memory_mb", lambda c, p: c.get("peak_memory_mb"), "MB", "at most"),
    ("min_psnr_db", "psnr_db", lambda c, p: c.get("psnr_db"), "dB", "at least"),
)
_AT_LEAST = {field for field, _, _, _, direction in _METRICS if direction == "at least"}


@dataclass
class Check:
    component: str
    metric: str
    measured: float | None
    budget: float
    unit: str
    passed: bool
    note: str = ""
    not_measured: bool = False  # the profile says it cannot measure this figure: neither pass nor fail


def load_profile(path: str | Path) -> dict:
    profile = load_json(Path(path), "profile")
    if not isinstance(profile, dict) or profile.get("schema") != "mvd-deploy-profile":
        raise MvdError(f"{path}: key 'schema': not an mvd-deploy profile")
    if not isinstance(profile.get("components"), dict) or not profile["components"]:
        raise MvdError(f"{path}: key 'components': no components were profiled")
    return profile


def gate(profile: dict, budget: DeviceProfile) -> list[Check]:
    """Every budgeted metric of every budgeted component; a missing component or figure fails, unless
    the profile declares the figure not measurable (then the check is "not measured")."""
    checks = []
    declared = profile.get("not_measured") or {}
    for component, limits in budget.budgets.items():
        measured_component = profile["components"].get(component)
        for field, figure, read, unit, direction in _METRICS:
            limit = getattr(limits, field)
            if limit is None:
                continue
            measured = read(measured_component, profile) if measured_component else None
            if measured is None and measured_component is not None and figure in declared:
                checks.append(Check(component, field, None, limit, unit, False, declared[figure], not_measured=True))
                continue
            # A backend reporting 0 ms or 0 MB did not measure it (AI Hub's deprecated peak-memory field
            # is 0 in new profiles): that fails like a missing figure, never passes a budget.
            if measured is None or (direction == "at most" and measured <= 0):
                note = "not profiled" if measured_component is None else "not measured"
                checks.append(Check(component, field, None, limit, unit, False, note))
                continue
            passed = measured <= limit if direction == "at most" else measured >= limit
            checks.append(Check(component, field, measured, limit, unit, passed))
    if budget.total_latency_ms is not None:
        total = profile.get("total_latency_ms")
        unmeasured = total is None and "latency_ms" in declared
        checks.append(
            Check(
                "pipeline",
                "total_latency_ms",
                total,
                budget.total_latency_ms,
                "ms",
                total is not None and total <= budget.total_latency_ms,
                declared["latency_ms"] if unmeasured else "",
                not_measured=unmeasured,
            )
        )
    return checks


def gate_report(profile: dict, budget: DeviceProfile, checks: list[Check]) -> dict:
    return {
        "target": profile.get("target"),
        "form": profile.get("form"),
        "budget": budget.source,
        "passed": all(c.passed or c.not_measured for c in checks),
        "failures": sum(not c.passed and not c.not_measured for c in checks),
        "not_measured": sum(c.not_measured for c in checks),
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
        skipped=str(report.get("not_measured", 0)),
        errors="0",
    )
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"{report['target']}.{c.component}", name=c.metric)
        if c.not_measured:
            ET.SubElement(case, "skipped", message=f"{c.component} {c.metric}: {c.note}")
        elif not c.passed:
            failure = ET.SubElement(case, "failure", message=_describe(c) + (f" ({c.note})" if c.note else ""))
            failure.text = _describe(c)
    root = ET.Element(
        "testsuites",
        tests=str(len(checks)),
        failures=str(report["failures"]),
        skipped=str(report.get("not_measured", 0)),
    )
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def markdown_summary(report: dict) -> str:
    verdict = "✅ within budget" if report["passed"] else f"❌ {report['failures']} over budget"
    if report.get("not_measured"):
        verdict += f" (➖ {report['not_measured']} not measured)"
    lines = [
        f"### mvd-deploy gate: {report['target']}/{report['form']} — {verdict}",
        "",
        "| component | metric | measured | budget | |",
        "|---|---|---|---|---|",
    ]
    for c in map(lambda d: Check(**d), report["checks"]):
        measured = "—" if c.not_measured else "missing" if c.measured is None else f"{c.measured:g} {c.unit}"
        relation = "≥" if c.metric in _AT_LEAST else "≤"
        verdict = "➖ not measured" if c.not_measured else "✅" if c.passed else "❌"
        lines.append(f"| {c.component} | {c.metric} | {measured} | {relation} {c.budget:g} {c.unit} | {verdict} |")
    notes = dict.fromkeys(c["note"] for c in report["checks"] if c.get("not_measured"))
    lines.extend(f"\n➖ {note}" for note in notes)
    lines.append(f"\nBudgets: `{report['budget']}`")
    return "\n".join(lines) + "\n"


@dataclass
class GateReport:
    """A profile checked against a device profile's budgets (:func:`gate_profile`)."""

    target: str | None
    form: str | None
    budget: str  # the device profile the budgets came from
    passed: bool
    failures: int
    not_measured: int
    checks: list[Check]
    junit: str | None = None  # where the JUnit XML and Markdown summary were written
    markdown: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """The Markdown summary (as written to ``markdown``)."""
        return markdown_summary(self.to_json())


def gate_profile(
    profile_json: str | Path,
    *,
    budget: DeviceProfile | str | Path,
    junit: str | Path | None = None,
    markdown: str | Path | None = None,
) -> GateReport:
    """Check the profile file ``profile_json`` against ``budget`` (a device profile, its name or path);
    writes JUnit XML and a Markdown summary beside the profile unless ``junit``/``markdown`` say where."""
    if not isinstance(budget, DeviceProfile):
        budget = resolve_target(budget)
    profile_path = Path(profile_json)
    profile = load_profile(profile_path)
    report = gate_report(profile, budget, gate(profile, budget))
    junit = Path(junit) if junit else profile_path.with_suffix(".junit.xml")
    markdown_path = Path(markdown) if markdown else profile_path.with_suffix(".gate.md")
    write_junit(report, junit)
    markdown_path.write_text(markdown_summary(report))
    report["junit"], report["markdown"] = str(junit), str(markdown_path)
    return GateReport(**{**report, "checks": [Check(**c) for c in report["checks"]]})
