#!/usr/bin/env python3
"""A gRPC server and client (grpcio, over h2c) for L7 tests.

  grpcsvc.py serve PORT [flaky]
                              shop.Items/{Get,Delete} (raw bytes) and the
                              standard health service, SERVING; with flaky,
                              every other Get (the first, third...) fails
                              UNAVAILABLE
  grpcsvc.py call HOST PORT   on one channel: Get, Delete, health Check, Get;
                              prints one line each: the method and its status
                              code (and x-lacewing-denied-by when refused)
"""
import itertools
import os
import sys
from concurrent import futures

# grpcio is installed for this python by `cargo xtask setup`.
sys.path.insert(
    0,
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "pydeps"),
)

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402


def serve(port, flaky):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gets = itertools.count(1)

    def answer(req, ctx, name):
        if flaky and name == "Get" and next(gets) % 2 == 1:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "flaky")
        return name.encode() + b":" + req

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(lambda req, ctx, name=name: answer(req, ctx, name))
        for name in ("Get", "Delete")
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("shop.Items", handlers),))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    server.wait_for_termination()


def call(host, port):
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=5)
        for method in ("Get", "Delete", "Check", "Get"):
            try:
                if method == "Check":
                    stub = health_pb2_grpc.HealthStub(channel)
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    print(f"Check OK {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
                else:
                    reply = channel.unary_unary(f"/shop.Items/{method}")(b"1", timeout=5)
                    print(f"{method} OK {reply.decode()}")
            except grpc.RpcError as e:
                meta = dict(e.trailing_metadata() or ()) | dict(e.initial_metadata() or ())
                print(f"{method} {e.code().name} {meta.get('x-lacewing-denied-by', '-')}")


if sys.argv[1] == "serve":
    serve(int(sys.argv[2]), sys.argv[3:] == ["flaky"])
else:
    call(sys.argv[2], int(sys.argv[3]))
