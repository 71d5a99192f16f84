#!/usr/bin/env python3
"""Drives allot's agent, in front of a real llama.cpp server, with the
official `openai` Python client (tests/tests/llama_cpp.rs).

Environment:
  AGENT_URL    base URL of the agent's OpenAI-compatible API, ending in /v1
  API_KEY      an allot key secret
  MODEL        the server's chat/completions model
  EMBED_MODEL  the server's embeddings model

Sends, in order, and checks what the client parsed:
  1. a plain chat completion (max_tokens=6): 6 completion tokens;
  2. a streamed chat completion with stream_options.include_usage: 6
     content deltas (llama-cpp-python sends no usage chunk);
  3. a plain legacy completion (max_tokens=4);
  4. embeddings for two inputs: two 64-wide vectors and prompt usage.

Prints one JSON line per request (with the usage the client saw, or null)
and `ok` last; exits 0 only if every check held, 1 on a failed check, 2
when `openai` cannot be imported.
"""

import json
import os
import sys
import traceback

try:
    from openai import OpenAI
except ImportError as error:  # pragma: no cover - environment problem
    print(f"cannot import openai ({error}): run `pip install openai`", file=sys.stderr)
    sys.exit(2)


def report(step, usage):
    print(json.dumps({"step": step, "usage": usage}), flush=True)


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def main():
    client = OpenAI(
        base_url=os.environ["AGENT_URL"],
        api_key=os.environ["API_KEY"],
        max_retries=0,
        timeout=60,
    )
    model, embed_model = os.environ["MODEL"], os.environ["EMBED_MODEL"]
    messages = [{"role": "user", "content": "hello from the openai client"}]

    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6)
    check(chat.usage.completion_tokens == 6, f"chat usage {chat.usage}")
    check(chat.choices[0].message.content, "chat content")
    report("chat", chat.usage.model_dump())

    deltas, usage = 0, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        if chunk.choices and chunk.choices[0].delta.content:
            deltas += 1
    check(deltas == 6, f"{deltas} content deltas")
    report("chat_stream", usage)

    completion = client.completions.create(model=model, prompt="say hi", max_tokens=4)
    check(completion.usage.completion_tokens == 4, f"completion usage {completion.usage}")
    report("completion", completion.usage.model_dump())

    embeddings = client.embeddings.create(model=embed_model, input=["one two", "three"])
    check(len(embeddings.data) == 2, "two embeddings")
    check(all(len(e.embedding) == 64 for e in embeddings.data), "64-wide vectors")
    check(embeddings.usage.prompt_tokens > 0, f"embedding usage {embeddings.usage}")
    report("embeddings", embeddings.usage.model_dump())

    print("ok", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - report every failure the same way
        traceback.print_exc()
        sys.exit(1)
