"""Python client for the Specula inspector's introspection API.

The inspector serves HTTP/1.1 on a Unix socket (``inspector --api-socket PATH``);
this package speaks it with the standard library only. Names follow the API's
operation ids (docs/openapi.json), errors carry the API's ``code``, ``message``
and ``request_id``.

    from specula_client import Client
    c = Client("/run/specula/inspector-api.sock")
    print(c.status()["kind"])
    for p in c.os_processes():
        print(p["pid"], p["comm"])
"""

from .client import ApiError, Client, Event

__all__ = ["ApiError", "Client", "Event"]
