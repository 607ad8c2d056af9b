"""The release gate.

Passes only if, for every site:

1. the detector was validated (planted-copy targets and false-positive target met);
2. its synthetic flag rate is not significantly above its held-out baseline rate
   (one-sided Fisher exact test at ``alpha``), overall and per image type;
3. every flagged synthetic image is excluded from the released set;
4. its ε is known and within its declared cap (a site that trained without DP has ε = ∞);
5. every site that was asked to audit (``expected_sites``) returned an aggregate.

The verdict is recomputed from the report's data (never read from the stored verdict).
"""

from __future__ import annotations

from collections.abc import Mapping

from medisyn.audit import stats
from medisyn.audit.report import GateCheck, GateVerdict, SiteAggregate, SitePrivacy


def evaluate(sites: list[SiteAggregate], privacy: Mapping[str, SitePrivacy],
             released_ids: list[str], *, alpha: float = 0.01,
             expected_sites: list[str] | None = None,
             site_errors: Mapping[str, str] | None = None) -> GateVerdict:
    checks: list[GateCheck] = []
    if not sites:
        checks.append(GateCheck(name="sites", passed=False, detail="no site audited"))
    audited = {a.site_id for a in sites}
    for sid in sorted(set(expected_sites or []) - audited):
        why = (site_errors or {}).get(sid, "no aggregate received")
        checks.append(GateCheck(name=f"{sid}: site audited", passed=False, detail=why[:300]))
    released = set(released_ids)
    for a in sites:
        sid = a.site_id
        v = a.validation
        if v is None:
            checks.append(GateCheck(name=f"{sid}: detector validated", passed=False,
                                    detail="no validation result"))
        else:
            missed = [k for k, ok in v.targets_met.items() if not ok]
            checks.append(GateCheck(
                name=f"{sid}: detector validated", passed=bool(v.validated and not missed),
                detail=("detection " + ", ".join(f"{k} {r:.3f}" for k, r in v.detection_rate.items())
                        + f"; false positives {v.false_positive_rate:.3f}"
                        + (f"; targets missed: {', '.join(missed)}" if missed else ""))))
        for m in [a.overall, *a.image_types]:
            p = stats.fisher_greater(m.flagged.count, m.flagged.n, m.holdout_baseline.count,
                                     m.holdout_baseline.n)
            checks.append(GateCheck(
                name=f"{sid}/{m.image_type}: flag rate vs held-out baseline", passed=p >= alpha,
                detail=(f"synthetic {m.flagged.count}/{m.flagged.n} vs held-out "
                        f"{m.holdout_baseline.count}/{m.holdout_baseline.n}; one-sided Fisher "
                        f"p = {p:.3g} (alpha {alpha})")))
        leaked = sorted(set(a.flagged_ids) & released)
        checks.append(GateCheck(
            name=f"{sid}: flagged images excluded", passed=not leaked,
            detail=(f"{len(a.flagged_ids)} flagged, all excluded" if not leaked
                    else f"{len(leaked)} flagged image(s) in the released set: {', '.join(leaked[:10])}")))
        pr = privacy.get(sid, a.privacy)
        if pr.dp is False and pr.epsilon is None:
            checks.append(GateCheck(name=f"{sid}: ε within cap", passed=False,
                                    detail=f"the site trained without DP (ε = ∞); cap = {pr.max_epsilon}"))
        elif pr.epsilon is None or pr.max_epsilon is None:
            checks.append(GateCheck(name=f"{sid}: ε within cap", passed=False,
                                    detail=f"ε = {pr.epsilon}, cap = {pr.max_epsilon}: not reported"))
        else:
            ok = pr.epsilon <= pr.max_epsilon
            checks.append(GateCheck(name=f"{sid}: ε within cap", passed=ok,
                                    detail=f"ε = {pr.epsilon:.4g} (δ = {pr.delta}) vs cap {pr.max_epsilon:.4g}"))
    reasons = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    return GateVerdict(passed=not reasons, reasons=reasons, checks=checks)
