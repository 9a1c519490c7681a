"""A stand-in application: the official openai SDK, configured only through the environment
(OPENAI_BASE_URL points at sluice, OPENAI_API_KEY is a sluice client token), asking a small
question every few seconds so the dashboard has something to show."""

import os
import time

import openai

client = openai.OpenAI()  # reads OPENAI_BASE_URL and OPENAI_API_KEY
model = os.environ.get("APP_MODEL", "gpt-4o-mini")
interval = float(os.environ.get("APP_INTERVAL_SECS", "5"))

while True:
    try:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello in five words."}],
            max_completion_tokens=32,
        )
        print(f"{model}: {reply.choices[0].message.content!r}", flush=True)
    except openai.APIError as err:
        print(f"{model}: {type(err).__name__}: {err}", flush=True)
    time.sleep(interval)
