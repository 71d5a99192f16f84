#!/usr/bin/env python3
"""Drives allot's agent with the official `openai` Python client.

Environment:
  AGENT_URL  base URL of the agent's OpenAI-compatible API, ending in /v1
  API_KEY    an allot key secret (sk-allot-...)
  MODEL      the model to ask for

Sends, in order:
  1. a plain chat completion (max_tokens=5);
  2. a streamed chat completion without stream_options: the agent asks the
     neuron for usage but must strip the usage chunk, so every chunk has
     choices and none carries usage;
  3. a streamed chat completion with stream_options.include_usage: the last
     chunk carries usage with total_tokens > 0;
  4. embeddings for two inputs: two vectors and prompt usage;
  5. a legacy completion, plain and streamed (no usage chunk reaches it);
  6. a Responses API call, plain (output_text and usage) and streamed (text
     deltas, then a final response.completed/incomplete event with usage);
  7. a request far over the key's token balance, which must raise
     RateLimitError with code "insufficient_quota".

Prints one JSON line per step and `ok` last; exits 0 only if every check
held, 1 on a failed check, 2 when `openai` cannot be imported.
"""

import json
import os
import sys
import traceback

try:
    from openai import OpenAI, RateLimitError
except ImportError as error:  # pragma: no cover - environment problem
    print(f"cannot import openai ({error}): run `pip install openai`", file=sys.stderr)
    sys.exit(2)


def report(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def dump(value):
    """A JSON-able view of an openai model object, for messages."""
    try:
        return value.model_dump(mode="json")
    except Exception:  # noqa: BLE001 - best effort for diagnostics
        return repr(value)


def main():
    base_url = os.environ["AGENT_URL"]
    api_key = os.environ["API_KEY"]
    model = os.environ["MODEL"]
    # No retries: a 429 must surface at once, and every request the test
    # counts must be sent exactly once.
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30.0)
    messages = [{"role": "user", "content": "hello there"}]

    # 1. Plain completion.
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=5)
    check(len(plain.choices) == 1, f"plain: one choice expected: {dump(plain)}")
    text = plain.choices[0].message.content
    check(isinstance(text, str) and text, f"plain: text expected: {dump(plain)}")
    check(plain.usage is not None, f"plain: usage expected: {dump(plain)}")
    check(plain.usage.completion_tokens <= 5, f"plain: at most 5 completion tokens: {dump(plain)}")
    check(plain.usage.total_tokens > 0, f"plain: total_tokens > 0: {dump(plain)}")
    report(
        "plain",
        text=text,
        finish_reason=plain.choices[0].finish_reason,
        total_tokens=plain.usage.total_tokens,
    )

    # 2. Streamed, no stream_options: no usage may reach the client.
    chunks = []
    streamed_text = ""
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, stream=True
    )
    for chunk in stream:
        chunks.append(chunk)
        check(chunk.usage is None, f"stream: unexpected usage chunk: {dump(chunk)}")
        check(len(chunk.choices) > 0, f"stream: chunk without choices: {dump(chunk)}")
        delta = chunk.choices[0].delta
        if delta is not None and delta.content:
            streamed_text += delta.content
    check(len(chunks) > 0, "stream: no chunks")
    check(streamed_text, "stream: no text")
    report("stream", chunks=len(chunks), text=streamed_text)

    # 3. Streamed with include_usage: the last chunk carries usage.
    chunks = []
    usage_text = ""
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                usage_text += choice.delta.content
    check(len(chunks) > 0, "stream_usage: no chunks")
    last = chunks[-1]
    check(last.usage is not None, f"stream_usage: last chunk has no usage: {dump(last)}")
    check(last.usage.total_tokens > 0, f"stream_usage: total_tokens > 0: {dump(last)}")
    check(
        all(c.usage is None for c in chunks[:-1]),
        "stream_usage: usage before the last chunk: "
        + json.dumps([dump(c) for c in chunks[:-1] if c.usage is not None]),
    )
    check(usage_text, "stream_usage: no text")
    report(
        "stream_usage",
        chunks=len(chunks),
        text=usage_text,
        total_tokens=last.usage.total_tokens,
    )

    # 4. Embeddings.
    embedded = client.embeddings.create(model=model, input=["hello world", "again"])
    check(len(embedded.data) == 2, f"embeddings: two vectors expected: {dump(embedded)}")
    check(all(len(d.embedding) > 0 for d in embedded.data), "embeddings: empty vector")
    check(embedded.usage.prompt_tokens > 0, f"embeddings: usage expected: {dump(embedded)}")
    report("embeddings", vectors=len(embedded.data), total_tokens=embedded.usage.total_tokens)

    # 5. Legacy completions, plain and streamed.
    completion = client.completions.create(model=model, prompt="say hi", max_tokens=4)
    check(completion.choices[0].text, f"completions: text expected: {dump(completion)}")
    check(completion.usage.completion_tokens <= 4, f"completions: bounded: {dump(completion)}")
    streamed = ""
    for chunk in client.completions.create(model=model, prompt="say hi", max_tokens=4, stream=True):
        check(chunk.usage is None, f"completions_stream: unexpected usage: {dump(chunk)}")
        streamed += "".join(c.text for c in chunk.choices)
    check(streamed, "completions_stream: no text")
    report("completions", text=completion.choices[0].text, streamed=streamed,
           total_tokens=completion.usage.total_tokens)

    # 6. Responses API, plain and streamed.
    response = client.responses.create(model=model, input="hello there", max_output_tokens=6)
    check(response.output_text, f"responses: output_text expected: {dump(response)}")
    check(response.usage is not None and response.usage.input_tokens > 0,
          f"responses: usage expected: {dump(response)}")
    check(response.usage.output_tokens <= 6, f"responses: bounded: {dump(response)}")
    deltas = ""
    final = None
    for event in client.responses.create(model=model, input="hello there",
                                         max_output_tokens=6, stream=True):
        if event.type == "response.output_text.delta":
            deltas += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event
    check(deltas, "responses_stream: no text deltas")
    check(final is not None and final.response.usage is not None,
          f"responses_stream: no final event with usage: {dump(final)}")
    report("responses", text=response.output_text, streamed=deltas,
           total_tokens=response.usage.total_tokens,
           streamed_total_tokens=final.response.usage.total_tokens)

    # 7. Far over the balance: RateLimitError, insufficient_quota.
    try:
        refused = client.chat.completions.create(
            model=model, messages=messages, max_tokens=100000
        )
    except RateLimitError as error:
        body = error.body if isinstance(error.body, dict) else {}
        code = error.code or body.get("code")
        check(
            code == "insufficient_quota",
            f"over_quota: code {code!r}, expected 'insufficient_quota'; "
            f"status {error.status_code}, body {error.body!r}",
        )
        report("over_quota", status=error.status_code, code=code, message=error.message)
    else:
        raise AssertionError(f"over_quota: expected RateLimitError, got {dump(refused)}")

    print("ok", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - any failure is a failed run
        traceback.print_exc()
        sys.exit(1)
