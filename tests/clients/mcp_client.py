#!/usr/bin/env python3
"""The official MCP Python SDK (`mcp`) against memory-sidecar's `POST /mcp`.

Uses the SDK's streamable-HTTP client and ClientSession, as Claude Desktop-style hosts built on
it do, with `Authorization: Bearer <mk_ key>`. In the pinned SDK (mcp 2.x) the transport is
`mcp.client.streamable_http.streamable_http_client(url, http_client=...)`; the key goes in the
headers of the httpx2.AsyncClient it is given (1.x's `streamablehttp_client(url, headers=...)`
is gone).

Env: MR_BASE_URL (http://127.0.0.1:PORT) and MR_ADMIN_KEY (the daemon's admin key). Every check
mints its own keys. Stored memories are embedded in the background, so checks that need one to
be found poll (every 0.1 s, up to 30 s).

    python mcp_client.py            # every check
    python mcp_client.py --only NAME  # one check (repeatable; "check_" is optional)
    python mcp_client.py --list     # the checks' names; needs no daemon

Prints `ok  NAME` or `FAIL NAME: reason` plus a traceback per check, then `N passed, N failed`;
exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import httpx
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

POLL_SECONDS = 30.0
POLL_INTERVAL = 0.1
CHECK_SECONDS = 120.0
TOOLS = {"search_memories", "date_search_memories", "store_memory", "memory_status", "delete_memories"}

# ---------------------------------------------------------------------------------------------
# helpers


def base() -> str:
    return os.environ["MR_BASE_URL"].rstrip("/")


def admin_key() -> str:
    return os.environ["MR_ADMIN_KEY"]


def nonce() -> str:
    return str(random.randint(100_000, 999_999))


def short(value: Any, limit: int = 400) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def mint(**fields: Any) -> str:
    """A fresh mk_ key (and vault) from POST /v1/keys with the admin key."""
    body = {"name": f"mcp-{uuid.uuid4().hex[:8]}", **fields}
    resp = httpx.post(f"{base()}/v1/keys", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {admin_key()}"})
    assert resp.status_code == 201, f"POST /v1/keys: {resp.status_code} {short(resp.text)}"
    return resp.json()["key"]


@asynccontextmanager
async def connect(key: Optional[str], statuses: Optional[list[int]] = None) -> AsyncIterator[ClientSession]:
    """An initialized MCP session on {MR_BASE_URL}/mcp authenticated by `key`; `statuses`
    collects the HTTP status of every response."""
    async def record(response: httpx2.Response) -> None:
        if statuses is not None:
            statuses.append(response.status_code)

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60),
                                  event_hooks={"response": [record]}) as http:
        async with streamable_http_client(f"{base()}/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=30) as session:
                await session.initialize()
                yield session


def text_of(result: Any) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


async def tool(session: ClientSession, name: str, arguments: Optional[dict] = None) -> Any:
    """Calls a tool that must succeed; returns its JSON text content, parsed."""
    result = await session.call_tool(name, arguments or {})
    assert not result.is_error, f"{name} {short(arguments or {})}: tool error: {text_of(result)}"
    assert result.content and result.content[0].type == "text", f"{name}: content {result.content!r}"
    return json.loads(result.content[0].text)


async def poll(what: str, attempt: Callable[[], Awaitable[tuple[bool, Any]]]) -> Any:
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        done, observed = await attempt()
        if done:
            return observed
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {POLL_SECONDS:.0f} s; last: {short(observed)}")
        await asyncio.sleep(POLL_INTERVAL)


async def until_searchable(session: ClientSession, query: str, needle: str) -> dict:
    """Polls search_memories until a memory holding `needle` comes back; returns that memory."""
    async def attempt():
        found = await tool(session, "search_memories", {"query": query})
        hits = [m for m in found.get("memories", []) if needle in (m.get("content") or "")]
        return bool(hits), (hits[0] if hits else found)

    return await poll(f"search_memories finds {needle!r}", attempt)


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# checks (each an async function run under a time limit)


async def check_initialize():
    """initialize: a handshake protocol version, the server's name, the tools capability."""
    async with connect(mint()) as session:
        init = session.initialize_result
        assert init is not None and init.protocol_version in ("2025-11-25", "2025-06-18", "2025-03-26"), init
        assert init.server_info.name, init
        assert init.capabilities.tools is not None, f"no tools capability: {init.capabilities!r}"
        await session.send_ping()


async def check_list_tools():
    """list_tools: exactly the five memory tools, each with an object inputSchema."""
    async with connect(mint()) as session:
        listed = await session.list_tools()
        names = [t.name for t in listed.tools]
        assert set(names) == TOOLS and len(names) == len(TOOLS), f"tools: {names}"
        for t in listed.tools:
            assert isinstance(t.input_schema, dict) and t.input_schema.get("type") == "object", (
                f"{t.name}: inputSchema {t.input_schema!r}")
            assert t.description, f"{t.name}: no description"
        required = {t.name: set(t.input_schema.get("required", [])) for t in listed.tools}
        assert "query" in required["search_memories"] and "content" in required["store_memory"], required


async def check_store_then_search():
    """store_memory {content} then search_memories {query} finds it."""
    async with connect(mint()) as session:
        code = nonce()
        stored = await tool(session, "store_memory", {"content": f"My locker at the pool is number {code}."})
        assert stored.get("stored") == 1 and len(stored.get("ids", [])) == 1, short(stored)
        hit = await until_searchable(session, "Which locker do I use at the pool?", code)
        assert hit.get("id") == stored["ids"][0], f"found {short(hit)}, stored {short(stored)}"


async def check_date_search_window():
    """date_search_memories {since, until, query?} returns only memories inside the window."""
    async with connect(mint()) as session:
        first, second = nonce(), nonce()
        await tool(session, "store_memory", {"content": f"I planted the apple tree in the garden, tag {first}."})
        early = await until_searchable(session, "apple tree garden", first)
        await asyncio.sleep(1.2)
        await tool(session, "store_memory", {"content": f"I repainted the garden shed dark green, tag {second}."})
        late = await until_searchable(session, "garden shed paint", second)
        t1, t2 = instant(early["created_at"]), instant(late["created_at"])
        assert t2 - t1 >= timedelta(seconds=1), f"created_at {t1} and {t2} too close"
        middle = t1 + (t2 - t1) / 2

        async def window(**arguments: Any) -> list[str]:
            found = await tool(session, "date_search_memories", arguments)
            return [m.get("content") or "" for m in found.get("memories", [])]

        def holds(texts: list[str], tag: str) -> bool:
            return any(tag in t for t in texts)

        after = await window(since=rfc3339(middle), until=rfc3339(t2 + timedelta(seconds=5)))
        assert holds(after, second) and not holds(after, first), f"[middle, later]: {short(after)}"
        before = await window(since=rfc3339(t1 - timedelta(seconds=5)), until=rfc3339(middle))
        assert holds(before, first) and not holds(before, second), f"[earlier, middle]: {short(before)}"
        queried = await window(since=rfc3339(middle), until=rfc3339(t2 + timedelta(seconds=5)),
                               query="When did I plant the apple tree?")
        assert not holds(queried, first), f"a query pulled in a memory outside the window: {short(queried)}"
        empty = await window(since=rfc3339(t2 + timedelta(hours=1)), until=rfc3339(t2 + timedelta(hours=2)))
        assert not empty, f"a window after everything: {short(empty)}"


async def check_memory_status():
    """memory_status returns counts (memories, total_tokens)."""
    async with connect(mint()) as session:
        status = await tool(session, "memory_status")
        assert status.get("memories") == 0, f"a new vault: {short(status)}"
        code = nonce()
        await tool(session, "store_memory", {"content": f"My bike lock combination is {code}."})
        await until_searchable(session, "bike lock combination", code)
        status = await tool(session, "memory_status")
        assert status.get("memories") == 1, short(status)
        assert isinstance(status.get("total_tokens"), int) and status["total_tokens"] > 0, short(status)


async def check_delete_memory_by_id():
    """delete_memories {memory_id} removes that memory."""
    async with connect(mint()) as session:
        keep, drop = nonce(), nonce()
        await tool(session, "store_memory", {"content": f"My library card number is {keep}."})
        stored = await tool(session, "store_memory", {"content": f"My old library card number was {drop}."})
        hit = await until_searchable(session, "old library card number", drop)
        await until_searchable(session, "library card number", keep)
        assert hit["id"] == stored["ids"][0], short(hit)
        deleted = await tool(session, "delete_memories", {"memory_id": hit["id"]})
        assert deleted.get("deleted") == 1, short(deleted)
        found = await tool(session, "search_memories", {"query": "library card number"})
        ids = [m.get("id") for m in found.get("memories", [])]
        assert hit["id"] not in ids, f"deleted memory still found: {short(found)}"
        assert any(keep in (m.get("content") or "") for m in found["memories"]), short(found)
        status = await tool(session, "memory_status")
        assert status.get("memories") == 1, short(status)


async def check_read_scope_key_cannot_store():
    """A key minted with scopes ["read"]: store_memory is a tool error naming the write scope."""
    async with connect(mint(scopes=["read"])) as session:
        result = await session.call_tool("store_memory", {"content": "This must not be stored at all."})
        assert result.is_error, f"store_memory with a read-only key succeeded: {text_of(result)}"
        assert "write" in text_of(result).lower(), f"error text: {text_of(result)}"
        await tool(session, "search_memories", {"query": "anything stored"})   # reading still works


async def check_read_suffix_key_cannot_store():
    """A key with the `:read` suffix cannot store (and can still search)."""
    key = mint()
    async with connect(f"{key}:read") as session:
        result = await session.call_tool("store_memory", {"content": "This must not be stored either."})
        assert result.is_error, f"store_memory with a :read key succeeded: {text_of(result)}"
        await tool(session, "search_memories", {"query": "anything stored"})
    async with connect(key) as session:
        status = await tool(session, "memory_status")
        assert status.get("memories") == 0, f"the :read key stored something: {short(status)}"


async def check_wrong_key_rejected():
    """A wrong key (or none) fails to initialize, on HTTP 401."""
    key = mint()
    i = len(key) - 3
    wrong = key[:i] + ("A" if key[i] != "A" else "B") + key[i + 1:]
    for label, credential in (("corrupted key", wrong), ("no key", None)):
        statuses: list[int] = []
        try:
            async with connect(credential, statuses):
                pass
        except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 (SDK errors come wrapped)
            assert 401 in statuses, f"{label}: failed with statuses {statuses}: {error!r}"
        else:
            raise AssertionError(f"{label}: initialize succeeded (statuses {statuses})")


# ---------------------------------------------------------------------------------------------
# runner


def checks() -> dict[str, Callable[[], Awaitable[None]]]:
    return {name: fn for name, fn in globals().items() if name.startswith("check_") and callable(fn)}


def reason(error: BaseException) -> str:
    if isinstance(error, AssertionError):
        return str(error) or "assertion failed"
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(reason(e) for e in error.exceptions)
    if isinstance(error, TimeoutError):
        return f"no answer within {CHECK_SECONDS:.0f} s"
    return f"{type(error).__name__}: {error}"


async def run_one(check: Callable[[], Awaitable[None]]) -> None:
    await asyncio.wait_for(check(), CHECK_SECONDS)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this check (repeatable; the check_ prefix is optional)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    args = parser.parse_args(argv)
    table = checks()
    if args.list:
        print("\n".join(table))
        return 0
    selected = list(table)
    if args.only:
        selected = []
        for name in args.only:
            name = name if name.startswith("check_") else f"check_{name}"
            if name not in table:
                print(f"no check {name}; --list shows them", file=sys.stderr)
                return 2
            selected.append(name)
    missing = [v for v in ("MR_BASE_URL", "MR_ADMIN_KEY") if not os.environ.get(v)]
    if missing:
        print(f"set {' and '.join(missing)}", file=sys.stderr)
        return 2
    failed = 0
    for name in selected:
        try:
            asyncio.run(run_one(table[name]))
        except BaseException as error:  # noqa: BLE001 (a check's failure must not stop the run)
            if isinstance(error, KeyboardInterrupt):
                raise
            failed += 1
            print(f"FAIL {name}: {' '.join(reason(error).split())}")
            print("    " + traceback.format_exc().rstrip().replace("\n", "\n    "))
        else:
            print(f"ok  {name}")
        sys.stdout.flush()
    print(f"{len(selected) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
