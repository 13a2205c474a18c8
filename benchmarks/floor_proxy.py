"""The floor: the least a credential-injecting aiohttp proxy can do per request.

A low-level ``web.Server`` and one ``ClientSession`` (``TCPConnector(limit=100,
keepalive_timeout=30)``, ``auto_decompress=False``, ``DummyCookieJar``), no access log, on
uvloop. It drops hop-by-hop headers and ``Host``, sets ``Authorization`` and ``X-Partner-ID``,
reads small answers whole and sends them as one ``web.Response``, streams larger ones. No
checks, no metrics, no token management: no lighter and no heavier than that, so the
gateway's cost above it is the gateway's own code.

    python -m benchmarks.floor_proxy --listen 127.0.0.1:8081 --upstream http://127.0.0.1:8082
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                 "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
SMALL = 64 * 1024


async def run(host: str, port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30),
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in HOP)
        headers["Authorization"] = "Bearer floor-token"
        headers["X-Partner-ID"] = "floor-partner"
        length = request.content_length
        data: bytes | aiohttp.StreamReader | None = None
        if request.body_exists:
            data = await request.read() if length is not None and length <= SMALL else (
                request.content)
        async with session.request(request.method, upstream + request.raw_path,
                                   headers=headers, data=data, allow_redirects=False) as resp:
            out_headers = CIMultiDict((k, v) for k, v in resp.headers.items()
                                      if k.lower() not in HOP)
            if resp.content_length is not None and resp.content_length <= SMALL:
                return web.Response(status=resp.status, headers=out_headers,
                                    body=await resp.read())
            out = web.StreamResponse(status=resp.status, headers=out_headers)
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_chunked(SMALL):
                await out.write(chunk)
            await out.write_eof()
            return out

    server = web.Server(handler, access_log=None)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(server, host, port, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    srv.close()
    await server.shutdown(1.0)
    await session.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    import uvloop

    uvloop.run(run(host, int(port), args.upstream.rstrip("/")))


if __name__ == "__main__":
    main()
