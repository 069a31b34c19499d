"""Generate sample tool-calling data: a weather assistant that calls ``get_weather``.

Writes ``weather-tools.jsonl`` beside this script, in OpenAI's fine-tuning shape for tool
use: each line offers the ``get_weather`` function under ``"tools"``; the user asks about
one city or two, the assistant answers with ``tool_calls`` (two calls side by side for two
cities), ``tool`` messages bring the results, and the assistant answers from them in one
fixed sentence shape. A few lines open with a greeting whose reply has ``"weight": 0``:
context the adapter is not trained to say.

The output is byte-for-byte deterministic. Standard library only:

    .venv/bin/python examples/make_tool_sample_data.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "weather-tools.jsonl"
SYSTEM_PROMPT = "You are a weather assistant. Call get_weather for current conditions."

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    }
]

# (city, temperature in celsius, conditions): invented, fixed readings
CITIES = [
    ("Paris", 18, "sunny"),
    ("Berlin", 12, "cloudy"),
    ("Madrid", 27, "clear"),
    ("Rome", 24, "sunny"),
    ("Oslo", 6, "rainy"),
    ("Lisbon", 21, "windy"),
    ("Vienna", 15, "overcast"),
    ("Dublin", 11, "drizzly"),
    ("Athens", 29, "hot and clear"),
    ("Warsaw", 9, "foggy"),
    ("Prague", 13, "cloudy"),
    ("Helsinki", 4, "snowy"),
    ("Zurich", 10, "rainy"),
    ("Brussels", 14, "overcast"),
    ("Copenhagen", 8, "windy"),
    ("Budapest", 19, "sunny"),
]
ONE_CITY = [
    "What's the weather in {city}?",
    "How warm is it in {city} right now?",
    "Is it raining in {city}?",
    "Could you check the weather in {city} for me?",
]
TWO_CITIES = "Compare the weather in {a} and {b}."
GREETING = ("Hello!", "Hello! Ask me about the weather in any city.")


def _call(call_id: str, city: str) -> dict[str, Any]:
    arguments = json.dumps({"city": city, "unit": "celsius"})
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }


def _result(call_id: str, city: str, degrees: int, conditions: str) -> dict[str, Any]:
    reading = {"city": city, "temperature": degrees, "unit": "celsius", "conditions": conditions}
    return {"role": "tool", "tool_call_id": call_id, "content": json.dumps(reading)}


def _sentence(city: str, degrees: int, conditions: str) -> str:
    return f"In {city} it is {degrees}°C and {conditions}."


def one_city(index: int, greet: bool) -> dict[str, Any]:
    city, degrees, conditions = CITIES[index % len(CITIES)]
    call_id = f"call_{index:03d}"
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    if greet:
        messages += [
            {"role": "user", "content": GREETING[0]},
            {"role": "assistant", "content": GREETING[1], "weight": 0},
        ]
    question = ONE_CITY[index % len(ONE_CITY)].format(city=city)
    messages += [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [_call(call_id, city)]},
        _result(call_id, city, degrees, conditions),
        {"role": "assistant", "content": _sentence(city, degrees, conditions)},
    ]
    return {"messages": messages, "tools": TOOLS}


def two_cities(index: int) -> dict[str, Any]:
    first = CITIES[index % len(CITIES)]
    second = CITIES[(index + 5) % len(CITIES)]
    ids = [f"call_{index:03d}_a", f"call_{index:03d}_b"]
    answer = " ".join(_sentence(*reading) for reading in (first, second))
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": TWO_CITIES.format(a=first[0], b=second[0])},
        {"role": "assistant", "tool_calls": [_call(ids[0], first[0]), _call(ids[1], second[0])]},
        _result(ids[0], *first),
        _result(ids[1], *second),
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "tools": TOOLS, "parallel_tool_calls": True}


def make_lines(count: int) -> list[str]:
    """``count`` lines: every fifth asks about two cities, every seventh opens with a greeting."""
    lines = []
    for index in range(count):
        line = two_cities(index) if index % 5 == 4 else one_city(index, greet=index % 7 == 6)
        lines.append(json.dumps(line, ensure_ascii=False))
    if len(set(lines)) != len(lines):
        raise SystemExit("duplicate lines: change the tables or the count")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--count", type=int, default=40)
    args = parser.parse_args()
    args.out.write_text("".join(line + "\n" for line in make_lines(args.count)), encoding="utf-8")
    print(f"wrote {args.count} lines to {args.out}")


if __name__ == "__main__":
    main()
