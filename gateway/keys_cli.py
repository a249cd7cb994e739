"""`tiergate keys create | list | revoke`: the admin API of a running gateway, from a terminal.

The CLI talks HTTP to the gateway (any store: memory or Redis) at --url (default $TIERGATE_URL or
http://127.0.0.1:8080) with the admin key from $TIERGATE_ADMIN_KEY.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"
BUDGET = re.compile(r"^\$?(?P<amount>\d+(?:\.\d*)?|\.\d+)(?:/(?P<period>day|month))?$")
TIMEOUT_S = 10.0
Command = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """Printed as its message, exit code 1."""


@dataclass(frozen=True)
class Budget:
    usd: float
    period: str


def parse_budget(text: str) -> Budget:
    """`5/day`, `0.50/month`, `$5` (period: day)."""
    found = BUDGET.match(text.strip().lower())
    if found is None or float(found["amount"]) <= 0:
        raise argparse.ArgumentTypeError(f"expected AMOUNT[/day|/month] with AMOUNT > 0, e.g. 5/day (got {text!r})")
    return Budget(float(found["amount"]), found["period"] or "day")


def parse_models(text: str) -> list[str]:
    return [model.strip() for model in text.split(",") if model.strip()]


def add_keys_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `keys` and its subcommands on the `tiergate` parser."""
    keys = commands.add_parser("keys", help="create, list and revoke managed API keys (needs $TIERGATE_ADMIN_KEY)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    url_default = os.environ.get("TIERGATE_URL", DEFAULT_URL)
    common.add_argument("--url", default=url_default, help=f"the gateway's base URL (default: {url_default})")

    create = actions.add_parser("create", parents=[common], help="create a key and print it (shown only once)")
    create.add_argument("--team", required=True)
    create.add_argument("--name", help="what the key is for (default: the team)")
    create.add_argument("--models", type=parse_models, default=[], help="a,b: models it may use (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--budget-usd", type=parse_budget, help="AMOUNT[/day|/month], e.g. 5/day")
    create.add_argument("--max-concurrent", type=int, help="requests in flight at once")
    create.add_argument("--expires-in-days", type=float, help="expires this many days from now")
    create.set_defaults(run=guarded(create_command))

    listing = actions.add_parser("list", parents=[common], help="list keys (prefixes only)")
    listing.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    listing.set_defaults(run=guarded(list_command))

    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key by id (its record is kept)")
    revoke.add_argument("id")
    revoke.set_defaults(run=guarded(revoke_command))


def call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One admin API call; its error message (or why the gateway could not be reached) as a CliError."""
    admin_key = os.environ.get("TIERGATE_ADMIN_KEY")
    if not admin_key:
        raise CliError("TIERGATE_ADMIN_KEY is not set: export the gateway's admin key to use `tiergate keys`")
    import httpx  # here, not at the top: `tiergate serve` imports this module and needs no HTTP client

    url = args.url.rstrip("/") + path
    try:
        response = httpx.request(
            method, url, json=body, headers={"authorization": f"Bearer {admin_key}"}, timeout=TIMEOUT_S
        )
    except httpx.HTTPError as error:
        raise CliError(f"cannot reach the gateway at {args.url}: {error}") from error
    try:
        payload = response.json()
    except ValueError as error:
        raise CliError(f"{method} {url}: HTTP {response.status_code}, not a JSON answer") from error
    if response.is_error:
        message = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
        raise CliError(f"error {response.status_code}: {message or response.text[:500]}")
    return payload


def create_command(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name or args.team, "team": args.team, "models": args.models}
    for field in ("rpm", "tpm", "max_concurrent", "expires_in_days"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.budget_usd is not None:
        body["budget_usd"] = args.budget_usd.usd
        body["budget_period"] = args.budget_usd.period
    created = call(args, "POST", "/admin/keys", body)
    print(f"created {created['id']} (team {created['team']}, name {created['name']})")
    print(f"\n  {created['key']}\n")
    print("Store this key now: it is not shown again (the gateway keeps only its hash).", file=sys.stderr)
    return 0


def list_command(args: argparse.Namespace) -> int:
    listing = call(args, "GET", "/admin/keys")
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    print(render_table(listing["data"]))
    return 0


def revoke_command(args: argparse.Namespace) -> int:
    revoked = call(args, "DELETE", f"/admin/keys/{args.id}")
    print(f"revoked {revoked['id']} at {when(revoked['revoked_at'])}")
    return 0


COLUMNS = ("id", "name", "team", "prefix", "models", "rpm", "tpm", "budget", "expires", "revoked")


def render_table(records: list[dict[str, Any]]) -> str:
    rows = [COLUMNS, *(row_of(record) for record in records)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def row_of(record: dict[str, Any]) -> tuple[str, ...]:
    budget = "-"
    if record.get("budget_usd") is not None:
        budget = f"{record['budget_usd']:g}/{record['budget_period']}"
    return (
        record["id"],
        record["name"],
        record["team"],
        record["prefix"] + "...",
        ",".join(record["models"]) or "*",
        "-" if record.get("rpm") is None else str(record["rpm"]),
        "-" if record.get("tpm") is None else str(record["tpm"]),
        budget,
        when(record.get("expires_at")),
        when(record.get("revoked_at")),
    )


def when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def guarded(command: Command) -> Command:
    """API errors (and an unset admin key) become one message on stderr and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CliError as error:
            print(f"tiergate keys: {error}", file=sys.stderr)
            return 1

    return run
