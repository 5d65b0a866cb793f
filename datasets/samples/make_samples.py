#!/usr/bin/env python3
"""Make the bundled sample datasets (deterministic; rerunning rewrites identical files).

    /work/oracle-venv/bin/python datasets/samples/make_samples.py      # needs pyarrow

* `pirate-chat.parquet` (format `chat`, 400 rows): the quickstart's data. A user asks the colour of a thing, in
  varied words; the assistant always answers in one fixed pirate pattern, "Arr! The <thing> be <colour>, matey!".
  The pattern (fixed frame + copying the thing + a 24-entry colour table) is what a tiny model learns in minutes:
  after training, `generate --chat "What color is the sky?"` answers "Arr! The sky be blue, matey!". 20% of rows
  are two-turn conversations (both answers trained) and 10% carry a system prompt.
* `instruct-mini.parquet` (format `instruct`, Alpaca columns `instruction`, `input`, `output`, 120 rows): small
  deterministic string tasks (reverse, upper-case, count letters, add numbers).
* `tool-calls.parquet` (format `tools`, prompt format v3, 60 rows): a `tools` JSON column and conversations with
  assistant tool calls (9-character ids), tool results and final answers.
"""

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))

COLOURS = {
    "sky": "blue", "sea": "blue", "grass": "green", "leaf": "green", "frog": "green", "snow": "white",
    "cloud": "white", "milk": "white", "sun": "yellow", "banana": "yellow", "lemon": "yellow", "coal": "black",
    "night": "black", "crow": "black", "tomato": "red", "blood": "red", "cherry": "red", "carrot": "orange",
    "pumpkin": "orange", "orange": "orange", "plum": "purple", "grape": "purple", "chocolate": "brown",
    "mud": "brown",
}
QUESTIONS = [
    "What color is the {x}?",
    "Tell me the color of the {x}.",
    "Which color does the {x} have?",
    "Do you know the color of the {x}?",
    "What is the color of the {x}?",
]
SYSTEM = "You are a pirate."


def answer(x):
    return f"Arr! The {x} be {COLOURS[x]}, matey!"


def pirate_rows(n, rng):
    things = sorted(COLOURS)
    rows = []
    # Every (thing, question) pair once, then random ones; some two-turn, some with a system prompt.
    pairs = [(x, q) for x in things for q in QUESTIONS]
    rng.shuffle(pairs)
    while len(pairs) < n:
        pairs.append((rng.choice(things), rng.choice(QUESTIONS)))
    for i, (x, q) in enumerate(pairs[:n]):
        msgs = []
        if i % 10 == 3:
            msgs.append({"role": "system", "content": SYSTEM})
        msgs += [{"role": "user", "content": q.format(x=x)}, {"role": "assistant", "content": answer(x)}]
        if i % 5 == 1:
            y = rng.choice([t for t in things if t != x])
            msgs += [{"role": "user", "content": rng.choice(QUESTIONS).format(x=y)},
                     {"role": "assistant", "content": answer(y)}]
        rows.append({"messages": msgs})
    return rows


WORDS = ["cat", "river", "lantern", "stone", "apple", "garden", "music", "window", "pepper", "rocket"]


def instruct_rows(n, rng):
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            w = rng.choice(WORDS)
            rows.append({"instruction": "Reverse the word.", "input": w, "output": w[::-1]})
        elif kind == 1:
            w = rng.choice(WORDS)
            rows.append({"instruction": "Write the word in capital letters.", "input": w, "output": w.upper()})
        elif kind == 2:
            w = rng.choice(WORDS)
            rows.append({"instruction": f"How many letters does the word {w} have?", "input": "",
                         "output": str(len(w))})
        else:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            rows.append({"instruction": "Add the two numbers.", "input": f"{a} {b}", "output": str(a + b)})
    return rows


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
]
CITIES = {"Paris": "sunny, 24 C", "Oslo": "rainy, 9 C", "Lima": "cloudy, 18 C", "Cairo": "hot, 35 C",
          "Tokyo": "windy, 15 C"}
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def call_id(rng):
    return "".join(rng.choice(ALNUM) for _ in range(9))


def tool_rows(n, rng):
    rows = []
    for i in range(n):
        cid = call_id(rng)
        if i % 2 == 0:
            city = rng.choice(sorted(CITIES))
            msgs = [
                {"role": "user", "content": f"What's the weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": cid, "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
                {"role": "tool", "content": json.dumps({"weather": CITIES[city]}), "tool_call_id": cid},
                {"role": "assistant", "content": f"In {city} it is {CITIES[city]}."},
            ]
        else:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            msgs = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": cid, "type": "function",
                     "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}]},
                {"role": "tool", "content": str(a + b), "tool_call_id": cid},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        rows.append({"messages": msgs, "tools": json.dumps(TOOLS)})
    return rows


def main():
    rng = random.Random(20240601)
    msg_t = pa.struct([("role", pa.string()), ("content", pa.string())])
    pirate = pa.Table.from_pylist(pirate_rows(400, rng), schema=pa.schema([("messages", pa.list_(msg_t))]))
    pq.write_table(pirate, os.path.join(HERE, "pirate-chat.parquet"))

    inst = pa.Table.from_pylist(instruct_rows(120, rng), schema=pa.schema(
        [("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())]))
    pq.write_table(inst, os.path.join(HERE, "instruct-mini.parquet"))

    call_t = pa.struct([("id", pa.string()), ("type", pa.string()),
                        ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
    tmsg_t = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(call_t)),
                        ("tool_call_id", pa.string())])
    tools = pa.Table.from_pylist(tool_rows(60, rng), schema=pa.schema(
        [("messages", pa.list_(tmsg_t)), ("tools", pa.string())]))
    pq.write_table(tools, os.path.join(HERE, "tool-calls.parquet"))
    for name in ["pirate-chat", "instruct-mini", "tool-calls"]:
        t = pq.read_table(os.path.join(HERE, f"{name}.parquet"))
        print(f"{name}.parquet: {t.num_rows} rows, columns {t.column_names}")


if __name__ == "__main__":
    main()
