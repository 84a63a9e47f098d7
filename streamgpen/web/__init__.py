"""HTTP plumbing shared by the live preview and ``streamgpen serve``: ``server`` (uvicorn on a
socket bound up front, with the bounds a browser-facing server needs), ``auth`` (the token or
loopback guard), ``responses`` (strict JSON, errors as JSON, security headers)."""
