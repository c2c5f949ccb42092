"""Nameko 2.14 standalone client used by the microfw Python-peer tests.

Usage (in the nameko venv):

    python nameko_client.py call SERVICE METHOD ARGS_JSON [KWARGS_JSON]
    python nameko_client.py dispatch SOURCE EVENT_TYPE PAYLOAD_JSON

Environment:
    AMQP_URI            broker URI (required)
    RPC_TIMEOUT         seconds to wait for an RPC reply (default 30)
    NAMEKO_CONTEXT_DATA optional JSON object: the call's context data (sent
                        as `nameko.<key>` headers, e.g. {"language": "fr"})
    NAMEKO_EXTRA_CONFIG optional JSON object merged into the nameko config

Stdout (one line, flushed), exit status 0 unless the command line is bad:
    RESULT <json>                   the RPC reply
    RAISED <module.class>           the class of the exception the call raised
                                    (printed just before its ERROR line)
    ERROR <exc_type> <json message> the remote (or local) error
    DISPATCHED                      the event was published
"""

import eventlet

eventlet.monkey_patch()  # noqa: E402

import json
import os
import sys

from nameko.exceptions import RemoteError
from nameko.standalone.events import event_dispatcher
from nameko.standalone.rpc import ClusterRpcProxy


def say(*parts):
    print(*parts, flush=True)


def qualified_name(exc):
    return type(exc).__module__ + "." + type(exc).__qualname__


def main(argv):
    if not (len(argv) in (4, 5) and argv[0] == "call") and not (
        len(argv) == 4 and argv[0] == "dispatch"
    ):
        print(__doc__, file=sys.stderr)
        return 2
    config = {"AMQP_URI": os.environ["AMQP_URI"]}
    config.update(json.loads(os.environ.get("NAMEKO_EXTRA_CONFIG", "{}")))
    if argv[0] == "call":
        service, method, args = argv[1], argv[2], json.loads(argv[3])
        kwargs = json.loads(argv[4]) if len(argv) > 4 else {}
        timeout = float(os.environ.get("RPC_TIMEOUT", "30"))
        context_data = json.loads(os.environ.get("NAMEKO_CONTEXT_DATA", "null"))
        with ClusterRpcProxy(config, context_data=context_data, timeout=timeout) as proxy:
            try:
                result = getattr(proxy[service], method)(*args, **kwargs)
            except RemoteError as exc:
                say("RAISED", qualified_name(exc))
                say("ERROR", exc.exc_type, json.dumps(exc.value))
            except Exception as exc:  # nameko's own, timeouts, unknown service, ...
                say("RAISED", qualified_name(exc))
                say("ERROR", type(exc).__name__, json.dumps(str(exc)))
            else:
                say("RESULT", json.dumps(result, sort_keys=True))
        return 0
    source, event_type, payload = argv[1], argv[2], json.loads(argv[3])
    event_dispatcher(config)(source, event_type, payload)
    say("DISPATCHED")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
