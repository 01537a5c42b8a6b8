#!/usr/bin/env python3
"""TLS in front of a plaintext Kafka-compatible broker, for the tests.

tansu 0.6.0 accepts --cert but serves plain TCP whatever it is given, so the
TLS tests put this terminator between librdkafka and tansu: the TLS handshake
(server certificate, private CA, client certificates) is real; the Kafka
protocol behind it is tansu's.

usage: tls_proxy.py LISTEN_PORT UPSTREAM_PORT CERT KEY [CLIENT_CA]
With CLIENT_CA, a client must present a certificate that CA signed.
"""
import asyncio
import ssl
import sys


async def pump(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main():
    listen, upstream, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if len(sys.argv) > 5:
        context.load_verify_locations(sys.argv[5])
        context.verify_mode = ssl.CERT_REQUIRED

    async def connected(client_reader, client_writer):
        peer = client_writer.get_extra_info("peercert")
        print("client certificate:", peer.get("subject") if peer else None, flush=True)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pump(client_reader, upstream_writer), pump(upstream_reader, client_writer))

    server = await asyncio.start_server(connected, "127.0.0.1", listen, ssl=context)
    print("listening", flush=True)
    await server.serve_forever()


asyncio.run(main())
