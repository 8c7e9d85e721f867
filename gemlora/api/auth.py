"""Auth: API tokens, each bound to one account id, checked on every request.

Tokens come from a file (one `TOKEN ACCOUNT_ID` pair per line, `#` comments) and/or the environment
variable GEMLORA_API_TOKENS (`token:account,token:account`). With no tokens configured the server is
anonymous: any account id in the path is taken as given, and the OpenAI routes use "local". That
is allowed only on a loopback address unless explicitly forced. Knows headers and account ids only.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from gemlora.api.errors import ApiError, auth_error

ANONYMOUS_ACCOUNT = "local"


class Auth:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)
        self._token_bytes = [(t.encode("utf-8", "surrogateescape"), a) for t, a in self.tokens.items()]

    @classmethod
    def from_sources(cls, tokens_file: str | Path | None = None, env: str | None = None) -> Auth:
        tokens: dict[str, str] = {}
        if tokens_file:
            for n, line in enumerate(Path(tokens_file).read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{tokens_file}:{n}: expected 'TOKEN ACCOUNT_ID'")
                tokens[parts[0]] = parts[1]
        env = os.environ.get("GEMLORA_API_TOKENS", "") if env is None else env
        for pair in filter(None, (p.strip() for p in env.split(","))):
            token, sep, account = pair.partition(":")
            if not sep or not token or not account:
                raise ValueError("GEMLORA_API_TOKENS must look like 'token:account,token:account'")
            tokens[token] = account
        return cls(tokens)

    @property
    def anonymous(self) -> bool:
        return not self.tokens

    def account(self, authorization: str | None, path_account: str | None) -> str:
        """The caller's account; raises the API's auth error (10000) otherwise."""
        if self.anonymous:
            return path_account or ANONYMOUS_ACCOUNT
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise auth_error()
        # Bytes, not str: compare_digest refuses non-ASCII str, and a header may carry any Latin-1 byte.
        given = token.strip().encode("utf-8", "surrogateescape")
        account = None
        for known, acct in self._token_bytes:   # every token compared: the time says nothing of which matched
            if hmac.compare_digest(known, given):
                account = acct
        if account is None:
            raise auth_error()
        if path_account is not None and path_account != account:
            raise ApiError(10000, 403, "Authentication error")   # a valid token, for another account
        return account


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
