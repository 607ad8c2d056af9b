"""The release gate.

Passes only if, for every site:

1. the detector was validated: its planted-copy detection targets are met, and its
   false-positive rate is not shown to be above the target — the detector fails on false
   positives only when the lower bound of the rate's 95 % Wilson interval is above
   ``FALSE_POSITIVE_TARGET``. (A false positive costs utility — a flagged synthetic image
   is excluded from release — not privacy; a point estimate of 4/170 = 0.024 from ~170
   held-out images cannot show a 1 % rate either way.) The interval is reported;
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
from medisyn.audit.report import (
    CROSS_TYPE_GROUP,
    GateCheck,
    GateVerdict,
    SiteAggregate,
    SitePrivacy,
    ValidationSummary,
)

# The site validation's false-positive target (medisyn.audit.validate.TARGETS; kept here so
# the gate does not import the embedders).
FALSE_POSITIVE_TARGET = 0.01
EXACT_TARGET = 0.99


def detector_check(sid: str, v: ValidationSummary | None) -> GateCheck:
    """Detection targets from the site's validation; false positives by their interval."""
    name = f"{sid}: detector validated"
    if v is None:
        return GateCheck(name=name, passed=False, detail="no validation result")
    missed = [k for k, ok in v.targets_met.items() if not ok and k != "false_positive_rate"]
    exact = v.detection_rate.get("exact")
    if exact is not None and exact < EXACT_TARGET:
        missed.append("exact")
    fp = v.false_positive
    fp_shown_above = fp.ci_low > FALSE_POSITIVE_TARGET
    if fp_shown_above:
        missed.append("false positives")
    fp_text = (f"false positives {fp.count}/{fp.n} = {fp.rate:.3f} (95% CI {fp.ci_low:.3f}–{fp.ci_high:.3f}; "
               + (f"lower bound above the {FALSE_POSITIVE_TARGET:g} target" if fp_shown_above
                  else f"not shown above the {FALSE_POSITIVE_TARGET:g} target") + ")")
    return GateCheck(
        name=name, passed=not missed,
        detail=("detection " + ", ".join(f"{k} {r:.3f}" for k, r in v.detection_rate.items())
                + f"; {fp_text}" + (f"; targets missed: {', '.join(missed)}" if missed else "")))


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
    per_site = {sid: sum(a.site_id == sid for a in sites) for sid in audited}
    eps_checked: set[str] = set()
    for a in sites:
        # a site with several datasets has one aggregate (and one set of checks) per dataset
        sid = a.site_id if per_site[a.site_id] == 1 else f"{a.site_id} [{a.dataset}]"
        checks.append(detector_check(sid, a.validation))
        for m in [a.overall, *(t for t in a.image_types if t.image_type != CROSS_TYPE_GROUP)]:
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
        if a.site_id in eps_checked:  # ε is the site's, whatever it holds: checked once
            continue
        eps_checked.add(a.site_id)
        sid = a.site_id
        pr = privacy.get(a.site_id, a.privacy)
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
