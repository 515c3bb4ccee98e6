"""Render compared cells into ``tables/<output>.md`` (a section per paper table) and ``tables/<output>.csv``."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from tabulate import tabulate

from repro.harness.compare import VERDICT_RULE, CellResult
from repro.core.io import atomic_write_bytes
from repro.harness.plan import Plan
from repro.core.env import git_commit, library_versions
from repro.harness.spec import Spec, spec_display_path

CSV_COLUMNS = ["table", "spec", "teacher", "student", "method", "reported_mean", "reported_std", "reported_n",
               "reported_protocol", "reported_status", "reported_source", "confidence", "reported_note",
               "reproduced_mean", "reproduced_std", "n_seeds", "metric", "best_top1_mean", "last_top1_mean", "delta",
               "tolerance", "tier", "verdict", "run_ids"]


def _num(x: Optional[float], std: Optional[float] = None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f} ± {std:.2f}" if std is not None else f"{x:.2f}"


class Footnotes:
    """Numbered footnotes, deduplicated by text."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def render(self) -> str:
        return "\n".join(f"{i}. {t}" for i, t in enumerate(self.texts, 1))


def _reported_text(r: CellResult, notes: Footnotes) -> str:
    rep = r.reported
    if rep.status == "not_transcribed":
        return "not transcribed " + notes.mark("The paper's value has not been transcribed into the ledger yet "
                                                "(a data-only change in the spec once someone has the PDF).")
    if rep.mean is None:
        return "n/a"
    text = _num(rep.mean, rep.std)
    marks = []
    if rep.confidence not in ("high", ""):
        # A value to handle with care names where it comes from in the table itself, not only in the CSV.
        source = f"Reported value from {rep.source}; " if rep.source else "Reported value: "
        marks.append(notes.mark(f"{source}confidence: {rep.confidence}."))
    if rep.protocol == "last":
        marks.append(notes.mark("Reported as last-epoch accuracy by its source; this table mixes protocols, so "
                                "the reproduced value shown beside it is also last-epoch."))
    if rep.note:
        marks.append(notes.mark(rep.note))
    return " ".join([text, *marks])


def _reproduced_text(r: CellResult) -> str:
    if r.status == "failed":
        reasons = {x.get("reason", "") for x in r.results if x.get("status") == "failed"}
        return "failed (" + "; ".join(sorted(reasons))[:80] + ")"
    if r.status == "reported only":
        return "not run"
    if r.mean is None:
        return "pending"
    text = _num(r.mean, r.std)
    return text + (f" ({r.n}/{len(r.run_ids)} seeds)" if r.status == "partial" else "")


def _provenance_marks(r: CellResult, notes: Footnotes) -> str:
    marks = [notes.mark(f"{field}: {p.source}" + (f", {p.note}" if p.note else ""))
             for field, p in sorted(r.cell.provenance.items())]
    if r.method.reported_only:
        marks.append(notes.mark(f"{r.cell.method}: reported only: {r.method.reported_only}"))
    if r.method.note:
        marks.append(notes.mark(f"{r.cell.method}: {r.method.note}"))
    if r.overrides:
        marks.append(notes.mark(_overrides_text(r.overrides)))
    return " ".join(marks)


def _overrides_text(overrides: list[str]) -> str:
    return ("Overridden from the command line (not the spec file): " + ", ".join(f"`--set {o}`" for o in overrides)
            + "; its runs have their own run ids.")


def _metric_text(r: CellResult) -> str:
    """The protocol (best/last epoch), with the measure when it is not top-1 (e.g. "last top5")."""
    return r.metric if r.reported.metric == "top1" else f"{r.metric} {r.reported.metric}"


def _pair(r: CellResult) -> str:
    return f"{r.cell.teacher} → {r.cell.student}" if r.cell.teacher else r.cell.student


def _origin(run: dict[str, Any]) -> str:
    return f"{run.get('hostname', '?')} @ `{run.get('commit', '?')}`"


def _origin_marks(r: CellResult, notes: Footnotes, per_cell: bool) -> str:
    """Where a cell's runs were computed (host, commit), when the table pools runs of several hosts (runs
    imported from other machines' bundles); with one host the stamp's hosts and commits hold for every cell."""
    if not per_cell or not r.results:
        return ""
    counts: dict[str, int] = {}
    for run in r.results:
        counts[_origin(run)] = counts.get(_origin(run), 0) + 1
    text = "; ".join(f"{origin} ({n} run{'s' if n > 1 else ''})" for origin, n in sorted(counts.items()))
    return notes.mark(f"Runs computed on {text}.")


def section_markdown(spec: Spec, tier: str, results: list[CellResult], per_cell_origin: bool = False) -> str:
    notes = Footnotes()
    rows = []
    for r in results:
        origin = _origin_marks(r, notes, per_cell_origin)
        rows.append([
            _pair(r), r.cell.method + (" " + _provenance_marks(r, notes) if _provenance_marks(r, notes) else ""),
            _reported_text(r, notes), _reproduced_text(r) + (" " + origin if origin else ""), _metric_text(r),
            "–" if r.delta is None else f"{r.delta:+.2f}", r.verdict,
            " ".join(rid[:8] for rid in r.run_ids) or "–",
        ])
    table = tabulate(rows, headers=["Teacher → Student", "Method", "Reported", "Reproduced", "Metric", "Δ",
                                    "Verdict", "Runs"], tablefmt="github", disable_numparse=True)
    recipe = spec.recipe_for(tier)
    lines = [f"## {spec.table}: {spec.title}", "",
             f"Spec `{spec.id}` (`{spec_display_path(spec.id)}`); tier **{tier}**; seeds per cell: "
             f"{spec.seeds_for(tier)}{_seed_exceptions(spec, tier)}; metric protocol: {recipe.metric}-epoch "
             f"top-1 unless a cell says otherwise.",
             "", table, ""]
    lines += _deviation_lines(spec, tier, results, notes)
    if notes.texts:
        lines += ["", "Notes:", "", notes.render()]
    return "\n".join(lines) + "\n"


def _seed_exceptions(spec: Spec, tier: str) -> str:
    """Cells run a different number of times than the spec's default (the paper's own run counts)."""
    counts = sorted({(spec.seeds_for_cell(c, tier), c.method) for c in spec.cells
                     if spec.seeds_for_cell(c, tier) != spec.seeds_for(tier)
                     and spec.methods[c.method].reported_only is None and spec.methods[c.method].role == "student"})
    if not counts:
        return ""
    return " (" + "; ".join(f"{m}: {n}" for n, m in counts) + ")"


def _deviation_lines(spec: Spec, tier: str, results: list[CellResult], notes: Footnotes) -> list[str]:
    lines = []
    overrides = _flatten(spec.tiers.get(tier, {}))
    if overrides:
        base = _flatten(spec.recipe.model_dump())
        changed = [f"`{k}`: {base.get(k, '–')} → {v}" for k, v in overrides.items()]
        lines.append(f"Deviations from the paper recipe at the {tier} tier: " + "; ".join(changed) + ".")
        if spec.tier_notes.get(tier):
            lines.append(spec.tier_notes[tier])
    substitutes = spec.tier_models.get(tier, {})
    if substitutes:
        lines.append(f"Models substituted at the {tier} tier: " +
                     "; ".join(f"{k} → {v}" for k, v in sorted(substitutes.items())) + ".")
    for key, p in sorted(spec.recipe_provenance.items()):
        notes.mark(f"recipe `{key}`: {p.source}" + (f", {p.note}" if p.note else ""))
    overridden = [r for r in results if r.overrides]
    if overridden:
        texts = list(dict.fromkeys(o for r in overridden for o in r.overrides))
        cells = "; ".join(f"{_pair(r)} {r.cell.method}" for r in overridden)
        lines.append("Deviations from the spec file, set on the command line: " +
                     ", ".join(f"`--set {t}`" for t in texts) + f" (cells: {cells}).")
    run_devs = sorted({d for r in results for x in r.results for d in x.get("deviations", [])})
    if run_devs:
        lines.append("Run-level settings recorded by the runs: " + "; ".join(run_devs) + ".")
    for note in spec.notes:
        lines.append(note)
    return [line + "\n" for line in lines]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def claims_markdown(sections: list[tuple[Plan, list[CellResult]]]) -> str:
    """Check each spec's claimed orderings per pair, over all cells of the output (a claim may span tables)."""
    from repro.harness.compare import ASSUMED_SEED_STD

    by_key = {(r.cell.teacher, r.cell.student, r.cell.method): r for _, rs in sections for r in rs}
    rows = []
    for plan, results in sections:
        for claim in plan.spec.claims:
            pairs = sorted({(r.cell.teacher, r.cell.student) for r in results if r.cell.method == claim.better})
            for teacher, student in pairs:
                better, worse = by_key.get((teacher, student, claim.better)), by_key.get((teacher, student, claim.worse))
                if better is None or worse is None or better.mean is None or worse.mean is None:
                    continue
                s_b, s_w = better.std or ASSUMED_SEED_STD, worse.std or ASSUMED_SEED_STD
                noise = 2 * (s_b**2 / max(better.n, 1) + s_w**2 / max(worse.n, 1)) ** 0.5
                gap = better.mean - worse.mean
                verdict = "holds" if gap >= 0 else ("holds within noise" if gap >= -noise else "violated")
                rows.append([f"{teacher} → {student}", f"{claim.better} ≥ {claim.worse}",
                             f"{better.mean:.2f} vs {worse.mean:.2f}", f"{gap:+.2f}", f"±{noise:.2f}", verdict])
    if not rows:
        return ""
    table = tabulate(rows, headers=["Pair", "Claim", "Reproduced", "Gap", "Noise (2·SE)", "Verdict"],
                     tablefmt="github", disable_numparse=True)
    return ("## Claims: the paper's orderings\n\nChecked on the reproduced numbers of this tier, per pair; a gap "
            "within twice the combined standard error counts as holding within noise (0.3-point seed std assumed "
            "where a cell has one seed).\n\n" + table + "\n")


def csv_rows(results: list[CellResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        rep = r.reported
        rows.append({
            "table": r.table, "spec": r.spec_id, "teacher": r.cell.teacher or "", "student": r.cell.student,
            "method": r.cell.method, "reported_mean": rep.mean, "reported_std": rep.std, "reported_n": rep.n,
            "reported_protocol": rep.protocol, "reported_status": rep.status, "reported_source": rep.source,
            "confidence": rep.confidence, "reported_note": rep.note, "reproduced_mean": r.mean,
            "reproduced_std": r.std, "n_seeds": r.n,
            "metric": _metric_text(r), "best_top1_mean": r.best_mean, "last_top1_mean": r.last_mean, "delta": r.delta,
            "tolerance": r.tolerance, "tier": r.tier, "verdict": r.verdict, "run_ids": " ".join(r.run_ids),
        })
    return rows


def stamp_lines(tier: str, plans: list[Plan], results: list[CellResult], command: str) -> list[str]:
    runs = [x for r in results for x in r.results]
    devices = sorted({x.get("device_name", "?") for x in runs}) or ["(no runs yet)"]
    commits = sorted({x.get("commit", "?") for x in runs}) or ["(no runs yet)"]
    hosts = sorted({x.get("hostname", "?") for x in runs}) or ["(no runs yet)"]
    seeds = sorted({x.get("seed") for x in runs if x.get("seed") is not None})
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    return [
        f"> **Tier: {tier}.** Generated by `{command}` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"at commit `{git_commit()}`.",
        f"> Runs: {len(runs)} finished; seeds {seeds or '–'}; device(s): {'; '.join(devices)}; "
        f"run commits: {', '.join(commits)}; run hosts: {', '.join(hosts)}.",
        f"> Libraries (renderer): {versions}.",
        *_teacher_checkpoint_lines(plans),
    ]


def _teacher_checkpoint_lines(plans: list[Plan]) -> list[str]:
    """What the teacher checkpoints are pinned by: their sha256 and where the lock came from."""
    from repro.models.teachers import lock_origin

    checkpoints = {run.config["model"]["arch"]: run.config for plan in plans for run in plan.ordered()
                   if run.config.get("kind") == "eval" and run.config.get("checkpoint")}
    if not checkpoints:
        return []
    pins = "; ".join(f"{arch} " + (f"`{c['checkpoint']['sha256'][:12]}`" if c["checkpoint"].get("sha256")
                                   else "(not downloaded when planned)") for arch, c in sorted(checkpoints.items()))
    origins = sorted({lock_origin(arch) for arch in checkpoints})
    gates = sorted({c.get("gate_tolerance") for c in checkpoints.values()}, key=str)
    gate = ("gated at " + " / ".join(f"±{g}" for g in gates if g is not None) + " points of the reported accuracy"
            if any(g is not None for g in gates) else "accuracy gate disabled (--no-teacher-gate)")
    return [f"> Teacher checkpoints (sha256): {pins}; {'; '.join(origins)}; {gate}."]


def render_output(output: str, tier: str, sections: list[tuple[Plan, list[CellResult]]], out_dir: Path,
                  command: str) -> tuple[Path, Path]:
    all_results = [r for _, rs in sections for r in rs]
    title = sections[0][0].spec.paper.upper() if sections else output
    parts = [f"# {title}: {output}", "", *stamp_lines(tier, [p for p, _ in sections], all_results, command), ""]
    if tier != "full":
        parts += [f"**These are {tier}-tier numbers**: they check that every cell runs end to end, not the paper's "
                  f"values; they are never called reproduced.", ""]
    hosts = {x.get("hostname", "?") for r in all_results for x in r.results}  # several: pooled from elsewhere
    for plan, results in sections:
        parts.append(section_markdown(plan.spec, tier, results, per_cell_origin=len(hosts) > 1))
    claims = claims_markdown(sections)
    if claims:
        parts.append(claims)
    parts += ["", VERDICT_RULE, ""]
    md_path, csv_path = out_dir / f"{output}.md", out_dir / f"{output}.csv"
    atomic_write_bytes(md_path, "\n".join(parts).encode())
    frame = pd.DataFrame(csv_rows(all_results), columns=CSV_COLUMNS)
    atomic_write_bytes(csv_path, frame.to_csv(index=False).encode())
    return md_path, csv_path
