"""micro_framework 2.0.16 echo service used by the microfw Python-peer tests.

Run by the Rust harness in the micro-framework venv (which carries the
Python 3.11 fixes, see microfw_py311_fixes.py):

    python mf_service.py

Environment:
    AMQP_URI        broker URI, usually a per-test vhost (required)
    SERVICE_NAME    micro_framework SERVICE_NAME (default "mf_echo")
    WEBSOCKET_PORT  port of the WebSocket RPC server on 127.0.0.1 (required)
    EVENT_SOURCE    optional: handle event `ping` dispatched by that service
                    (micro_framework declares `<EVENT_SOURCE>.events` with
                    auto_delete=true and queue
                    `<EVENT_SOURCE>.ping__<SERVICE_NAME>.on_ping`)

RPC targets: over AMQP `echo(value)`, `add(a, b=0)`, `fail(message)` (raises
ValueError) and `emit(event_name, payload)` (dispatches an event from this
service with micro_framework's Producer); over WebSocket `ws_echo(value)` and
`ws_add(a, b=0)`.

Stdout protocol (one line each, flushed):
    READY                         after the runner started (AMQP queues
                                  declared, WS listening)
    EVENT ping <json payload>     for every handled `ping` event
    STOPPED                       after a graceful stop (SIGINT)
"""

import json
import os

from micro_framework.amqp.dependencies import Producer
from micro_framework.amqp.entrypoints import EventListener, RPCListener
from micro_framework.dependencies import inject
from micro_framework.routes import Route
from micro_framework.runner import Runner
from micro_framework.websocket.entrypoints import WebSocketEntrypoint


def echo(value):
    return value


def add(a, b=0):
    return a + b


def fail(message):
    raise ValueError(message)


@inject(producer=Producer())
def emit(event_name, payload, producer):
    producer(event_name, payload)
    return True


def on_ping(payload):
    print("EVENT", "ping", json.dumps(payload, sort_keys=True), flush=True)


def ws_echo(value):
    return value


def ws_add(a, b=0):
    return a + b


class AnnouncingRunner(Runner):
    async def _start(self):
        await super()._start()
        print("READY", flush=True)


def main():
    config = {
        "AMQP_URI": os.environ["AMQP_URI"],
        "SERVICE_NAME": os.environ.get("SERVICE_NAME", "mf_echo"),
        "WEBSOCKET_IP": "127.0.0.1",
        "WEBSOCKET_PORT": int(os.environ["WEBSOCKET_PORT"]),
        "MAX_WORKERS": 3,
        "WORKER_MODE": "thread",
    }
    routes = [
        Route(echo, RPCListener()),
        Route(add, RPCListener()),
        Route(fail, RPCListener()),
        Route(emit, RPCListener()),
        Route(ws_echo, WebSocketEntrypoint()),
        Route(ws_add, WebSocketEntrypoint()),
    ]
    if os.environ.get("EVENT_SOURCE"):
        routes.append(Route(on_ping, EventListener(os.environ["EVENT_SOURCE"], "ping")))
    AnnouncingRunner(routes, config).start()
    print("STOPPED", flush=True)


if __name__ == "__main__":
    main()
