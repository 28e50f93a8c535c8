"""The one health check of an engine instance, for all that ask whether one serves: the daemon's supervisor
and the design document's ControlPlaneManager.

Healthy: its /health answers 200 and its /v1/models answers 200 with a model list that names the model
asked for (any, when none is asked for). /health alone says the API server is up, not that it serves the
model; /v1/models is behind the engine's key, so the client must carry it.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    why: str = ""  # what failed, for a message that names it; empty when healthy
    models: tuple[str, ...] = ()  # what its /v1/models lists


async def check(client: httpx.AsyncClient, url: str, model: str | None = None) -> Verdict:
    """Ask the instance at `url` (no trailing slash); never raises for what the instance answers or fails
    to answer."""
    try:
        health = await client.get(f"{url}/health")
        if health.status_code != 200:
            return Verdict(False, f"/health answered {_status(health)}")
        listing = await client.get(f"{url}/v1/models")
        if listing.status_code != 200:
            return Verdict(False, f"/v1/models answered {_status(listing)}")
        models = tuple(str(entry["id"]) for entry in listing.json()["data"])
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        return Verdict(False, str(error) or type(error).__name__)
    except (ValueError, LookupError, TypeError):
        return Verdict(False, "/v1/models answered no model list")
    if model is not None and model not in models:
        return Verdict(False, f"serves {', '.join(models) or 'no model'}, not {model}", models)
    return Verdict(True, models=models)


def _status(response: httpx.Response) -> str:
    return f"{response.status_code} {response.reason_phrase}".rstrip()
