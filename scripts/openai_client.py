#!/usr/bin/env python3
"""Drive `tramontane serve` with the official `openai` Python client, unchanged.

    tramontane serve --model runs/models/tiny-mixtral --adapter pirate=runs/quickstart/adapter --port 8080
    pip install openai
    python scripts/openai_client.py --base-url http://127.0.0.1:8080/v1 --adapter pirate [--api-key KEY]

Lists the models, runs a completion, a chat completion and a streamed chat completion, on the base and on the
adapter (switching per request), several streamed requests at once (the server decodes them in one batch), and
checks that a bad request comes back as an OpenAI error. With `--tools` it also offers a tool: a model with a v3
tokenizer may answer with `tool_calls`; a v1 tokenizer refuses tools with a 400.
"""
import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
from openai import OpenAI


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--adapter", default="pirate", help="an adapter name the server was started with")
    p.add_argument("--question", default="What color is the sky?")
    p.add_argument("--concurrent", type=int, default=8, help="streamed requests sent at once")
    p.add_argument("--tools", action="store_true", help="also send a chat completion with a `get_weather` tool")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)

    models = [m.id for m in client.models.list().data]
    print("models:", models)
    base = models[0]
    if args.adapter not in models:
        print(f"adapter {args.adapter!r} is not served", file=sys.stderr)
        return 1

    c = client.completions.create(model=base, prompt="The colour of the sea", max_tokens=8, temperature=0)
    print("completion:", repr(c.choices[0].text), c.usage)

    for model in (base, args.adapter):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.question}], max_tokens=24, temperature=0
        )
        print(f"chat [{model}]:", repr(r.choices[0].message.content), r.choices[0].finish_reason)

    pieces = []
    stream = client.chat.completions.create(
        model=args.adapter,
        messages=[{"role": "user", "content": args.question}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    print(f"stream [{args.adapter}]:", repr("".join(pieces)))

    def streamed(i: int) -> str:
        model = (base, args.adapter)[i % 2]
        chunks = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.question}], max_tokens=16, temperature=0, stream=True
        )
        return model + ": " + "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(args.concurrent) as pool:
        for line in pool.map(streamed, range(args.concurrent)):
            print("concurrent", repr(line))

    if args.tools:
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        try:
            r = client.chat.completions.create(
                model=base, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, max_tokens=64,
                temperature=0,
            )
            choice = r.choices[0]
            print("tools ->", choice.finish_reason, choice.message.tool_calls or repr(choice.message.content))
        except openai.BadRequestError as e:
            print("tools refused (v1 tokenizer?) ->", e.status_code, e.body)

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        print("expected an error for an unknown model", file=sys.stderr)
        return 1
    except openai.NotFoundError as e:
        print("unknown model ->", e.status_code, e.body)
    try:
        client.chat.completions.create(model=base, messages=[], max_tokens=4)
        print("expected an error for empty messages", file=sys.stderr)
        return 1
    except openai.BadRequestError as e:
        print("empty messages ->", e.status_code, e.body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
