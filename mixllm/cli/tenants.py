"""`mixllm keys`, `mixllm budgets` and `mixllm report`: the proxy's tenants, their API keys, their
spend and what routing saved."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

from mixllm.cli.common import run, state
from mixllm.core.errors import ConfigError

keys_app = typer.Typer(help="Create, list and revoke tenants' API keys for the chat proxy (stored hashed).",
                       no_args_is_help=True)


def _ledger(config):  # noqa: ANN001, ANN202
    from mixllm.io.ledger import TenantLedger
    from mixllm.io.store import InteractionLog

    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    return TenantLedger(store, key_cache_s=0)


@keys_app.command("create")
@run
def keys_create(tenant: Annotated[str, typer.Argument(help="A tenant listed in params.yaml budgets.tenants.")]) -> None:
    """Make a new API key for a tenant and print it once (only its hash is stored)."""
    config = state.config()
    if config.budgets.tenant(tenant) is None:
        names = ", ".join(t.name for t in config.budgets.tenants) or "none yet"
        raise ConfigError(f"no tenant '{tenant}' in params.yaml budgets.tenants (listed: {names}); add it there first")
    key_id, key = _ledger(config).create_key(tenant)
    typer.echo(key)
    typer.echo(f"key {key_id} for tenant {tenant}: shown once, stored as a hash. Send it as "
               "Authorization: Bearer <key> (the openai client's api_key).", err=True)


@keys_app.command("list")
@run
def keys_list() -> None:
    """Every key's id, tenant, and when it was created or revoked (never the key)."""
    frame = _ledger(state.config()).keys()
    if frame.empty:
        typer.echo("no keys yet; create one with `mixllm keys create TENANT`")
    for row in frame.itertuples():
        status = f"revoked {row.revoked_at}" if row.revoked_at is not None and str(row.revoked_at) != "NaT" else "active"
        typer.echo(f"{row.key_id}  {row.tenant:24s} created {row.created_at}  {status}")


@keys_app.command("revoke")
@run
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id, from `mixllm keys list`.")]) -> None:
    """Revoke a key: the service refuses it (401) within budgets.key_cache_s."""
    tenant = _ledger(state.config()).revoke(key_id)
    typer.echo(f"revoked key {key_id} of tenant {tenant}")


@run
def budgets_show() -> None:
    """Each tenant's budgets now: spent, budget, pace (spend / the budget line so far) and reset time."""
    from mixllm.core.budgets import binding

    config = state.config()
    if not config.budgets.tenants:
        typer.echo("no tenants in params.yaml budgets.tenants")
        return
    ledger, now = _ledger(config), datetime.now(timezone.utc)
    for tenant in config.budgets.tenants:
        allowed = ", ".join(tenant.allowed_llms) if tenant.allowed_llms is not None else "every LLM"
        typer.echo(f"{tenant.name} (when spent: {tenant.on_exhausted}; may use {allowed})")
        standing = ledger.standing(tenant, now, config.budgets.pacing.warmup_share)
        if not standing:
            typer.echo("  no budget")
        limit = binding(standing)
        for s in standing:
            flag = "SPENT" if s.exhausted else ("binding" if s is limit else "")
            typer.echo(f"  {s.period:5s} ${s.spent_usd:,.4f} of ${s.budget_usd:,.2f} ({100 * s.spent_usd / s.budget_usd:5.1f}%)"
                       f"  pace {s.pace:4.2f} at {100 * s.elapsed_share:4.1f}% of the {s.period}"
                       f"  resets {s.resets_at:%Y-%m-%d %H:%M} UTC  {flag}")


@run
def report_show(
    days: Annotated[Optional[float], typer.Option(help="Only the last DAYS days (default: every call).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole summary as JSON (what GET /stats answers).")] = False,
    link: Annotated[bool, typer.Option("--link", help="Print a signed /dashboard link for a browser, valid for an "
                                                      "hour (needs the admin token in the service's env var).")] = False,
) -> None:
    """What routing saved: the proxy's answered calls per tenant and model version, their traffic
    share per LLM, spend, what the same calls would have cost on the reference LLM, savings net of
    the router's compute, mean feedback quality and failovers."""
    import json
    from datetime import timedelta

    from mixllm.evaluation.savings import reference_llm, usage_summary

    config = state.config()
    if link:
        import os

        from mixllm.service.access import dashboard_link

        token = os.environ.get(config.service.auth_token_env)
        if not token:
            raise ConfigError(f"set {config.service.auth_token_env} to the service's admin token to sign a link "
                              "(without a token the service's /dashboard is open)")
        typer.echo(dashboard_link(f"http://{config.service.host}:{config.service.port}", token))
        return
    since = datetime.now(timezone.utc) - timedelta(days=days) if days else None
    calls = _ledger(config).calls_frame(since)
    summary = usage_summary(calls, config.service.router_usd_per_hour, reference_llm(config))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    overall = summary["overall"]
    if overall is None:
        typer.echo("no answered calls yet (the chat proxy records them: POST /v1/chat/completions)")
        return
    typer.echo(f"{overall['calls']} calls, {summary['first_call']} to {summary['last_call']}; reference: "
               f"{summary['reference_llm']}")
    typer.echo(f"spent ${overall['spend_usd']:.6f} + router ${overall['router_compute_usd']:.6f}; on the reference "
               f"${overall['reference_cost_usd']:.6f}; net savings ${overall['net_savings_usd']:.6f} "
               f"({overall['net_savings_pct']:.1f}%)")
    typer.echo(f"{'tenant':24s} {'version':9s} {'calls':>6s} {'spend $':>11s} {'reference $':>12s} "
               f"{'net saved $':>12s} {'quality':>7s} {'failovers':>9s}  traffic share")
    for g in summary["by_tenant_and_version"]:
        quality = "-" if g["mean_feedback_quality"] is None else f"{g['mean_feedback_quality']:.3f}"
        shares = ", ".join(f"{llm} {100 * share:.0f}%" for llm, share in g["traffic_share"].items())
        typer.echo(f"{g['tenant'][:24]:24s} {g['model_version']:9s} {g['calls']:6d} {g['spend_usd']:11.6f} "
                   f"{g['reference_cost_usd']:12.6f} {g['net_savings_usd']:12.6f} {quality:>7s} {g['failovers']:9d}  {shares}")
