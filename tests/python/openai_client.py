"""The official OpenAI Python SDK against a running Tandem router's HTTP API: a streamed chat
completion (with usage), a plain completion, the model list, and an error in OpenAI's shape.

Usage: python openai_client.py http://HOST:PORT/v1
"""

import sys

import openai


def main(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    models = client.models.list().data
    assert len(models) == 1, models
    model = models[0].id

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello, Tandem"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert roles == ["assistant"], roles
    assert finish in ("stop", "length"), finish
    assert usage is not None and 1 <= usage.completion_tokens <= 12, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
    print(f"chat stream: {text!r} ({usage.completion_tokens} tokens, {finish})")

    whole = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello, Tandem"}],
        max_tokens=12,
        temperature=0,
    )
    assert whole.choices[0].message.content == text, (whole.choices[0].message.content, text)
    assert whole.choices[0].message.role == "assistant"

    completion = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2
    )
    choice = completion.choices[0]
    assert completion.usage.completion_tokens == len(choice.logprobs.tokens), completion
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs), choice.logprobs
    print(f"completion: {choice.text!r} ({choice.finish_reason})")

    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == choice.text, (streamed, choice.text)

    try:
        client.completions.create(model=model, prompt="x", max_tokens=0)
        raise AssertionError("max_tokens 0 was accepted")
    except openai.BadRequestError as e:
        assert "max_tokens" in e.message, e.message
        print(f"bad request: {e.status_code} {e.message}")
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        print(f"unknown model: {e.status_code} {e.message}")
    print("openai sdk: ok")


if __name__ == "__main__":
    main(sys.argv[1])
