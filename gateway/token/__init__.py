"""The token side: everything about obtaining and keeping the one managed token.

* ``value``: the token as a small frozen value, and the pure policy around it (usable?
  refresh or login?).
* ``renewal``: the renewal decision, one immutable state value and pure functions over it.
* ``manager``: the token manager that applies those decisions, single-flight.
* ``auth_client`` and ``parse``: the calls to the two auth endpoints and reading their answers.
* ``route_401``: which upstream 401s invalidate the token, and which routes refuse us anyway.
* ``file``: the optional token file.
* ``store`` and ``fleet``: the shared token store of a fleet (Redis) and what a replica does
  with it around an attempt.

Nothing here imports the proxy side.
"""
