"""micro_framework 2.0.16 RPC client used by the microfw Python-peer tests.

Usage (in the micro-framework venv):

    python mf_client.py ws PORT TARGET ARGS_JSON [KWARGS_JSON]
    python mf_client.py amqp SERVICE TARGET ARGS_JSON [KWARGS_JSON]

`ws` uses `WebSocketRPCClient` against 127.0.0.1:PORT (socket timeout from
RPC_TIMEOUT, default 30 s). `amqp` needs a running Runner for the reply
listener, so it starts one with a one-shot timer route whose target gets an
`RPCProxyProvider(SERVICE)` injected; after the call it stops itself with
SIGINT (micro_framework has no AMQP RPC timeout: the caller must time out).

Environment: AMQP_URI (amqp mode), RPC_TIMEOUT.

Stdout (flushed), exit status 0 unless the command line is bad:
    TARGETS <json>                    the target details the proxy
                                      was built from (`__list_targets__`),
                                      sorted by target, printed before the call
    RESULT <json>                     the reply data
    ERROR <exc_type> <json message>   the rebuilt remote (or local) error
"""

import json
import os
import signal
import sys
import threading


def say(*parts):
    print(*parts, flush=True)


def call_and_report(proxy, target, args, kwargs):
    try:
        fn = proxy
        for part in target.split("."):
            fn = getattr(fn, part)
        result = fn(*args, **kwargs)
    except Exception as exc:
        say("ERROR", type(exc).__name__, json.dumps(str(exc)))
    else:
        say("RESULT", json.dumps(result, sort_keys=True))


def target_details(proxy):
    """The details of every target of `proxy` (nested proxies included)."""
    details = []
    for item in proxy.targets:
        if hasattr(item, "target_args"):
            details.append({
                "target": item.target,
                "args": item.target_args,
                "kwargs": item.target_kwargs,
                "docstring": item.target_doc,
            })
        else:
            details.extend(target_details(item))
    return sorted(details, key=lambda d: d["target"])


def ws_call(port, target, args, kwargs):
    from micro_framework.websocket.dependencies import WebSocketRPCClient

    timeout = float(os.environ.get("RPC_TIMEOUT", "30"))
    proxy = WebSocketRPCClient("127.0.0.1", int(port), timeout=timeout).get_proxy()
    say("TARGETS", json.dumps(target_details(proxy)))
    call_and_report(proxy, target, args, kwargs)


def amqp_call(service, target, args, kwargs):
    from micro_framework.amqp.dependencies import RPCProxyProvider
    from micro_framework.dependencies import inject
    from micro_framework.entrypoints import TimeEntrypoint
    from micro_framework.routes import Route
    from micro_framework.runner import Runner

    done = threading.Event()

    @inject(remote=RPCProxyProvider(service))
    def run_once(_now, remote):
        if done.is_set():
            return
        done.set()
        try:
            say("TARGETS", json.dumps(target_details(remote)))
            call_and_report(remote, target, args, kwargs)
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    config = {
        "AMQP_URI": os.environ["AMQP_URI"],
        "SERVICE_NAME": "mf_client",
        "MAX_WORKERS": 1,
        "WORKER_MODE": "thread",
    }
    Runner([Route(run_once, TimeEntrypoint(0.2))], config).start()


def main(argv):
    if len(argv) in (4, 5) and argv[0] in ("ws", "amqp"):
        args = json.loads(argv[3])
        kwargs = json.loads(argv[4]) if len(argv) == 5 else {}
        if argv[0] == "ws":
            ws_call(argv[1], argv[2], args, kwargs)
        else:
            amqp_call(argv[1], argv[2], args, kwargs)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
