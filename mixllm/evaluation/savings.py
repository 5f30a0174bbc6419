"""Proof of savings (pure maths, no I/O): what the proxy's answered calls cost, what the same calls
would have cost on the reference LLM, and the difference net of the router's own compute, per
tenant and per model version; and the dashboard's charts, drawn server-side (SVG, no CDN)."""

from __future__ import annotations

import html
import io
from typing import Any

import numpy as np
import pandas as pd

NO_TENANT = "(no tenant key)"
DIRECT = "named LLM"  # a call whose caller named the LLM: no routing decision, no model version


def reference_llm(config: Any) -> str | None:
    """What savings are measured against: evaluation.reference_llm, else the dearest LLM of the
    catalogue (where a team without a router sends everything)."""
    configured = config.evaluation.reference_llm
    if configured is not None or not config.llms:
        return configured
    return max(config.llms, key=lambda llm: llm.input_usd_per_1k + llm.output_usd_per_1k).name


def _group_summary(frame: pd.DataFrame, usd_per_router_hour: float) -> dict[str, Any]:
    calls = len(frame)
    spend = float(frame["cost_usd"].sum())
    reference = float(frame["reference_cost_usd"].fillna(frame["cost_usd"]).sum())
    router_usd = float(frame["router_ms"].fillna(0.0).sum()) / 3_600_000.0 * usd_per_router_hour
    rated = frame["feedback_quality"].dropna()
    shares = frame["llm"].value_counts(normalize=True).sort_index()
    return {"calls": calls, "traffic_share": {str(k): float(v) for k, v in shares.items()},
            "spend_usd": spend, "estimated_spend_usd": float(frame.loc[frame["estimated"].astype(bool), "cost_usd"].sum()),
            "reference_cost_usd": reference, "router_compute_usd": router_usd,
            "net_savings_usd": reference - spend - router_usd,
            "net_savings_pct": 100.0 * (reference - spend - router_usd) / reference if reference > 0 else None,
            "mean_feedback_quality": float(rated.mean()) if len(rated) else None, "feedback_count": int(len(rated)),
            "failovers": int((frame["attempts"] > 1).sum()),
            "mean_router_ms": float(frame["router_ms"].mean()) if frame["router_ms"].notna().any() else None}


def usage_summary(calls: pd.DataFrame, usd_per_router_hour: float, reference_llm: str | None) -> dict[str, Any]:
    """Overall, per tenant, and per tenant and model version (see `_group_summary` for the fields)."""
    frame = calls.assign(tenant=calls["tenant"].fillna(NO_TENANT).astype(str),
                         version=calls["model_version"].map(lambda v: DIRECT if pd.isna(v) else f"v{int(v)}"))
    out: dict[str, Any] = {"reference_llm": reference_llm, "router_usd_per_hour": usd_per_router_hour,
                           "first_call": str(frame["created_at"].min()) if len(frame) else None,
                           "last_call": str(frame["created_at"].max()) if len(frame) else None,
                           "overall": _group_summary(frame, usd_per_router_hour) if len(frame) else None,
                           "by_tenant": [], "by_tenant_and_version": []}
    for tenant, rows in frame.groupby("tenant", sort=True):
        out["by_tenant"].append({"tenant": tenant, **_group_summary(rows, usd_per_router_hour)})
    for (tenant, version), rows in frame.groupby(["tenant", "version"], sort=True):
        out["by_tenant_and_version"].append({"tenant": tenant, "model_version": version,
                                             **_group_summary(rows, usd_per_router_hour)})
    return out


# ------------------------------------------------------------------------------------- the page


def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # inline: drop the XML prolog and doctype


def charts(calls: pd.DataFrame, summary: dict[str, Any]) -> dict[str, str]:
    """SVG charts: traffic share per LLM, spend against the reference per tenant, cumulative spend,
    and per tenant the mean feedback quality and the share of calls that failed over."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    if not len(calls):
        return out
    shares = summary["overall"]["traffic_share"]
    figure, axis = plt.subplots(figsize=(6, 0.5 + 0.4 * len(shares)))
    axis.barh(list(shares), [100 * v for v in shares.values()], color="#4c72b0")
    axis.set_xlabel("share of answered calls, %")
    axis.set_title("Traffic share per LLM")
    out["traffic"] = _svg(figure)

    tenants = summary["by_tenant"]
    figure, axis = plt.subplots(figsize=(6, 0.8 + 0.6 * len(tenants)))
    positions = np.arange(len(tenants))
    axis.barh(positions + 0.2, [t["reference_cost_usd"] for t in tenants], height=0.4, label="on the reference LLM",
              color="#c44e52")
    axis.barh(positions - 0.2, [t["spend_usd"] + t["router_compute_usd"] for t in tenants], height=0.4,
              label="spent (with the router's compute)", color="#55a868")
    axis.set_yticks(positions, [t["tenant"] for t in tenants])
    axis.set_xlabel("USD")
    axis.set_title("Spend against the same calls on the reference LLM")
    axis.legend(loc="lower right", fontsize="small")
    out["spend"] = _svg(figure)

    ordered = calls.sort_values("created_at")
    figure, axis = plt.subplots(figsize=(6, 3))
    times = pd.to_datetime(ordered["created_at"])
    axis.plot(times, ordered["reference_cost_usd"].fillna(ordered["cost_usd"]).cumsum(), label="reference LLM",
              color="#c44e52")
    axis.plot(times, ordered["cost_usd"].cumsum(), label="routed", color="#55a868")
    axis.set_ylabel("cumulative USD")
    axis.set_title("Cumulative spend")
    axis.legend(fontsize="small")
    figure.autofmt_xdate()
    out["cumulative"] = _svg(figure)

    figure, (quality_axis, failover_axis) = plt.subplots(1, 2, figsize=(8, 0.8 + 0.6 * len(tenants)), sharey=True)
    rated = [t["mean_feedback_quality"] for t in tenants]
    quality_axis.barh(positions, [0.0 if q is None else q for q in rated], color="#8172b2")
    for row, (quality, tenant) in enumerate(zip(rated, tenants)):  # a tenant without feedback is not a 0
        quality_axis.text(0.01 if quality is None else quality + 0.01, row,
                          "no feedback" if quality is None else f"{quality:.2f} ({tenant['feedback_count']})",
                          va="center", fontsize="small")
    quality_axis.set_xlim(0, 1.25)
    quality_axis.set_yticks(positions, [t["tenant"] for t in tenants])
    quality_axis.set_xlabel("mean feedback quality (ratings)")
    failover_axis.barh(positions, [100.0 * t["failovers"] / t["calls"] for t in tenants], color="#ccb974")
    for row, tenant in enumerate(tenants):
        failover_axis.text(100.0 * tenant["failovers"] / tenant["calls"], row, f" {tenant['failovers']}",
                           va="center", fontsize="small")
    failover_axis.set_xlabel("calls answered after a failover, %")
    figure.suptitle("Quality and failovers per tenant")
    out["quality"] = _svg(figure)
    return out


def dashboard_html(summary: dict[str, Any], svgs: dict[str, str]) -> str:
    """The /dashboard page: the figures as a table (each cell has a data-field to read it by) and the charts."""
    def money(value: float | None) -> str:
        return "–" if value is None else f"${value:,.6f}"

    def cell(field: str, text: str) -> str:
        return f'<td data-field="{field}">{html.escape(text)}</td>'

    rows = []
    for group in summary["by_tenant_and_version"]:
        quality = group["mean_feedback_quality"]
        shares = ", ".join(f"{llm} {100 * share:.0f}%" for llm, share in group["traffic_share"].items())
        rows.append(f'<tr data-tenant="{html.escape(group["tenant"])}" data-version="{group["model_version"]}">'
                    + cell("tenant", group["tenant"]) + cell("model_version", group["model_version"])
                    + cell("calls", str(group["calls"])) + cell("traffic_share", shares)
                    + cell("spend_usd", money(group["spend_usd"]))
                    + cell("reference_cost_usd", money(group["reference_cost_usd"]))
                    + cell("router_compute_usd", money(group["router_compute_usd"]))
                    + cell("net_savings_usd", money(group["net_savings_usd"]))
                    + cell("mean_feedback_quality", "–" if quality is None else f"{quality:.3f}")
                    + cell("failovers", str(group["failovers"])) + "</tr>")
    overall = summary["overall"]
    headline = ("No answered calls yet." if overall is None else
                f'<span data-field="overall_net_savings_usd">{money(overall["net_savings_usd"])}</span> saved '
                f'(<span data-field="overall_net_savings_pct">{overall["net_savings_pct"]:.1f}%</span> of what '
                f'{html.escape(str(summary["reference_llm"]))} would have cost) over '
                f'<span data-field="overall_calls">{overall["calls"]}</span> calls, net of the router\'s compute.')
    header = "".join(f"<th>{name}</th>" for name in ("tenant", "model version", "calls", "traffic share", "spend",
                                                      "on the reference", "router compute", "net savings",
                                                      "mean feedback quality", "failovers"))
    figures = "".join(f'<figure id="chart-{name}">{svg}</figure>' for name, svg in svgs.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mixllm: savings</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1250px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em 1em 0 0}}</style></head>
<body><h1>mixllm: what routing saved</h1>
<p id="headline">{headline}</p>
<p>Reference: {html.escape(str(summary["reference_llm"]))}; the router's compute is priced at
${summary["router_usd_per_hour"]:g} an hour of routing time. Calls from {html.escape(str(summary["first_call"]))}
to {html.escape(str(summary["last_call"]))}.</p>
<table id="stats"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>
{figures}
</body></html>"""
