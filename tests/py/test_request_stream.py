"""RequestStream: a failure that arrives while an output is still unread ends the stream with the
error right after that output (before this fix the consumer then waited forever: the shutdown
deadline cut such streams without their error event)."""

import asyncio

import pytest

from rtpllm.engine.request_stream import RequestStream
from rtpllm.outputs import RequestOutput


def output(finished=False):
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1], outputs=[], finished=finished)


def test_an_error_after_an_unread_output_follows_that_output():
    async def consume():
        stream = RequestStream("r")
        stream.put(output(), num_tokens=1)
        stream.fail(RuntimeError("shut down"))
        first = await asyncio.wait_for(stream.__anext__(), 1.0)
        with pytest.raises(RuntimeError, match="shut down"):
            await asyncio.wait_for(stream.__anext__(), 1.0)
        return first

    assert not asyncio.run(consume()).finished


def test_an_error_with_nothing_unread_is_raised_at_once():
    async def consume():
        stream = RequestStream("r")
        stream.fail(RuntimeError("gone"))
        await asyncio.wait_for(stream.__anext__(), 1.0)

    with pytest.raises(RuntimeError, match="gone"):
        asyncio.run(consume())
