"""Why no token can be had now: the 503 (and its ``Retry-After``) a waiting caller gets."""

from __future__ import annotations

from gateway.errors import CredentialContention, CredentialsRejected, TokenUnavailable
from gateway.token.renewal import Attempt, RenewalState


def unavailable(st: RenewalState, plan: Attempt | None, now: float, *, contended: bool,
                store_down: bool) -> TokenUnavailable:
    """The error for a caller who cannot get a token before its wait runs out, most specific
    first: rejected credentials, a refused auth request, contention (its token was revoked by
    someone else's login), then the last failure."""
    wait = max(0.0, plan.when - now) if plan is not None else 1.0
    if st.blocked == "invalid_credentials":
        return CredentialsRejected(
            "Repairy rejected the gateway's credentials; retrying in the background",
            retry_after=wait)
    if st.blocked is not None:
        return TokenUnavailable(
            f"Repairy refused the gateway's auth request ({st.blocked}); check the "
            "configuration", retry_after=wait)
    if contended and st.stale:
        return CredentialContention(
            "someone else logs in with the gateway's credentials and revoked its token; "
            "logging in again shortly", retry_after=max(wait, 1.0))
    if st.last_error:
        why = f"no usable access token: last renewal failed ({st.last_error})"
    elif st.stale:
        why = "no usable access token: the upstream refused it; renewing"
    elif store_down:
        why = "no usable access token: waiting for the token store"
    else:
        why = "no usable access token yet"
    return TokenUnavailable(why, retry_after=wait)
