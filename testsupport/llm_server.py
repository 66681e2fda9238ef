#!/usr/bin/env python3
"""An OpenAI-compatible LLM server for recap's tests and demos (Python standard library only).

    python3 testsupport/llm_server.py --port 0        # 0 = pick a free port
    -> prints one line "READY port=<port>" on stdout once it serves

Endpoints
  POST /v1/chat/completions   OpenAI chat format (model, messages, optional response_format). Answers a normal
                              chat.completion whose choices[0].message.content is a JSON string
                              {"summary", "key_topics", "emotional_tone", "confidence"} derived deterministically from
                              the text of the LAST user message (see summarize()).
  GET  /v1/models             one model
Any model name is served, except names beginning with "missing/": those answer 404 model_not_found, as an endpoint
answers a model it does not have (mode "model_not_found" in the statistics).
  GET  /control               current fault settings
  POST /control               JSON body merged into the settings (unknown keys -> 400)
  POST /control/reset         settings, statistics, RNG and the Retry-After table back to the start
  GET  /stats                 counters; /stats?calls=1 adds the per-call records
  GET  /healthz               "ok"

Token counting and cost (the same simple rule for every call, so tests can recompute it):
  prompt_tokens     = ceil(sum of the token units of all message contents / 4)
                      (a content given as a list of parts counts the "text" of each part; a unit is 1 per Latin
                      character, 4 per any other: CJK text counts about a token a character)
  completion_tokens = ceil(units(choices[0].message.content) / 4)
  total_tokens      = prompt_tokens + completion_tokens
  cost (USD)        = prompt_tokens * 1e-6 + completion_tokens * 5e-6
Only 200 answers (ok and "nonjson") carry usage and add to the token and cost totals.

Fault injection (settings, all changeable at run time through POST /control):
  latency_ms       sleep before answering any completion (default 0)
  fail_rate        0..1, probability that a completion fails with a mode drawn from fail_modes (seeded RNG)
  fail_modes       list of "429", "500", "nonjson", "timeout" (default ["500"])
  retry_after      seconds sent in the Retry-After header of a 429 (integer, default 1)
  timeout_sleep_s  how long a "timeout" call sleeps before it answers 504 (default 30): set it above the client's
                   request timeout so the client gives up first
  seed             RNG seed (default 0); setting it re-seeds the RNG
  down             true -> every completion answers 503 (endpoint outage); checked first
  fail_next        N -> the next N completions fail with fail_modes[0] (checked before fail_rate)
  reply_style      "plain" (default): the JSON object alone; "aliases": the object inside a ```json fence, carrying
                   each field next to its alias ("summary" and "summary_text", "key_topics" and "topics",
                   "emotional_tone" and "tone") plus keys nobody asked for, as some models answer
  usage            false -> 200 answers carry no "usage" object (as some endpoints answer); the statistics still
                   count the call's tokens and cost by the rule above

Statistics (GET /stats): calls_total, calls_ok, calls_failed_by_mode {mode: n} (modes: 429, 500, nonjson, timeout,
down, bad_request), prompt_tokens_total, completion_tokens_total, cost_total, in_flight, max_concurrency_observed
(most completion requests in flight at once), early_retries (completions whose exact body was answered 429 before
and that arrived before that 429's Retry-After time had passed), distinct_prompts (different last user messages
seen: one per window summarized) and max_calls_one_prompt (most completions asked with the same last user message),
calls_by_purpose {purpose: n} (every completion request counted by its X-Recap-Purpose header: window, running,
rollup; "none" without the header). The per-call records (/stats?calls=1) carry "purpose" and "prompt" (the text of
the last user message, so a test can check what a call was given).
"""

import argparse
import hashlib
import json
import math
import random
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MODEL_ID = "recap-test-model"
MISSING_MODEL_PREFIX = "missing/"  # a requested model named missing/... does not exist here: 404 model_not_found
FAIL_MODES = ("429", "500", "nonjson", "timeout")
PROMPT_PRICE = 1e-6  # USD per prompt token
COMPLETION_PRICE = 5e-6  # USD per completion token

DEFAULT_SETTINGS = {
    "latency_ms": 0,
    "fail_rate": 0.0,
    "fail_modes": ["500"],
    "retry_after": 1,
    "timeout_sleep_s": 30.0,
    "seed": 0,
    "down": False,
    "fail_next": 0,
    "reply_style": "plain",
    "usage": True,
}
REPLY_STYLES = ("plain", "aliases")

STOPWORDS = set(
    """
    about above after again against also although always among another anyone anything anyway around because been
    before being below between both cannot could couldn didn does doesn doing done down during each either else even
    ever every everyone everything from further gonna gotta had hadn hasn have haven having here hers herself himself
    however into isn itself just know like made make many maybe might mine more most much must myself need never
    once only other others ought ours ourselves over really same said says shall shan should shouldn since some
    something still such sure than thank thanks that thats the their theirs them themselves then there these they
    thing things think this those though through thus today together tomorrow too toward under until upon very want
    wanted wants wasn well were weren what whatever when where whether which while whom whose will with within without
    won't would wouldn yeah yesterday your yours yourself yourselves okay going getting goes went come came take took
    tell told give gave look looks looking actually basically pretty quite rather still lots user assistant bot
    message messages conversation summary summarize please json here's it's i'm you're that's don't can't
    """.split()
)

POSITIVE = set(
    """
    good great love loved loving happy glad awesome amazing wonderful excellent nice fantastic excited exciting fun
    enjoy enjoyed beautiful best thanks thank grateful joy proud perfect cool yay brilliant delighted pleased calm
    """.split()
)
NEGATIVE = set(
    """
    bad sad angry hate hated terrible awful horrible upset worried worry anxious stress stressed stressful tired
    frustrated frustrating frustration annoyed annoying lonely hurt pain fear afraid scared depressed cry crying
    miserable disappointed sorry problem problems broken fail failed
    """.split()
)

# "[2026-11-20 14:03:11] user: text", "- elena: text", "2026-11-20T14:03:11Z user: text", "user: text"
MESSAGE_LINE = re.compile(
    r"^\s*(?:[-*•]\s*)?(?:\[[^\]]{1,40}\]\s*)?(?:\d{4}-\d\d-\d\d[T ][0-9:.]+Z?\s*)?(?:\([^)]{1,40}\)\s*)?"
    r"[A-Za-z0-9_@#.' -]{1,40}:\s+(?P<text>\S.*)$"
)
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")

NOT_TOPICS = STOPWORDS | POSITIVE | NEGATIVE  # words never named as a topic


def content_text(content):
    """The text of one message content: a string, or a list of parts ({"type":"text","text":...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def summarize(text):
    """The deterministic analysis of a prompt.

    The lines that look like chat messages ("speaker: text", optionally with a leading bullet, [time] or ISO time)
    are used; when there are none, the whole text is. Words are runs of letters, compared lowercased; topics are words of
    length >= 4 that are not stopwords, ordered by frequency, ties broken by first appearance, each spelled as at its
    first appearance. The tone counts words
    from a small positive and a small negative lexicon: none -> neutral; both with min/max >= 0.5 -> mixed; else the
    larger side."""
    lines = [m.group("text") for m in map(MESSAGE_LINE.match, text.splitlines()) if m]
    body = "\n".join(lines) if lines else text
    raw = WORD.findall(body)
    words = [w.lower() for w in raw]
    counts = Counter(w for w in words if len(w) >= 4 and w not in NOT_TOPICS)
    first = {}  # lowercased word -> (index, spelling) of its first appearance
    for i, (w, r) in enumerate(zip(words, raw)):
        first.setdefault(w, (i, r))
    # each topic is spelled as it first appears, so it is a substring of the prompt
    topics = [first[w][1] for w in sorted(counts, key=lambda w: (-counts[w], first[w][0]))[:5]]
    if not topics:
        summary = "The user did not talk about anything in particular."
    elif len(topics) == 1:
        summary = f"The user talked about {topics[0]}."
    else:
        top = topics[:3]
        summary = f"The user talked about {', '.join(top[:-1])} and {top[-1]}."
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    if pos == 0 and neg == 0:
        tone = "neutral"
    elif pos and neg and min(pos, neg) / max(pos, neg) >= 0.5:
        tone = "mixed"
    else:
        tone = "positive" if pos > neg else "negative"
    return {"summary": summary, "key_topics": topics, "emotional_tone": tone, "confidence": 0.8}


def last_user_text(body):
    """The text of the last user message of a request body ("" when it has none or does not parse)."""
    try:
        messages = json.loads(body).get("messages") or []
    except (ValueError, AttributeError):
        return ""
    last = ""
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict) and m.get("role") == "user":
            last = content_text(m.get("content"))
    return last


def is_latin(c):
    o = ord(c)
    return o < 0x0250 or 0x1E00 <= o <= 0x1EFF or 0x2000 <= o <= 0x206F


def units(text):
    """Token units of a text, a quarter token each: 1 per Latin character, 4 (a whole token) per any other (CJK is
    about a token per character). recap's `summarize::llm::token_units` is the same rule."""
    if text.isascii():  # every ASCII character is Latin: the common case without a Python loop over the prompt
        return len(text)
    return sum(1 if is_latin(c) else 4 for c in text)


def tokens(n_units):
    return math.ceil(n_units / 4)


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.generation = 0  # bumped by reset(): calls begun before a reset are not recorded after it
        self.in_flight = 0  # completions being served now; survives a reset
        self.reset()

    def reset(self):
        with self.lock:
            self.settings = json.loads(json.dumps(DEFAULT_SETTINGS))
            self.rng = random.Random(self.settings["seed"])
            self.retry_not_before = {}  # sha256(body) -> earliest time a retry is allowed (monotonic)
            self.ids = 0
            self.generation += 1
            self.stats = {
                "calls_total": 0,
                "calls_ok": 0,
                "calls_failed_by_mode": {},
                "prompt_tokens_total": 0,
                "completion_tokens_total": 0,
                "cost_total": 0.0,
                "max_concurrency_observed": 0,
                "early_retries": 0,
                "distinct_prompts": 0,
                "max_calls_one_prompt": 0,
                "calls_by_purpose": {},
            }
            self.calls = []
            self.by_prompt = Counter()  # sha256(last user message) -> completions asked with it

    def update(self, changes):
        with self.lock:
            new = dict(self.settings)
            for key, value in changes.items():
                if key not in DEFAULT_SETTINGS:
                    raise ValueError(f"unknown setting {key!r}; known: {sorted(DEFAULT_SETTINGS)}")
                new[key] = value
            modes = new["fail_modes"]
            if not isinstance(modes, list) or not modes or any(str(m) not in FAIL_MODES for m in modes):
                raise ValueError(f"fail_modes must be a non-empty list drawn from {list(FAIL_MODES)}")
            new["fail_modes"] = [str(m) for m in modes]
            if new["reply_style"] not in REPLY_STYLES:
                raise ValueError(f"reply_style must be one of {list(REPLY_STYLES)}")
            if not 0 <= float(new["fail_rate"]) <= 1:
                raise ValueError("fail_rate must be within 0..1")
            new["fail_rate"] = float(new["fail_rate"])
            new["latency_ms"] = float(new["latency_ms"])
            new["timeout_sleep_s"] = float(new["timeout_sleep_s"])
            new["retry_after"] = int(new["retry_after"])
            new["fail_next"] = int(new["fail_next"])
            new["down"] = bool(new["down"])
            if "seed" in changes:
                self.rng = random.Random(new["seed"])
            self.settings = new
            return dict(new)

    def record(self, mode, status, usage, duration_s, purpose="none", prompt=""):
        """Counts one finished completion (called with the lock held)."""
        if mode == "ok":
            self.stats["calls_ok"] += 1
        else:
            by_mode = self.stats["calls_failed_by_mode"]
            by_mode[mode] = by_mode.get(mode, 0) + 1
        entry = {"time": time.time(), "status": status, "mode": mode, "prompt_tokens": 0, "completion_tokens": 0,
                 "cost": 0.0, "duration_ms": round(duration_s * 1000, 3), "purpose": purpose, "prompt": prompt}
        if usage:
            entry.update(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
                         cost=usage["cost"])
            self.stats["prompt_tokens_total"] += usage["prompt_tokens"]
            self.stats["completion_tokens_total"] += usage["completion_tokens"]
            self.stats["cost_total"] = round(self.stats["cost_total"] + usage["cost"], 12)
        self.calls.append(entry)


STATE = State()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as HTTP clients with pools expect
    server_version = "recap-llm-test/1"
    # One send per response: with the default unbuffered wfile, headers and body went out in two writes, and on a
    # kept-alive connection the second waited for the client's delayed ACK (Nagle): ~40 ms per call. A buffered
    # wfile (flushed once per response, in send_json and by the base class after each request) plus TCP_NODELAY
    # makes a call take about a millisecond.
    wbufsize = -1
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # keep stderr quiet; per-call records are in /stats?calls=1
        pass

    # ---- plumbing
    def send_json(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()  # headers and body in one send
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def error(self, status, message, kind, headers=None):
        self.send_json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # ---- routes
    def do_GET(self):
        url = urlsplit(self.path)
        if url.path in ("/v1/models", "/models"):
            self.send_json(200, {"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "recap-tests"}]})
        elif url.path == "/control":
            with STATE.lock:
                self.send_json(200, dict(STATE.settings))
        elif url.path == "/stats":
            with STATE.lock:
                out = json.loads(json.dumps(STATE.stats))
                out["in_flight"] = STATE.in_flight
                if parse_qs(url.query).get("calls", ["0"])[0] not in ("0", "", "false"):
                    out["calls"] = list(STATE.calls)
            self.send_json(200, out)
        elif url.path == "/healthz":
            self.send_json(200, {"status": "ok"})
        else:
            self.error(404, f"no route GET {url.path}", "not_found")

    def do_POST(self):
        path = urlsplit(self.path).path
        body = self.read_body()
        if path in ("/v1/chat/completions", "/chat/completions"):
            self.completion(body)
        elif path == "/control/reset":
            STATE.reset()
            with STATE.lock:
                self.send_json(200, dict(STATE.settings))
        elif path == "/control":
            try:
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object")
                self.send_json(200, STATE.update(changes))
            except (ValueError, TypeError) as e:
                self.error(400, str(e), "invalid_request_error")
        else:
            self.error(404, f"no route POST {path}", "not_found")

    # ---- the completion endpoint
    def completion(self, body):
        arrived = time.monotonic()
        digest = hashlib.sha256(body).hexdigest()
        purpose = (self.headers.get("X-Recap-Purpose") or "none").strip().lower() or "none"
        with STATE.lock:
            by_purpose = STATE.stats["calls_by_purpose"]
            by_purpose[purpose] = by_purpose.get(purpose, 0) + 1
            STATE.in_flight += 1
            STATE.stats["max_concurrency_observed"] = max(STATE.stats["max_concurrency_observed"], STATE.in_flight)
            STATE.stats["calls_total"] += 1
            not_before = STATE.retry_not_before.get(digest)
            if not_before is not None and arrived < not_before:
                STATE.stats["early_retries"] += 1
            settings = dict(STATE.settings)
            if settings["down"]:
                mode = "down"
            elif settings["fail_next"] > 0:
                STATE.settings["fail_next"] -= 1
                mode = settings["fail_modes"][0]
            elif settings["fail_rate"] > 0 and STATE.rng.random() < settings["fail_rate"]:
                mode = STATE.rng.choice(settings["fail_modes"])
            else:
                mode = "ok"
            STATE.ids += 1
            call_id = STATE.ids
            generation = STATE.generation
        status, usage = 0, None
        self.last_user = None  # set by answer() once it has parsed the body, so the record does not parse it again
        try:
            if settings["latency_ms"] > 0:
                time.sleep(settings["latency_ms"] / 1000)
            status, usage, mode = self.answer(body, mode, settings, call_id, digest)
        finally:
            with STATE.lock:
                STATE.in_flight -= 1
                if generation == STATE.generation:
                    prompt = self.last_user if self.last_user is not None else last_user_text(body)
                    STATE.record(mode, status, usage, time.monotonic() - arrived, purpose, prompt)

    def answer(self, body, mode, settings, call_id, digest):
        """Sends the answer; returns (status, usage or None, mode as counted)."""
        if mode == "down":
            self.error(503, "the model endpoint is down (fault injection)", "service_unavailable")
            return 503, None, mode
        try:
            req = json.loads(body)
            messages = req["messages"]
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
            model = str(req.get("model") or MODEL_ID)
        except (ValueError, KeyError, TypeError) as e:
            self.error(400, f"invalid request: {e}", "invalid_request_error")
            return 400, None, "bad_request"
        if model.startswith(MISSING_MODEL_PREFIX):
            # as OpenAI answers a model it does not serve (OpenRouter: 404 "No endpoints found for <model>")
            self.send_json(404, {"error": {"message": f"The model `{model}` does not exist or you do not have access to it.",
                                           "type": "invalid_request_error", "code": "model_not_found"}})
            return 404, None, "model_not_found"
        if mode == "429":
            retry_after = settings["retry_after"]
            with STATE.lock:
                STATE.retry_not_before[digest] = time.monotonic() + retry_after
            self.error(429, "rate limited (fault injection)", "rate_limit_exceeded",
                       {"Retry-After": str(retry_after), "retry-after-ms": str(retry_after * 1000)})
            return 429, None, mode
        if mode == "500":
            self.error(500, "internal error (fault injection)", "server_error")
            return 500, None, mode
        if mode == "timeout":
            time.sleep(settings["timeout_sleep_s"])
            self.error(504, "timed out (fault injection)", "timeout")
            return 504, None, mode

        last_user = ""
        for m in messages:
            if isinstance(m, dict) and m.get("role") == "user":
                last_user = content_text(m.get("content"))
        self.last_user = last_user
        with STATE.lock:
            key = hashlib.sha256(last_user.encode()).hexdigest()
            STATE.by_prompt[key] += 1
            STATE.stats["distinct_prompts"] = len(STATE.by_prompt)
            STATE.stats["max_calls_one_prompt"] = max(STATE.stats["max_calls_one_prompt"], STATE.by_prompt[key])
        result = summarize(last_user)
        if mode == "nonjson":
            content = f"Sure! Here is the summary: {result['summary']} Let me know if you need anything else."
        elif settings["reply_style"] == "aliases":
            both = {"summary": result["summary"], "summary_text": result["summary"],
                    "key_topics": result["key_topics"], "topics": result["key_topics"],
                    "emotional_tone": result["emotional_tone"], "tone": result["emotional_tone"],
                    "confidence": result["confidence"], "language": "en", "notes": {"model_version": 3}}
            content = "```json\n" + json.dumps(both, indent=2) + "\n```"
        else:
            content = json.dumps(result)
        prompt_units = sum(units(content_text(m.get("content"))) for m in messages if isinstance(m, dict))
        pt, ct = tokens(prompt_units), tokens(units(content))
        usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct,
                 "cost": round(pt * PROMPT_PRICE + ct * COMPLETION_PRICE, 12)}
        self.send_json(200, {
            "id": f"chatcmpl-test-{call_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop", "logprobs": None}],
            **({"usage": usage} if settings.get("usage", True) else {}),
        })
        return 200, usage, mode


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # dozens of clients connecting at once must not overflow the listen backlog


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port")
    args = ap.parse_args()
    server = Server((args.host, args.port), Handler)
    print(f"READY port={server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
