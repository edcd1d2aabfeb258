#!/usr/bin/env python3
"""The TeraServer of scripts/bench's `opentera` step: the calls an upload makes in OpenTera
mode, and nothing else, answered as fast as one Python process can.

  GET    /api/service/sessions?id_session=N  [one session: the bench user is its member]
  POST   /api/service/assets {"asset": {...}} [the asset, with a new asset_uuid and id_asset]
  DELETE /api/service/assets?uuid=...         200, empty (the large-upload rounds delete)
  GET    /_standin/stats                      calls answered so far (for the report)

Requests without `Authorization: OpenTera <token>` get 403, as from TeraServer; the
token's signature is not checked (TeraServer would). Standard library only: a plain
asyncio protocol speaking HTTP/1.1 with kept-alive connections (assetd's client pools
them), bodies with Content-Length only, never closing a connection first (a client
reusing one that the server closed would see an error, not an answer).

It stands for a TeraServer that answers at once: a real one (Flask, SQLAlchemy,
PostgreSQL) does far more per call. Its own CPU time is the bench's to report
(/proc/<pid>/stat), so what it costs on a shared machine is known.
"""

import argparse
import asyncio
import itertools
import json
import uuid
from urllib.parse import parse_qs

STATS = {"requests": 0, "session_lookups": 0, "assets_created": 0, "assets_deleted": 0, "refused": 0}
IDS = itertools.count(1)


def session_json(id_session, user_uuid):
    return {
        "id_session": id_session,
        "session_name": f"bench session {id_session}",
        # The same uuid for a session every time it is asked for.
        "session_uuid": str(uuid.uuid5(uuid.NAMESPACE_OID, f"assetd-bench-session-{id_session}")),
        "session_users": [{"user_uuid": user_uuid}],
        "session_participants": [],
        "session_devices": [],
    }


def route(method, target, body, authorized, user_uuid):
    """(status, JSON-able answer or None for an empty body)."""
    path, _, query = target.partition("?")
    if path == "/_standin/stats":
        return 200, STATS
    STATS["requests"] += 1
    if not authorized:
        STATS["refused"] += 1
        return 403, "Forbidden"
    args = parse_qs(query)
    if path == "/api/service/sessions" and method == "GET":
        try:
            id_session = int(args["id_session"][0])
        except (KeyError, ValueError):
            return 400, "Missing arguments: at least one id is required"
        STATS["session_lookups"] += 1
        return 200, [session_json(id_session, user_uuid)]
    if path == "/api/service/assets" and method == "POST":
        try:
            asset = json.loads(body)["asset"]
        except (ValueError, KeyError, TypeError):
            return 400, "Missing asset field"
        if asset.get("id_asset") != 0 or "id_session" not in asset or not asset.get("asset_name"):
            return 400, "Invalid asset"
        asset["id_asset"] = next(IDS)
        asset["asset_uuid"] = str(uuid.uuid4())
        STATS["assets_created"] += 1
        return 200, [asset]
    if path == "/api/service/assets" and method == "DELETE":
        if "uuid" not in args:
            return 400, "Missing arguments"
        STATS["assets_deleted"] += 1
        return 200, None
    return 404, "Not found"


class Connection(asyncio.Protocol):
    def __init__(self, user_uuid):
        self.user_uuid = user_uuid
        self.buffer = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            try:
                method, target, _ = lines[0].split(" ", 2)
            except ValueError:
                self.transport.close()
                return
            length, authorized = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding":
                    self.answer(501, "chunked bodies are not supported")
                    self.transport.close()
                    return
                elif name == "authorization":
                    scheme, _, token = value.strip().partition(" ")
                    authorized = scheme == "OpenTera" and token.count(".") == 2
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            status, answer = route(method, target, body, authorized, self.user_uuid)
            self.answer(status, answer)

    def answer(self, status, answer):
        payload = b"" if answer is None else json.dumps(answer).encode()
        reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found"}.get(status, "Error")
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--user-uuid", required=True, help="the member of every session")
    args = parser.parse_args()

    async def serve():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Connection(args.user_uuid), "127.0.0.1", args.port, backlog=512)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
