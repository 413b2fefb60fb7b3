"""Reading the dashboard's pages through Flask's test client: a page's HTML (its status
checked) and a CSRF token for the forms' POSTs."""

from __future__ import annotations

import re

from flask.testing import FlaskClient

__all__ = ["page", "token"]


def page(client: FlaskClient, url: str, status: int = 200) -> str:
    """The HTML of *url*, which must answer *status*."""
    response = client.get(url)
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_data(as_text=True)


def token(client: FlaskClient) -> str:
    """A CSRF token the app accepts, as its dead letters page's forms carry it."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', page(client, "/dead-letters"))
    assert found is not None
    return found.group(1)
