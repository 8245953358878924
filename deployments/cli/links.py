"""`textgen link add | list | remove`: the linked repositories (links.yaml)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from deployments.cli.app import Branch, Links, link_app
from deployments.service.providers import PROVIDERS
from tasks.errors import SettingsError


class Previews(StrEnum):
    """Which pull requests get a preview run."""

    all = "all"
    same_repo = "same-repo"
    off = "off"


class Provider(StrEnum):
    """Who reports a linked repository's pushes."""

    github = "github"
    gitea = "gitea"
    gitlab = "gitlab"
    hook = "hook"
    poll = "poll"


@link_app.command("add")
def link_add(
    url: Annotated[str, typer.Argument(help="Clone URL or local path, without credentials.")],
    name: Annotated[
        str | None, typer.Option(help="Unique name, also its deployment's (default: from URL).")
    ] = None,
    branch: Branch = "main",
    provider: Annotated[Provider, typer.Option(help="Who reports its pushes.")] = Provider.github,
    secret: Annotated[
        str | None, typer.Option(help="Webhook secret by reference: env:NAME or file:PATH.")
    ] = None,
    credentials: Annotated[
        str | None,
        typer.Option(help="Git credentials (user:token) by reference: env:NAME or file:PATH."),
    ] = None,
    poll: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Poll the remote every SECONDS.")
    ] = None,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KEY=VALUE",
            help="An operator limit for this repository, e.g. max_total_tokens=512 (repeatable).",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="API token for commit statuses and pull request comments, by reference: "
            "env:NAME or file:PATH (README: least scope per provider)."
        ),
    ] = None,
    api_url: Annotated[
        str | None,
        typer.Option(help="The provider's REST API root (default: from the URL's host)."),
    ] = None,
    repository: Annotated[
        str | None,
        typer.Option(help="owner/name on the provider (GitLab: the project path; default: URL)."),
    ] = None,
    previews: Annotated[
        Previews | None, typer.Option(help="Pull requests that get a preview run (default all).")
    ] = None,
    links: Links = None,
) -> int:
    """Link a repository (or replace the link of the same name)."""
    from pydantic import ValidationError

    from tasks.links import Link, default_name, links_path, load_links, problems, save_links

    path = links_path(links)
    existing = load_links(path)
    limits: dict[str, Any] = {}
    for pair in limit or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SettingsError(f"--limit {pair!r}: expected key=value, e.g. max_total_tokens=512")
        limits[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    fields: dict[str, Any] = {
        "name": name or default_name(url),
        "url": url,
        "branch": branch,
        "provider": provider.value,
        "secret": secret,
        "credentials": credentials,
        "poll": poll,
        "limits": limits,
        "token": token,
        "api_url": api_url,
        "repository": repository,
        "previews": previews.value if previews is not None else None,
    }
    try:
        link = Link.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(f"link {fields['name']!r}: {problems(exc)}") from None
    kept = [other for other in existing if other.name != link.name]
    save_links([*kept, link], path)
    verb = "replaced" if len(kept) < len(existing) else "added"
    print(f"{verb} link {link.name}: {link.url}@{link.branch} ({link.provider}) in {path}")
    return 0


@link_app.command("list")
def link_list(links: Links = None) -> int:
    """List the linked repositories."""
    from deployments.reports.tables import render_rows
    from tasks.links import links_path, load_links

    path = links_path(links)
    found = load_links(path)
    if not found:
        print(f"no linked repositories in {path}")
        return 0
    rows = [
        {
            "name": link.name,
            "repository": link.url,
            "branch": link.branch,
            "provider": link.provider,
            "secret": link.secret or "",
            "credentials": link.credentials or "",
            "token": link.token or "",
            "previews": link.previews if link.provider in PROVIDERS else "",
            "limits": ", ".join(f"{k}={v}" for k, v in link.limits.items()),
        }
        for link in found
    ]
    print(render_rows(rows))
    return 0


@link_app.command("remove")
def link_remove(
    name: Annotated[str, typer.Argument(help="The link's name.")], links: Links = None
) -> int:
    """Unlink a repository (its recorded versions stay in MLflow)."""
    from tasks.links import links_path, load_links, save_links

    path = links_path(links)
    found = load_links(path)
    kept = [link for link in found if link.name != name]
    if len(kept) == len(found):
        names = ", ".join(link.name for link in found) or "none"
        raise SettingsError(f"no link named {name!r} in {path}; linked: {names}")
    save_links(kept, path)
    print(f"removed link {name} from {path}; run `textgen team apply` to drop its deployment")
    return 0
