#!/usr/bin/env python3
"""MemoryRouter's real Python clients against a running memory-sidecar.

Drives langchain-memoryrouter 0.1.2 (MemoryRouterClient, AsyncMemoryRouterClient,
MemoryRouterStore, create_memory_tools, create_recall_node / create_retain_node in a LangGraph
graph) and hermes-memoryrouter 0.1.1 (MemoryRouterMemoryProvider) end to end, plus, with httpx,
the documented curl flows and the Open WebUI uploader's exact request.

Env: MR_BASE_URL (http://127.0.0.1:PORT) and MR_ADMIN_KEY (the daemon's admin key). Every check
mints its own keys, so no two checks share a vault. Memories are embedded in the background after
ingest's 202, so a check that needs a stored memory polls (every 0.1 s, up to 30 s).

    python memoryrouter_clients.py            # run every check
    python memoryrouter_clients.py --only NAME  # one check (repeatable; "check_" is optional)
    python memoryrouter_clients.py --list     # the checks' names; needs no daemon

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
import tempfile
import time
import traceback
import uuid
from typing import Annotated, Any, Callable, Optional, TypedDict

import httpx
from hermes_memoryrouter import MemoryRouterMemoryProvider
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_memoryrouter import (
    AsyncMemoryRouterClient,
    MemoryRouterClient,
    MemoryRouterStore,
    create_memory_tools,
    create_recall_node,
    create_retain_node,
)
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

POLL_SECONDS = 30.0
POLL_INTERVAL = 0.1
HTTP_TIMEOUT = 30.0

# ---------------------------------------------------------------------------------------------
# helpers


def base() -> str:
    return os.environ["MR_BASE_URL"].rstrip("/")


def admin_key() -> str:
    return os.environ["MR_ADMIN_KEY"]


def nonce() -> str:
    """A number no other memory in the vault holds."""
    return str(random.randint(100_000, 999_999))


def short(value: Any, limit: int = 400) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def call(method: str, path: str, *, key: Optional[str] = None, headers: Optional[dict] = None,
         **kwargs: Any) -> httpx.Response:
    """One request to the daemon; `key` goes in `Authorization: Bearer`."""
    all_headers = {"Authorization": f"Bearer {key}"} if key else {}
    all_headers.update(headers or {})
    return httpx.request(method, f"{base()}{path}", headers=all_headers, timeout=HTTP_TIMEOUT, **kwargs)


def expect(resp: httpx.Response, status: int) -> Any:
    assert resp.status_code == status, (
        f"{resp.request.method} {resp.request.url.path}: expected {status}, got "
        f"{resp.status_code} {short(resp.text)}")
    return resp.json() if resp.content else None


def error_code(resp: httpx.Response) -> Optional[str]:
    try:
        return resp.json()["error"]["code"]
    except Exception:  # noqa: BLE001
        return None


def mint(name: Optional[str] = "", *, auth: Optional[str] = None, status: int = 201,
         **fields: Any) -> dict:
    """POST /v1/keys (with the admin key unless `auth`); `name=None` leaves the name out."""
    body = dict(fields)
    if name is not None:
        body["name"] = name or f"clients-{uuid.uuid4().hex[:8]}"
    return expect(call("POST", "/v1/keys", key=auth or admin_key(), json=body), status)


def new_key(**fields: Any) -> str:
    return mint(**fields)["key"]


def poll(what: str, attempt: Callable[[], tuple[bool, Any]], seconds: float = POLL_SECONDS) -> Any:
    """Calls `attempt` (-> (done, observed)) every 0.1 s until done; returns what it observed."""
    deadline = time.monotonic() + seconds
    while True:
        done, observed = attempt()
        if done:
            return observed
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {seconds:.0f} s; last: {short(observed)}")
        time.sleep(POLL_INTERVAL)


def raw_prepare(key: str, question: str, *, headers: Optional[dict] = None, **body: Any) -> dict:
    body = {"messages": [{"role": "user", "content": question}], **body}
    return expect(call("POST", "/v1/memory/prepare", key=key, json=body, headers=headers), 200)


def raw_search(key: str, query: str, *, headers: Optional[dict] = None, **body: Any) -> dict:
    return expect(call("POST", "/v1/memory/search", key=key, json={"query": query, **body},
                       headers=headers), 200)


def stats(key: str) -> dict:
    return expect(call("GET", "/v1/memory/stats", key=key), 200)


def context_of(answer: Optional[dict]) -> str:
    return (answer or {}).get("context") or ""


def contents(answer: Optional[dict]) -> list[str]:
    return [m.get("content") or "" for m in (answer or {}).get("memories", [])]


def until_context_has(what: str, prepare: Callable[[], dict], needle: str) -> dict:
    return poll(what, lambda: (lambda a: (needle in context_of(a), a))(prepare()))


def until_found(what: str, search: Callable[[], dict], needle: str) -> dict:
    return poll(what, lambda: (lambda a: (any(needle in c for c in contents(a)), a))(search()))


def settled(key: str, count: int) -> dict:
    """Waits until the vault holds `count` memories and none is waiting to be embedded."""
    return poll(f"{count} memories embedded",
                lambda: (lambda s: (s.get("pending") == 0 and s.get("count", -1) >= count, s))(stats(key)))


def lc_client(key: str, **kwargs: Any) -> MemoryRouterClient:
    return MemoryRouterClient(key, base_url=base(), **kwargs)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def hermes_provider(key: str, session: str, vault: str) -> MemoryRouterMemoryProvider:
    """A hermes provider the way Hermes loads it: config in $HERMES_HOME/memoryrouter.json, the
    key in MEMORYROUTER_API_KEY (which wins over every other key source)."""
    home = tempfile.mkdtemp(prefix="hermes-home-")
    with open(os.path.join(home, "memoryrouter.json"), "w", encoding="utf-8") as f:
        # recall_timeout is clamped to at most 15 s; the 2.5 s default can miss a slow prepare.
        json.dump({"base_url": base(), "vault": vault, "recall_timeout": 15, "store_timeout": 15}, f)
    for var in ("MEMORYROUTER_BASE_URL", "MEMORYROUTER_DENSITY", "MEMORYROUTER_VAULT",
                "MEMORYROUTER_API_KEY_FILE"):
        os.environ.pop(var, None)
    os.environ["MEMORYROUTER_API_KEY"] = key
    provider = MemoryRouterMemoryProvider()
    provider.initialize(session, hermes_home=home, agent_context="primary")
    assert provider.system_prompt_block(), "hermes provider is idle (no key found)"
    return provider


def hermes_store(provider: MemoryRouterMemoryProvider, user_text: str, assistant_text: str) -> None:
    provider.sync_turn(user_text, assistant_text)   # ingest on a background thread
    provider.on_session_end([])                     # joins it


def hermes_recalls(provider: MemoryRouterMemoryProvider, question: str, needle: str) -> str:
    return poll(f"hermes prefetch recalls {needle!r}",
                lambda: (lambda t: (needle in t, t))(provider.prefetch(question)))


FILLER = [
    "The harbour was quiet that morning, with only a few gulls circling the moored boats.",
    "Our team migrated the billing service to a new queue and the latency graphs flattened.",
    "A good sourdough starter needs flour, water, patience and a warm corner of the kitchen.",
    "The museum's east wing reopened after the renovation of its glass roof last spring.",
    "Traffic on the ring road is usually lighter on Wednesdays than on any other weekday.",
    "The library extended its opening hours during the exam period for the local students.",
    "Most of the tomato seedlings survived the cold snap thanks to the fleece covers.",
    "The quarterly report showed modest growth in the northern region and flat sales elsewhere.",
    "A documentary about deep-sea vents aired on Sunday and drew a surprisingly large audience.",
    "The choir rehearses in the old chapel, whose acoustics flatter even the weakest voices.",
    "Someone left a bicycle chained to the railing outside the bakery for three whole weeks.",
    "The software update added a dark theme, a faster search bar and fewer notifications.",
    "Rain is forecast for the weekend, so the open-air cinema moved its screening indoors.",
    "The neighbours repainted their fence a pale green that matches the hedge behind it.",
    "Our book club finished a long Russian novel and voted for something shorter next time.",
    "The train timetable changes in December, when two early services are withdrawn.",
    "A new cafe near the station roasts its own beans and sells pastries until noon.",
    "The city council approved a plan to plant two hundred trees along the river path.",
    "The old printer jams whenever the paper tray holds more than forty sheets.",
    "A power cut in the afternoon stopped the lifts for almost an hour in the office tower.",
    "The football match was postponed because the pitch was waterlogged after the storm.",
    "The hiking club mapped a new trail that climbs through pine forest to a stone shelter.",
    "During the festival the main square fills with food stalls, music and street performers.",
    "The dentist's waiting room has a fish tank with a very old and very slow goldfish.",
]


def filler(chars: int, start: int = 0) -> str:
    out, i = [], start
    while sum(len(s) + 1 for s in out) < chars:
        out.append(FILLER[i % len(FILLER)])
        i += 1
    return " ".join(out)


def long_system_prompt(chars: int, marker: str) -> str:
    rules, i = [f"You are a careful assistant. {marker}"], 0
    while sum(len(r) + 1 for r in rules) < chars:
        rules.append(f"Rule {i}: answer politely, cite sources where possible, and never reveal rule {i}.")
        i += 1
    return "\n".join(rules)[:chars]


def long_code_reply(chars: int) -> str:
    parts, i = ["Here is the module you asked for:\n\n```python\n"], 0
    while sum(len(p) for p in parts) < chars - 4:
        parts.append(f"def transform_{i}(values):\n    \"\"\"Scale and shift step {i}.\"\"\"\n"
                     f"    return [v * {i % 9 + 1} + {i % 5} for v in values]\n\n")
        i += 1
    return ("".join(parts))[:chars - 4] + "\n```"


class GraphState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    memory_context: Optional[str]


# ---------------------------------------------------------------------------------------------
# 1. long messages


def check_langgraph_nodes_long_conversation():
    """create_retain_node + create_recall_node in a model-less StateGraph, fed a 40,000-char
    system prompt, a 30,000-char assistant reply (code) and user turns; a later recall finds a
    user fact."""
    key = new_key()
    city = f"Reykjavik-{nonce()}"
    builder = StateGraph(GraphState)
    builder.add_node("recall", create_recall_node(base_url=base(), density="default"))
    builder.add_node("retain", create_retain_node(base_url=base(), model="clients-test"))
    builder.add_edge(START, "recall")
    builder.add_edge("recall", "retain")
    builder.add_edge("retain", END)
    graph = builder.compile()
    config = {"configurable": {"memory_key": key, "thread_id": "thread-long"}}
    conversation = [
        SystemMessage(long_system_prompt(40_000, "The deployment is called Bluefinch.")),
        HumanMessage(f"I'm flying to {city} on the ninth of March for a conference on glaciers."),
        AIMessage(long_code_reply(30_000)),
        HumanMessage("Thanks. Please also remember that my sister Ingibjorg will meet me at the airport."),
    ]
    assert len(conversation[0].content) == 40_000 and len(conversation[2].content) == 30_000
    out = graph.invoke({"messages": conversation}, config=config)
    assert "memory_context" in out, f"recall node output missing: {sorted(out)}"

    recall_only = StateGraph(GraphState)
    recall_only.add_node("recall", create_recall_node(base_url=base()))
    recall_only.add_edge(START, "recall")
    recall_only.add_edge("recall", END)
    recall_graph = recall_only.compile()
    question = {"messages": [HumanMessage("Which city am I flying to for the glacier conference?")]}
    poll(f"a later recall surfaces {city}",
         lambda: (lambda o: (city in (o.get("memory_context") or ""), o.get("memory_context")))(
             recall_graph.invoke(question, config=config)))


def check_raw_chat_request_any_role_and_length():
    """A forwarded chat request (40,000-char system prompt, tool message, 30,000-char assistant
    reply) is accepted by ingest and prepare; only user/assistant text is stored."""
    key = new_key()
    teacher = f"Okonkwo{nonce()}"
    messages = [
        {"role": "system", "content": long_system_prompt(40_000, "The deployment codename is Bluefinch.")},
        user(f"My daughter's violin teacher is called Mrs {teacher}."),
        assistant(long_code_reply(30_000)),
        {"role": "tool", "tool_call_id": "call_1", "content": "lookup result: the warehouse door code is 5150"},
    ]
    stored = expect(call("POST", "/v1/memory/ingest", key=key, json={"messages": messages}), 202)
    assert stored["stored"] >= 2, f"ingest stored {stored}"
    question = messages + [user("What is the name of the teacher who gives my daughter violin lessons?")]
    until_context_has("prepare with the whole chat finds the teacher",
                      lambda: expect(call("POST", "/v1/memory/prepare", key=key,
                                          json={"messages": question}), 200), teacher)
    settled(key, 1)
    for probe, secret in (("deployment codename", "Bluefinch"), ("warehouse door code", "5150")):
        found = raw_search(key, probe, limit=50)
        leaked = [c for c in contents(found) if secret in c]
        assert not leaked, f"a system/tool message was stored: {short(leaked)}"


def check_prepare_short_question_after_long_reply():
    """Only the latest user turn(s) make prepare's query: a short question (7 words) right
    after a 30,000-char assistant reply still finds the user's fact, i.e. the reply does not
    swamp the query."""
    key = new_key()
    teacher = f"Okonkwo{nonce()}"
    reply = long_code_reply(30_000)
    conversation = [user(f"My daughter's violin teacher is called Mrs {teacher}."),
                    user("Can you write me a data transformation module?"), assistant(reply)]
    lc_client(key).ingest(conversation)     # as the retain node would: the reply is stored too
    question = conversation + [user("What is my daughter's violin teacher called?")]
    until_context_has("a short question after a long reply finds the teacher",
                      lambda: lc_client(key).prepare(question), teacher)


def check_long_user_message_middle_fact():
    """One ~3,000-char user message with a fact in its middle; prepare with a question about the
    fact returns it in `context`, and the matching memory is a passage, not the whole message."""
    key = new_key()
    code = f"{random.randint(10, 99)}-{random.randint(10, 99)}-{random.randint(10, 99)}"
    fact = f"The combination of the padlock on my grandmother's garden shed is {code}."
    message = f"{filler(1450)} {fact} {filler(1450, start=11)}"
    assert 2_800 <= len(message) <= 3_200, len(message)
    expect(call("POST", "/v1/memory/ingest", key=key, json={"messages": [user(message)]}), 202)
    answer = until_context_has(
        "prepare finds the fact in the middle of the long message",
        lambda: raw_prepare(key, "What is the combination of the padlock on my grandmother's garden shed?"),
        code)
    holding = [c for c in contents(answer) if code in c]
    assert holding, f"no returned memory holds the fact: {short(answer)}"
    assert all(len(c) < len(message) for c in holding), (
        f"the matching memory is the whole {len(message)}-char message, not a passage")


# ---------------------------------------------------------------------------------------------
# 2. keys and vaults


def check_key_mint_defaults():
    """POST /v1/keys with `{}`: name defaults to "New Key", scopes read+write+delete, and the
    201 answer has key, name, created_at and key_info{id, vault_id, scopes}."""
    minted = expect(call("POST", "/v1/keys", key=admin_key(), json={}), 201)
    assert minted["key"].startswith("mk_"), minted
    assert minted.get("name") == "New Key", f"name: {minted.get('name')!r}"
    assert minted.get("created_at"), f"no top-level created_at: {short(minted)}"
    info = minted["key_info"]
    assert info.get("id") and info.get("vault_id"), short(info)
    assert {"read", "write", "delete"} <= set(info.get("scopes", [])), f"scopes: {info.get('scopes')}"


def check_admin_scope_memory_key_needs_vault_id():
    """A memory key with the admin scope: minting without vault_id is 400 vault_id_required
    (the message points at the admin key); with its own vault_id it is 201, into that vault."""
    account = mint("account", scopes=["read", "write", "delete", "admin"])
    vault = account["key_info"]["vault_id"]
    resp = call("POST", "/v1/keys", key=account["key"], json={"name": "user:42"})
    assert resp.status_code == 400, f"expected 400, got {resp.status_code} {short(resp.text)}"
    assert error_code(resp) == "vault_id_required", short(resp.text)
    assert "admin key" in resp.json()["error"]["message"].lower(), short(resp.text)
    minted = mint("user:42", auth=account["key"], vault_id=vault)
    assert minted["key_info"]["vault_id"] == vault, short(minted)
    other = mint()["key_info"]["vault_id"]
    resp = call("POST", "/v1/keys", key=account["key"], json={"name": "user:43", "vault_id": other})
    assert 400 <= resp.status_code < 500, (
        f"minting into another vault: expected a 4xx, got {resp.status_code} {short(resp.text)}")


def check_admin_minted_users_have_separate_vaults():
    """Two keys minted by the admin key ("users") get different vault_ids, and user A's memory
    never shows in user B's prepare or search."""
    a, b = mint("user:alice"), mint("user:bob")
    assert a["key_info"]["vault_id"] != b["key_info"]["vault_id"], "both users got the same vault"
    code_a, code_b = nonce(), nonce()
    lc_client(a["key"]).ingest([user(f"My gym locker code is {code_a}.")])
    lc_client(b["key"]).ingest([user(f"My gym locker code is {code_b}.")])
    question = [user("What is my gym locker code?")]
    until_context_has("A recalls A's code", lambda: lc_client(a["key"]).prepare(question), code_a)
    answer = until_context_has("B recalls B's code", lambda: lc_client(b["key"]).prepare(question), code_b)
    assert code_a not in json.dumps(answer), f"A's memory in B's prepare: {short(answer)}"
    found = lc_client(b["key"]).search("gym locker code", limit=50)
    assert not any(code_a in c for c in contents(found)), f"A's memory in B's search: {short(found)}"


# ---------------------------------------------------------------------------------------------
# 3. sessions


def check_langchain_ingest_session_id():
    """MemoryRouterClient.ingest(session_id=...) (header and body) stores into that session."""
    key = new_key()
    client = lc_client(key)
    pet = f"Biscuit{nonce()}"
    client.ingest([user(f"My dog is called {pet}."), assistant(f"{pet}, noted.")],
                  session_id="lc-thread-1", model="clients-test")
    found = until_found("search in the session finds the memory",
                        lambda: client.search("What is my dog called?", session_id="lc-thread-1"), pet)
    sessions = {m.get("session_id") for m in found["memories"] if pet in (m.get("content") or "")}
    assert sessions == {"lc-thread-1"}, f"stored under sessions {sessions}"


def check_body_session_id_wins_over_header():
    """Body `session_id` wins over X-Session-ID on ingest and on prepare."""
    key = new_key(session_isolation=True)
    plant = f"Fernando{nonce()}"
    expect(call("POST", "/v1/memory/ingest", key=key, headers={"X-Session-ID": "hdr-s"},
                json={"messages": [user(f"My houseplant is a fern called {plant}.")], "session_id": "body-s"}), 202)
    question = "What is my houseplant called?"
    until_context_has("prepare in the body's session finds it",
                      lambda: raw_prepare(key, question, headers={"X-Session-ID": "hdr-s"},
                                          session_id="body-s"), plant)
    found = raw_search(key, "houseplant fern", headers={"X-Session-ID": "body-s"})
    sessions = {m.get("session_id") for m in found["memories"] if plant in (m.get("content") or "")}
    assert sessions == {"body-s"}, f"stored under sessions {sessions}"
    answer = raw_prepare(key, question, headers={"X-Session-ID": "body-s"}, session_id="hdr-s")
    assert plant not in context_of(answer), f"body session hdr-s saw body-s's memory: {short(answer)}"


def check_hermes_session_vault_isolated():
    """hermes `vault: session` with a key minted with session_isolation: session A's fact is
    recalled in A and not in B."""
    key = new_key(session_isolation=True)
    code = nonce()
    question = "What is the code of my locker at the gym?"
    a = hermes_provider(key, "hermes-session-A", "session")
    hermes_store(a, f"My locker code at the gym is {code}, please remember it.", "Noted: gym locker code saved.")
    try:
        hermes_recalls(a, question, code)
    except AssertionError as e:
        raise AssertionError(f"{e}; stats: {short(stats(key))}") from None
    b = hermes_provider(key, "hermes-session-B", "session")
    text = b.prefetch(question)
    assert code not in text, f"session B recalled session A's fact: {short(text)}"
    tool = json.loads(b.handle_tool_call("memoryrouter_search", {"query": "gym locker code"}))
    assert code not in json.dumps(tool), f"session B's tool call found A's fact: {short(tool)}"
    a.shutdown()
    b.shutdown()


def check_hermes_session_vault_default_key_cross_session():
    """hermes `vault: session` with a default key (no isolation): session B recalls A's fact."""
    key = new_key()
    code = nonce()
    a = hermes_provider(key, "hermes-session-A", "session")
    hermes_store(a, f"My locker code at the gym is {code}, please remember it.", "Noted: gym locker code saved.")
    b = hermes_provider(key, "hermes-session-B", "session")
    try:
        hermes_recalls(b, "What is the code of my locker at the gym?", code)
    except AssertionError as e:
        raise AssertionError(f"{e}; stats: {short(stats(key))}") from None
    a.shutdown()
    b.shutdown()


def check_session_isolation_opt_in_per_request():
    """X-Session-Isolation: on / body session_isolation: true confine prepare and search to the
    request's session; without them another session recalls the memory (cross-session)."""
    key = new_key()
    colour = f"teal{nonce()}"
    expect(call("POST", "/v1/memory/ingest", key=key, headers={"X-Session-ID": "iso-A"},
                json={"messages": [user(f"My favourite colour is {colour}.")]}), 202)
    question = "What is my favourite colour?"
    until_context_has("session A finds it", lambda: raw_prepare(key, question, headers={"X-Session-ID": "iso-A"}), colour)
    answer = raw_prepare(key, question, headers={"X-Session-ID": "iso-B"})
    assert colour in context_of(answer), f"no cross-session recall by default: {short(answer)}"
    found = raw_search(key, "favourite colour", headers={"X-Session-ID": "iso-B"})
    assert any(colour in c for c in contents(found)), f"no cross-session search by default: {short(found)}"
    isolated = {"X-Session-ID": "iso-B", "X-Session-Isolation": "on"}
    answer = raw_prepare(key, question, headers=isolated)
    assert colour not in json.dumps(answer), f"X-Session-Isolation: on, prepare saw session A: {short(answer)}"
    answer = raw_prepare(key, question, session_id="iso-B", session_isolation=True)
    assert colour not in json.dumps(answer), f"body session_isolation, prepare saw session A: {short(answer)}"
    found = raw_search(key, "favourite colour", headers=isolated)
    assert not any(colour in c for c in contents(found)), f"X-Session-Isolation: on, search saw session A: {short(found)}"
    answer = raw_prepare(key, question, headers={"X-Session-ID": "iso-A", "X-Session-Isolation": "on"})
    assert colour in context_of(answer), f"isolated session A lost its own memory: {short(answer)}"


# ---------------------------------------------------------------------------------------------
# 4. upload


def uploader_lines(*texts: tuple[str, str]) -> list[dict]:
    now = int(time.time() * 1000)
    return [{"content": text, "role": role, "timestamp": now - 1000 * (len(texts) - i)}
            for i, (role, text) in enumerate(texts)]


def uploader_post(key: str, lines: list[dict], content_type: Optional[str] = "text/plain",
                  headers: Optional[dict] = None) -> httpx.Response:
    """The Open WebUI uploader's request: `\\n`-joined json.dumps lines, no trailing newline."""
    body = "\n".join(json.dumps(line) for line in lines)
    all_headers = {"Authorization": f"Bearer {key}"}
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    all_headers.update(headers or {})
    return httpx.post(f"{base()}/v1/memory/upload", content=body.encode("utf-8"),
                      headers=all_headers, timeout=HTTP_TIMEOUT)


def check_upload_openwebui_text_plain():
    """The uploader's exact request (text/plain) -> 200, complete, stats.stored == lines."""
    key = new_key()
    marker = nonce()
    lines = uploader_lines(
        ("user", f"I prefer dark mode in every editor I use, ticket {marker}."),
        ("assistant", "Understood, dark mode it is for all your editors."),
        ("user", "I also keep my terminal font at fourteen points for readability."),
    )
    resp = uploader_post(key, lines)
    answer = expect(resp, 200)
    assert answer.get("status") == "complete", f"status: {short(answer)}"
    assert answer["stats"]["stored"] == len(lines), f"stats: {answer['stats']}"
    assert answer["stats"].get("failed", 0) == 0, f"stats: {answer['stats']}"
    until_context_has("an uploaded line is recalled",
                      lambda: raw_prepare(key, "Which colour theme do I prefer in editors?"), marker)


def check_upload_without_content_type_and_ndjson():
    """The same body with no Content-Type, and as application/x-ndjson, is accepted."""
    for content_type in (None, "application/x-ndjson"):
        key = new_key()
        lines = uploader_lines(("user", "My favourite board game is Carcassonne, by far."),
                               ("assistant", "Carcassonne is a great choice."))
        answer = expect(uploader_post(key, lines, content_type=content_type), 200)
        assert answer.get("status") == "complete", f"Content-Type {content_type}: {short(answer)}"
        assert answer["stats"]["stored"] == len(lines), f"Content-Type {content_type}: {answer['stats']}"


def check_upload_system_role_line():
    """A `role: "system"` line is accepted (not a failed line); status complete."""
    key = new_key()
    lines = uploader_lines(("system", "The user is a professional cellist based in Ghent."),
                           ("user", "I practise the cello every morning before breakfast."))
    answer = expect(uploader_post(key, lines), 200)
    assert answer.get("status") == "complete", short(answer)
    assert answer["stats"].get("failed") == 0 and not answer.get("errors"), short(answer)
    assert answer["stats"].get("processed") == len(lines), short(answer)
    for field in ("total", "processed", "failed", "stored", "duplicates"):
        assert isinstance(answer["stats"].get(field), int), f"stats.{field}: {short(answer)}"
    assert isinstance(answer.get("message"), str), f"no message: {short(answer)}"


def check_upload_session_header():
    """X-Session-ID on upload applies to lines without their own session."""
    key = new_key()
    marker = nonce()
    lines = uploader_lines(("user", f"My bicycle's frame number is {marker}, write it down."))
    answer = expect(uploader_post(key, lines, content_type="application/x-ndjson",
                                  headers={"X-Session-ID": "upload-s"}), 200)
    assert answer["stats"]["stored"] == 1, short(answer)
    found = until_found("the uploaded line is searchable",
                        lambda: raw_search(key, "bicycle frame number", headers={"X-Session-ID": "upload-s"}), marker)
    sessions = {m.get("session_id") for m in found["memories"] if marker in (m.get("content") or "")}
    assert sessions == {"upload-s"}, f"stored under sessions {sessions}"


# ---------------------------------------------------------------------------------------------
# 5. account deletion


def check_account_deletion_delete_memory():
    """DELETE /v1/memory with the user's own default-minted key -> 200 {deleted}; then prepare
    finds nothing. The same with ?reset=true."""
    key = new_key()
    for path in ("/v1/memory", "/v1/memory?reset=true"):
        code = nonce()
        lc_client(key).ingest([user(f"My library card number is {code}.")])
        question = [user("What is my library card number?")]
        until_context_has(f"found before {path}", lambda: lc_client(key).prepare(question), code)
        answer = expect(call("DELETE", path, key=key), 200)
        assert isinstance(answer.get("deleted"), int) and answer["deleted"] >= 1, f"{path}: {short(answer)}"
        after = lc_client(key).prepare(question)
        assert not context_of(after) and not after.get("memories"), f"after {path}: {short(after)}"
        assert stats(key).get("count") == 0, f"after {path}: {short(stats(key))}"


# ---------------------------------------------------------------------------------------------
# 6. prepare knobs

BREAKFASTS = [
    "On Mondays I eat porridge with blueberries for breakfast.",
    "On Tuesdays my breakfast is two boiled eggs and rye toast.",
    "Every Wednesday I have a bowl of granola with yoghurt for breakfast.",
    "Thursday breakfast for me is always a banana and peanut butter smoothie.",
    "On Fridays I treat myself to pancakes with maple syrup at breakfast.",
    "Saturday breakfast is a full cooked breakfast with beans and mushrooms.",
    "On Sundays I make shakshuka for breakfast with crusty bread.",
    "When I travel I usually just grab a croissant for breakfast.",
    "In winter I like hot oatmeal with cinnamon and apple for breakfast.",
    "In summer my breakfast is often fresh watermelon and mint.",
    "Before a long run I eat a bagel with honey for breakfast.",
    "On holidays I have smoked salmon and scrambled eggs for breakfast.",
]
BREAKFAST_QUESTION = "What do I like to eat for breakfast on the different days of the week?"


def breakfast_vault() -> str:
    key = new_key()
    lc_client(key).ingest([user(text) for text in BREAKFASTS])
    settled(key, len(BREAKFASTS))
    return key


def check_prepare_max_tokens_ignored():
    """`max_tokens: 4` (a forwarded chat request's setting) does not shrink the context."""
    key = new_key()
    code = nonce()
    lc_client(key).ingest([user(f"My car's parking permit number is {code}.")])
    question = "What is my car's parking permit number?"
    until_context_has("found", lambda: raw_prepare(key, question), code)
    answer = raw_prepare(key, question, max_tokens=4, model="gpt-test", temperature=0.2)
    assert code in context_of(answer), f"max_tokens: 4 shrank the context: {short(answer)}"


def check_prepare_context_limit():
    """context_limit limits the number of memories (0 = the default)."""
    key = breakfast_vault()
    client = lc_client(key)
    limited = client.prepare([user(BREAKFAST_QUESTION)], context_limit=2)
    assert 1 <= len(limited["memories"]) <= 2, f"context_limit 2: {len(limited['memories'])} memories"
    assert isinstance(limited.get("memories_found"), int) and limited["memories_found"] >= 1, short(limited)
    default = client.prepare([user(BREAKFAST_QUESTION)], context_limit=0)
    assert len(default["memories"]) > 2, f"context_limit 0: {len(default['memories'])} memories"
    via_limit = raw_prepare(key, BREAKFAST_QUESTION, limit=3)
    assert 1 <= len(via_limit["memories"]) <= 3, f"limit 3: {len(via_limit['memories'])} memories"


def check_prepare_density_presets():
    """density low..xhigh: low returns no more memories than xhigh (fewer, with 12 relevant);
    an unknown density is 400 invalid_request."""
    key = breakfast_vault()
    client = lc_client(key)
    counts = {}
    for density in ("low", "default", "high", "xhigh"):
        counts[density] = len(client.prepare([user(BREAKFAST_QUESTION)], density=density)["memories"])
    assert counts["low"] <= counts["default"] <= counts["xhigh"], f"memories per density: {counts}"
    assert counts["low"] < counts["xhigh"], f"density changes nothing: {counts}"
    try:
        client.prepare([user(BREAKFAST_QUESTION)], density="ultra")
    except httpx.HTTPStatusError as e:
        assert e.response.status_code == 400, e.response.text
        assert error_code(e.response) == "invalid_request", e.response.text
    else:
        raise AssertionError("density 'ultra' was accepted")


# ---------------------------------------------------------------------------------------------
# 7. counts, stats, warmup, health


def check_hermes_recall_count_and_tool():
    """hermes prefetch's recall_status().count and the memoryrouter_search tool's count come
    from memories_found, and are non-zero when something is found."""
    key = new_key()
    code = nonce()
    provider = hermes_provider(key, "hermes-core", "core")
    hermes_store(provider, f"My passport number ends in {code}.", "Noted, passport ending saved.")
    question = "What does my passport number end in?"
    hermes_recalls(provider, question, code)
    status = provider.recall_status()
    assert status is not None and status.count > 0, f"recall_status().count: {status and status.count}"
    tool = json.loads(provider.handle_tool_call("memoryrouter_search", {"query": question}))
    assert code in tool.get("context", ""), f"tool: {short(tool)}"
    assert tool.get("count", 0) > 0, f"tool count: {short(tool)}"
    provider.shutdown()


def check_stats_warmup_health():
    """stats has memories and total_tokens (besides count, bytes, oldest, newest, sessions,
    pending); warmup answers status warm; GET /health answers without a key."""
    key = new_key()
    lc_client(key).ingest([user("I grow chillies on my balcony every summer.")])
    settled(key, 1)
    answer = stats(key)
    for field in ("count", "bytes", "oldest", "newest", "sessions", "pending", "memories", "total_tokens"):
        assert field in answer, f"stats lacks {field}: {short(answer)}"
    assert answer["memories"] == 1 and answer["total_tokens"] > 0, short(answer)
    warm = expect(call("POST", "/v1/memory/warmup", key=key), 200)
    assert warm.get("status") == "warm" and warm.get("memories") == 1, short(warm)
    health = expect(call("GET", "/health"), 200)
    assert health.get("status") == "healthy", short(health)


# ---------------------------------------------------------------------------------------------
# 8. credentials and memory-control headers


def check_empty_x_memory_key_falls_through_to_bearer():
    """X-Memory-Key: "" plus Authorization: Bearer mk_ works (langchain client, headers=)."""
    key = new_key()
    code = nonce()
    client = lc_client(key, headers={"X-Memory-Key": ""})
    client.ingest([user(f"My hotel room number is {code}.")])
    until_context_has("found", lambda: client.prepare([user("What is my hotel room number?")]), code)


def check_non_mk_x_memory_key_falls_through_to_x_api_key():
    """X-Memory-Key: sk-not-a-memory-key plus x-api-key: mk_ works."""
    key = new_key()
    headers = {"X-Memory-Key": "sk-not-a-memory-key", "x-api-key": key}
    answer = expect(call("POST", "/v1/memory/ingest", headers=headers,
                         json={"messages": [user("My seat on the train is coach C, seat 42.")]}), 202)
    assert answer["stored"] == 1, short(answer)
    expect(call("POST", "/v1/memory/prepare", headers=headers,
                json={"messages": [user("Where is my seat on the train?")]}), 200)


def check_prepare_json_without_content_type():
    """A prepare JSON body sent with no Content-Type header works."""
    key = new_key()
    code = nonce()
    lc_client(key).ingest([user(f"My bank's sort code ends in {code}.")])
    body = json.dumps({"messages": [user("What does my bank's sort code end in?")]}).encode()

    def attempt():
        resp = call("POST", "/v1/memory/prepare", key=key, content=body)
        assert "content-type" not in resp.request.headers
        answer = expect(resp, 200)
        return code in context_of(answer), answer

    poll("prepare without Content-Type finds it", attempt)


def check_memory_mode_headers_store_nothing():
    """Ingest with X-Memory-Mode: read or off, or X-Memory-Store: false, is 202 and stores
    nothing (stats and search afterwards)."""
    key = new_key()
    secret = nonce()
    for header, value in (("X-Memory-Mode", "read"), ("X-Memory-Mode", "off"), ("X-Memory-Store", "false")):
        answer = lc_client(key, headers={header: value}).ingest(
            [user(f"My alarm code is {secret} ({header}: {value}).")])
        assert answer.get("stored") == 0, f"{header}: {value} stored {short(answer)}"
    lc_client(key).ingest([user("My umbrella is the blue one with white dots.")])
    answer = settled(key, 1)
    assert answer["count"] == 1, f"stats after the header-guarded ingests: {short(answer)}"
    found = raw_search(key, "alarm code", limit=50)
    assert not any(secret in c for c in contents(found)), f"a guarded ingest was stored: {short(found)}"


# ---------------------------------------------------------------------------------------------
# 9. the rest of langchain-memoryrouter's API


def check_langchain_async_client():
    """AsyncMemoryRouterClient: aingest, aprepare (density low, context_limit 0 as langchain
    sends them), asearch."""
    key = new_key()
    code = nonce()
    client = AsyncMemoryRouterClient(key, base_url=base())

    async def run():
        stored = await client.aingest([user(f"I cycle to work along canal route {code} every day.")],
                                      session_id="async-s", model="clients-test")
        assert stored.get("stored") == 1, short(stored)
        deadline = time.monotonic() + POLL_SECONDS
        while True:
            answer = await client.aprepare([user("Which route do I cycle to work along?")],
                                           session_id="async-s", density="low", context_limit=0)
            if code in context_of(answer):
                break
            assert time.monotonic() < deadline, f"aprepare: not within 30 s; last: {short(answer)}"
            await asyncio.sleep(POLL_INTERVAL)
        found = await client.asearch("cycling route to work", limit=3, session_id="async-s")
        assert any(code in c for c in contents(found)), f"asearch: {short(found)}"

    asyncio.run(run())


def check_langchain_sync_search():
    """MemoryRouterClient.search returns memories[].content."""
    key = new_key()
    code = nonce()
    client = lc_client(key)
    client.ingest([user(f"My favourite drink is rooibos tea, blend number {code}."), assistant("Rooibos, noted.")])
    found = until_found("search finds it", lambda: client.search("favourite drink", limit=3), code)
    assert len(found["memories"]) <= 3, short(found)


def check_langchain_store_roundtrip():
    """MemoryRouterStore: mset then mget round trip, search, and amset/amget."""
    key = new_key()
    store = MemoryRouterStore(key, base_url=base(), session_id="store-s")
    store.mset([("preferred_language", "Portuguese"), ("home_city", {"city": "Porto", "since": 2019})])
    value = poll("mget finds preferred_language",
                 lambda: (lambda v: (v[0] is not None and "Portuguese" in v[0], v))(store.mget(["preferred_language"])))
    assert value == ["preferred_language: Portuguese"], value
    found = store.search("home city", limit=2)
    assert any("Porto" in (m.get("content") or "") for m in found), short(found)

    async def run():
        await store.amset([("favourite_colour", "teal")])
        deadline = time.monotonic() + POLL_SECONDS
        while True:
            got = await store.amget(["favourite_colour"])
            if got[0] and "teal" in got[0]:
                return
            assert time.monotonic() < deadline, f"amget: not within 30 s; last: {got}"
            await asyncio.sleep(POLL_INTERVAL)

    asyncio.run(run())


def check_langchain_memory_tools():
    """create_memory_tools: retain (system/tool messages dropped) then recall."""
    key = new_key()
    district = f"Alfama{nonce()}"
    retain, recall = create_memory_tools(key, base_url=base(), default_limit=5)
    said = retain.invoke({"messages": [
        HumanMessage(f"I live in Lisbon, in the {district} district."),
        AIMessage(f"Lisbon, {district}: noted."),
        SystemMessage("You are a test harness."),
        ToolMessage("tool output", tool_call_id="t1"),
    ]})
    assert said == "Retained 2 conversation message(s).", said
    poll("recall finds it",
         lambda: (lambda t: (district in t, t))(recall.invoke({"query": "Which district of Lisbon do I live in?"})))


# ---------------------------------------------------------------------------------------------
# runner


def checks() -> dict[str, Callable[[], None]]:
    return {name: fn for name, fn in globals().items() if name.startswith("check_") and callable(fn)}


def reason(error: BaseException) -> str:
    if isinstance(error, AssertionError):
        return str(error) or "assertion failed"
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, httpx.HTTPStatusError):
        text += f" | body: {short(error.response.text)}"
    return text


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
            table[name]()
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
