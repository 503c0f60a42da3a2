"""Test-only ``general_settings.custom_auth`` for the LiteLLM proxy: a fixed table of keys.

Virtual keys normally live in the proxy's PostgreSQL database (Prisma), which cannot be set up
offline; this stands in for it and hands the proxy the same ``UserAPIKeyAuth`` fields a
database key would carry (key alias, user, team), so the callbacks see what they see in
production.
"""

import os
import sys

from fastapi import HTTPException
from litellm.proxy._types import UserAPIKeyAuth

KEYS = {
    "sk-alice": {"key_alias": "alice-laptop", "user_id": "alice", "team_id": "team-search",
                 "team_alias": "search"},
    "sk-bob": {"key_alias": "bob-batch", "user_id": "bob", "team_id": "team-ads",
               "team_alias": "ads"},
    # what LiteLLM's own master-key check hands on: its placeholder user, no alias, no team
    "sk-master-test": {"user_id": "default_user_id", "user_role": "proxy_admin"},
}


# Not a caller: the tests' barrier (test_proxy_kit.py's FLUSH_KEY). A request with this key
# returns once llmtally's Tally in this proxy process has flushed: every call the proxy
# finished is in the ledger.
FLUSH_KEY = os.environ.get("PROXY_TEST_FLUSH_KEY")


async def user_api_key_auth(request, api_key):  # noqa: ANN001, ANN201 - LiteLLM's signature
    key = api_key.removeprefix("Bearer ").strip() if isinstance(api_key, str) else ""
    if FLUSH_KEY and key == FLUSH_KEY:
        if not await sys.modules["llmtally_callbacks"].tally.aflush(30):
            raise HTTPException(status_code=503, detail="the ledger did not flush in 30 s")
        return UserAPIKeyAuth(api_key="hashed-flush", user_id="flush")
    fields = KEYS.get(key)
    if fields is None:
        raise HTTPException(status_code=401, detail="unknown key")
    return UserAPIKeyAuth(api_key=f"hashed-{fields.get('key_alias', 'master')}", **fields)
