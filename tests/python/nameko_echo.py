"""Nameko 2.14 echo service used by the microfw Python-peer tests.

Run by the Rust harness (`microfw_tests::PythonProcess`) in the nameko venv:

    python nameko_echo.py

Environment:
    AMQP_URI              broker URI, usually a per-test vhost (required)
    SERVICE_NAME          nameko service name (default "nameko_echo")
    EVENT_SOURCE          service whose events are handled (default "pinger")
    NAMEKO_EXTRA_CONFIG   optional JSON object merged into the nameko config
                          (e.g. {"AUTO_DELETE_EVENT_EXCHANGES": true})

RPC methods: `echo(value)`, `fail(message)` (raises ValueError),
`emit(event_type, payload)` (dispatches an event from this service) and
`context()` (returns this worker's context data, call id stack included).

Stdout protocol (one line each, flushed):
    READY                         after all entrypoints are consuming
    CONTEXT <type> <json>         the handling worker's context data (call id
                                  stack included), printed just before EVENT
    EVENT <type> <json payload>   for every handled event
    STOPPED                       after a graceful stop (SIGINT)
"""

import eventlet

eventlet.monkey_patch()  # noqa: E402  (must run before nameko is imported)

import errno
import json
import os

from nameko.events import EventDispatcher, event_handler
from nameko.extensions import DependencyProvider
from nameko.rpc import rpc
from nameko.runners import ServiceRunner

SERVICE_NAME = os.environ.get("SERVICE_NAME", "nameko_echo")
EVENT_SOURCE = os.environ.get("EVENT_SOURCE", "pinger")


def say(*parts):
    print(*parts, flush=True)


class WorkerContextData(DependencyProvider):
    """Injects the worker's context data (nameko adds its call id stack)."""

    def get_dependency(self, worker_ctx):
        return worker_ctx.context_data


class EchoService:
    name = SERVICE_NAME

    dispatch = EventDispatcher()
    context_data = WorkerContextData()

    @rpc
    def echo(self, value):
        """Return `value` unchanged."""
        return value

    @rpc
    def fail(self, message):
        """Raise ValueError(message) so callers see a remote error."""
        raise ValueError(message)

    @rpc
    def emit(self, event_type, payload):
        """Dispatch `payload` as event `event_type` from this service."""
        self.dispatch(event_type, payload)
        return True

    @rpc
    def context(self):
        """Return this worker's context data, `call_id_stack` included."""
        return self.context_data

    @event_handler(EVENT_SOURCE, "ping")
    def on_ping(self, payload):
        say("CONTEXT", "ping", json.dumps(self.context_data, sort_keys=True, default=str))
        say("EVENT", "ping", json.dumps(payload, sort_keys=True))


def main():
    config = {"AMQP_URI": os.environ["AMQP_URI"]}
    config.update(json.loads(os.environ.get("NAMEKO_EXTRA_CONFIG", "{}")))
    runner = ServiceRunner(config)
    runner.add_service(EchoService)
    runner.start()
    say("READY")
    # Same shutdown dance as `nameko run`: SIGINT -> graceful stop, a second
    # SIGINT during the stop -> kill.
    runnlet = eventlet.spawn(runner.wait)
    while True:
        try:
            runnlet.wait()
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        except KeyboardInterrupt:
            try:
                runner.stop()
            except KeyboardInterrupt:
                runner.kill()
        else:
            break
    say("STOPPED")


if __name__ == "__main__":
    main()
